rule sample:
    input:
        unpack(sample_inputs),
    output:
        manifest="results/samples/{method}/{descriptions}/{inference}/{subject}/manifest.csv",
        grid=report(
            "results/samples/{method}/{descriptions}/{inference}/{subject}/grid.png",
            caption="report/samples_grid.rst",
            category="Samples",
            subcategory="{subject}",
            labels={
                "method": "{method}",
                "descriptions": "{descriptions}",
                "inference": "{inference}",
            },
        ),
    log:
        "results/logs/sample/{method}/{descriptions}/{inference}/{subject}.log",
    benchmark:
        "results/benchmarks/sample/{method}/{descriptions}/{inference}/{subject}.tsv"
    wildcard_constraints:
        method=attention_arms_constraint(mapped=False),
    priority: 1  # after training (rules/training.smk), before the short jobs
    conda:
        "../envs/gpu.yaml"
    resources:
        gpu=1,
        mem_mb=job_memory("sample", 16000),
        runtime=job_runtime("sample", 120),
    params:
        settings=sample_settings,
    script:
        "../workflow_scripts/sample.py"


# Arms of `attention.experiments`: the job that samples them also draws their [V] attention
# maps, with the same pipeline (one load); attention_arms_constraint splits the arms.
use rule sample as sample_and_attention with:
    input:
        unpack(attention_inputs),
    output:
        manifest="results/samples/{method}/{descriptions}/{inference}/{subject}/manifest.csv",
        grid=report(
            "results/samples/{method}/{descriptions}/{inference}/{subject}/grid.png",
            caption="report/samples_grid.rst",
            category="Samples",
            subcategory="{subject}",
            labels={
                "method": "{method}",
                "descriptions": "{descriptions}",
                "inference": "{inference}",
            },
        ),
        attention="results/attention/{method}/{descriptions}/{inference}/{subject}/attention.csv",
        attention_grid=report(
            "results/attention/{method}/{descriptions}/{inference}/{subject}/overlays.png",
            caption="report/attention.rst",
            category="Attention",
            subcategory="{subject}",
            labels={
                "method": "{method}",
                "descriptions": "{descriptions}",
                "inference": "{inference}",
            },
        ),
    log:
        "results/logs/sample_and_attention/{method}/{descriptions}/{inference}/{subject}.log",
    benchmark:
        "results/benchmarks/sample_and_attention/{method}/{descriptions}/{inference}/{subject}.tsv"
    wildcard_constraints:
        method=attention_arms_constraint(mapped=True),
    resources:
        gpu=1,
        mem_mb=sample_and_attention_resource("mem_mb", 16000, 16000, max),
        runtime=sample_and_attention_resource("runtime", 120, 60, sum),
    params:
        settings=sample_settings,
        attention=attention_settings,


rule compare_samples:
    input:
        baseline="results/samples/{method}/case1/standard/{subject}/manifest.csv",
        sid="results/samples/{method}/sid/standard/{subject}/manifest.csv",
    output:
        report(
            "results/samples/compare/{method}/{subject}.png",
            caption="report/compare_samples.rst",
            category="Samples",
            subcategory="{subject}",
            labels={"method": "{method}", "figure": "baseline vs SID"},
        ),
    log:
        "results/logs/compare_samples/{method}/{subject}.log",
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("compare_samples", 2000),
        runtime=job_runtime("compare_samples", 10),
    params:
        prompt_ids=compared_prompt_ids,
        seed=0,
    script:
        "../workflow_scripts/compare_samples.py"


# Arms without a training job: the encoders (BLIP-Diffusion, ELITE; the subject's reference goes
# to the encoder here) and the base model (the prompts without [V]); the same prompts, seeds and
# manifest as the trained arms.
rule sample_encoder:
    input:
        unpack(sample_encoder_inputs),
    output:
        manifest="results/samples/{method}/{descriptions}/{inference}/{subject}/manifest.csv",
        grid=report(
            "results/samples/{method}/{descriptions}/{inference}/{subject}/grid.png",
            caption="report/samples_grid.rst",
            category="Samples",
            subcategory="{subject}",
            labels={
                "method": "{method}",
                "descriptions": "{descriptions}",
                "inference": "{inference}",
            },
        ),
    log:
        "results/logs/sample_encoder/{method}/{descriptions}/{inference}/{subject}.log",
    benchmark:
        "results/benchmarks/sample_encoder/{method}/{descriptions}/{inference}/{subject}.tsv"
    wildcard_constraints:
        method=UNTRAINED_METHODS,
    priority: 1  # sampling, as rule sample
    conda:
        "../envs/gpu.yaml"
    resources:
        gpu=1,
        mem_mb=job_memory("sample_encoder", 24000),
        runtime=job_runtime("sample_encoder", 120),
    params:
        settings=sample_encoder_settings,
    script:
        "../workflow_scripts/sample_encoder.py"
