rule describe_references:
    input:
        references="results/references/{subject}/manifest.csv",
        manual=manual_descriptions_input,
        tokenizer=base_model_input,
        vlm=vlm_model_input,
    output:
        "results/descriptions/{descriptions}/{subject}.csv",
    log:
        "results/logs/describe_references/{descriptions}/{subject}.log",
    benchmark:
        "results/benchmarks/describe_references/{descriptions}/{subject}.tsv"
    wildcard_constraints:
        descriptions=NODE_DESCRIPTION_SETS,
    priority: 3  # short, and training waits for it (priorities: rules/training.smk)
    conda:
        "../envs/gpu.yaml"
    resources:
        gpu=lambda wildcards: int(vlm_backend(wildcards.descriptions) == "transformers"),
        mem_mb=job_memory("describe_references", local_vlm_memory),
        runtime=job_runtime("describe_references", 60),
    params:
        settings=description_settings,
    script:
        "../workflow_scripts/describe_references.py"


localrules:
    describe_references_api,


# An API's description sets (rules/common.smk: API_DESCRIPTIONS), on the submitting host.
use rule describe_references as describe_references_api with:
    wildcard_constraints:
        descriptions=API_DESCRIPTION_SETS,


rule descriptions_report:
    input:
        references="results/references/{subject}/manifest.csv",
        descriptions=description_csvs,
    output:
        report(
            "results/descriptions/report/{subject}.html",
            caption="report/descriptions.rst",
            category="Descriptions",
            subcategory="{subject}",
            labels={"subject": "{subject}", "table": "descriptions per image"},
        ),
    log:
        "results/logs/descriptions_report/{subject}.log",
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("descriptions_report", 1000),
        runtime=job_runtime("descriptions_report", 5),
    script:
        "../workflow_scripts/descriptions_report.py"
