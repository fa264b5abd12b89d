rule plan_experiments:
    output:
        report(
            "results/experiments/arms.csv",
            caption="report/arms.rst",
            category="Experiments",
            labels={"table": "arms per experiment and subject"},
        ),
    log:
        "results/logs/plan_experiments/plan_experiments.log",
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("plan_experiments", 1000),
        runtime=job_runtime("plan_experiments", 5),
    params:
        rows=arms_table_rows(),
    script:
        "../workflow_scripts/plan_experiments.py"
