rule download_dataset:
    output:
        folder=directory("resources/{dataset}"),
        manifest="resources/{dataset}.manifest.csv",
    log:
        "results/logs/download_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/download_dataset/{dataset}.tsv"
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=60,
    params:
        downloads=lambda wildcards: config["datasets"][wildcards.dataset]["downloads"],
        timeout=lambda wildcards: config["datasets"][wildcards.dataset].get(
            "timeout", 120
        ),
    script:
        "../workflow_scripts/download_dataset.py"
