# Compute nodes often have no internet access: downloads run where snakemake itself runs.
localrules:
    download_dataset,


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
        mem_mb=job_memory("download_dataset", 2000),
        runtime=job_runtime("download_dataset", 60),
    params:
        downloads=dataset_downloads,
        timeout=dataset_timeout,
    script:
        "../workflow_scripts/download_dataset.py"
