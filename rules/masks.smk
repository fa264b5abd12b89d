rule segment_references:
    input:
        references="results/references/{subject}/manifest.csv",
        models=mask_model_inputs,
    output:
        manifest="results/masks/{subject}/manifest.csv",
        overlays=report(
            "results/masks/{subject}/overlays.png",
            caption="report/mask_overlays.rst",
            category="References and masks",
            subcategory="{subject}",
            labels={"subject": "{subject}", "figure": "mask overlays"},
        ),
    log:
        "results/logs/segment_references/{subject}.log",
    benchmark:
        "results/benchmarks/segment_references/{subject}.tsv"
    priority: 3  # short, and training waits for it (priorities: rules/training.smk)
    conda:
        "../envs/gpu.yaml"
    resources:
        gpu=lambda wildcards: int(mask_backend(wildcards.subject) == "grounded_sam"),
        mem_mb=job_memory("segment_references", 16000),
        runtime=job_runtime("segment_references", 30),
    params:
        settings=segmentation_settings,
    script:
        "../workflow_scripts/segment_references.py"
