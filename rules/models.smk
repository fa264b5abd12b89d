rule build_tiny_models:
    input:
        corpus=tokenizer_corpus_files(),
    output:
        directory("results/models/tiny"),
    log:
        "results/logs/build_tiny_models/build_tiny_models.log",
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("build_tiny_models", 4000),
        runtime=job_runtime("build_tiny_models", 10),
    params:
        seed=config.get("tiny_models", {}).get("seed", 0),
        resolution=config.get("tiny_models", {}).get("resolution", 64),
        identifier=config["identifier"],
        classes=subject_classes(),
    script:
        "../workflow_scripts/build_tiny_models.py"


# Tiny random BLIP-Diffusion and ELITE (on the tiny SD) for configs whose encoder methods point
# into results/models/tiny_encoders (the demo); the real checkpoints load by hub id or path.
rule build_tiny_encoders:
    input:
        "results/models/tiny",
    output:
        directory("results/models/tiny_encoders"),
    log:
        "results/logs/build_tiny_encoders/build_tiny_encoders.log",
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("build_tiny_encoders", 4000),
        runtime=job_runtime("build_tiny_encoders", 10),
    params:
        seed=config.get("tiny_models", {}).get("seed", 0),
    script:
        "../workflow_scripts/build_tiny_encoders.py"


# Hub models a run loads, fetched once on the submitting host (compute nodes often have no
# internet) into the Hugging Face cache the nodes share; their jobs wait for the record.
localrules:
    fetch_model,
    check_manual_file,


rule fetch_model:
    output:
        "results/models/hub/{repo}.json",
    log:
        "results/logs/fetch_model/{repo}.log",
    benchmark:
        "results/benchmarks/fetch_model/{repo}.tsv"
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("fetch_model", 2000),
        runtime=job_runtime("fetch_model", 240),
    params:
        used_by=hub_model_users,
    script:
        "../workflow_scripts/fetch_model.py"


# Files no rule can fetch (ELITE's mappers): checked on the submitting host before the jobs
# that load them, with the size and sha256 recorded; a missing one is named with its config key
# and where to get it, and only the jobs that need it wait (a dry run still plans the grid).
rule check_manual_file:
    output:
        "results/models/manual/{manual_key}.json",
    log:
        "results/logs/check_manual_file/{manual_key}.log",
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("check_manual_file", 1000),
        runtime=job_runtime("check_manual_file", 10),
    params:
        settings=manual_file_settings,
    script:
        "../workflow_scripts/check_manual_file.py"
