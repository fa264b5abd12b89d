rule pretrain_world:
    output:
        directory("results/world/models"),
    log:
        "results/logs/pretrain_world/pretrain_world.log",
    benchmark:
        "results/benchmarks/pretrain_world/pretrain_world.tsv"
    conda:
        "../envs/cpu.yaml"
    threads: 2
    resources:
        gpu=0,
        mem_mb=job_memory("pretrain_world", 6000),
        runtime=job_runtime("pretrain_world", 60),
    params:
        settings=config.get("world", {}),
        identifier=config["identifier"],
    script:
        "../workflow_scripts/pretrain_world.py"
