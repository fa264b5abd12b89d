rule class_images:
    input:
        model=base_model_input,
    output:
        manifest="results/class_images/{class_slug}/manifest.csv",
    log:
        "results/logs/class_images/{class_slug}.log",
    benchmark:
        "results/benchmarks/class_images/{class_slug}.tsv"
    priority: 3  # short, and training waits for it (priorities: rules/training.smk)
    conda:
        "../envs/gpu.yaml"
    resources:
        gpu=1,
        mem_mb=job_memory("class_images", 16000),
        runtime=job_runtime("class_images", 60),
    params:
        settings=class_image_settings,
    script:
        "../workflow_scripts/class_images.py"


rule train:
    input:
        unpack(training_inputs),
    output:
        weights=directory("results/train/{method}/{descriptions}/{subject}/weights"),
        log="results/train/{method}/{descriptions}/{subject}/training_log.csv",
        info="results/train/{method}/{descriptions}/{subject}/train_info.json",
        curve=report(
            "results/train/{method}/{descriptions}/{subject}/loss_curve.png",
            caption="report/loss_curve.rst",
            category="Training",
            subcategory="{subject}",
            labels={"method": "{method}", "descriptions": "{descriptions}"},
        ),
    log:
        "results/logs/train/{method}/{descriptions}/{subject}.log",
    benchmark:
        "results/benchmarks/train/{method}/{descriptions}/{subject}.tsv"
    wildcard_constraints:
        method=ADAPTER_METHODS,
    # Priorities put the longest jobs first, so that on a few cores a run ends on short jobs
    # rather than on a training started late: what training waits for (3: references, masks,
    # descriptions, class images), training (2), sampling (1), then the rest.
    priority: 2
    conda:
        "../envs/gpu.yaml"
    resources:
        gpu=1,
        mem_mb=job_memory("train", 32000),
        runtime=job_runtime("train", 240),
    params:
        settings=training_settings,
    script:
        "../workflow_scripts/train.py"


# Full fine-tunes (GBs per arm) are temp() unless training.keep_full_weights: Snakemake then
# deletes them once every job that needs them is done.
use rule train as train_full_finetune with:
    output:
        weights=weights_output_flag(
            directory("results/train/{method}/{descriptions}/{subject}/weights")
        ),
        log="results/train/{method}/{descriptions}/{subject}/training_log.csv",
        info="results/train/{method}/{descriptions}/{subject}/train_info.json",
        curve=report(
            "results/train/{method}/{descriptions}/{subject}/loss_curve.png",
            caption="report/loss_curve.rst",
            category="Training",
            subcategory="{subject}",
            labels={"method": "{method}", "descriptions": "{descriptions}"},
        ),
    wildcard_constraints:
        method=FULL_FINETUNE_METHODS,
