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
