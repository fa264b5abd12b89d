rule prepare_references:
    input:
        subject_images,
    output:
        manifest="results/references/{subject}/manifest.csv",
    log:
        "results/logs/prepare_references/{subject}.log",
    benchmark:
        "results/benchmarks/prepare_references/{subject}.tsv"
    priority: 3  # short, and training waits for it (priorities: rules/training.smk)
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("prepare_references", 4000),
        runtime=job_runtime("prepare_references", 20),
    params:
        images=subject_images_folder,
        resolution=config["references"]["resolution"],
        min_images=config["references"]["min_images"],
        max_pixels=config["references"].get("max_pixels", 40_000_000),
        min_side=config["references"].get("min_side", 64),
    script:
        "../workflow_scripts/prepare_references.py"


rule summarize_references:
    input:
        manifests=expand("results/references/{subject}/manifest.csv", subject=SUBJECTS),
    output:
        report(
            "results/references/summary.csv",
            caption="report/references_summary.rst",
            category="References and masks",
            labels={"table": "prepared reference images"},
        ),
    log:
        "results/logs/summarize_references/summarize_references.log",
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("summarize_references", 1000),
        runtime=job_runtime("summarize_references", 5),
    params:
        subjects=subject_table_rows(),
    script:
        "../workflow_scripts/summarize_references.py"
