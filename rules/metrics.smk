rule score:
    input:
        unpack(score_inputs),
    output:
        "results/metrics/{method}/{descriptions}/{inference}/{subject}.csv",
    log:
        "results/logs/score/{method}/{descriptions}/{inference}/{subject}.log",
    benchmark:
        "results/benchmarks/score/{method}/{descriptions}/{inference}/{subject}.tsv"
    conda:
        "../envs/gpu.yaml"
    resources:
        gpu=1,
        mem_mb=job_memory("score", 8000),
        runtime=job_runtime("score", 30),
    params:
        clip=config["models"]["clip"],
        dino=config["models"].get("dino"),
        judge=config["models"].get("judge"),
        batch_size=config["metrics"].get("batch_size", 32),
    script:
        "../workflow_scripts/score.py"


rule gather_metrics:
    input:
        metric_csvs(),
    output:
        report(
            "results/metrics/all.csv",
            caption="report/metrics_all.rst",
            category="Metrics",
            labels={"table": "every image and metric"},
        ),
    log:
        "results/logs/gather_metrics/gather_metrics.log",
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("gather_metrics", 4000),
        runtime=job_runtime("gather_metrics", 10),
    script:
        "../workflow_scripts/gather_metrics.py"


rule analyze:
    input:
        "results/metrics/all.csv",
    output:
        summary=report(
            "results/metrics/summary.csv",
            caption="report/metrics_summary.rst",
            category="Metrics",
            labels={"table": "arm means with 95% CIs"},
        ),
        subjects=report(
            "results/metrics/subjects.csv",
            caption="report/metrics_subjects.rst",
            category="Metrics",
            labels={"table": "arm means per subject"},
        ),
        agreement=report(
            "results/metrics/agreement.csv",
            caption="report/agreement.rst",
            category="Metrics",
            labels={"table": "proxies vs ground truth"},
        ),
        improvements=report(
            "results/metrics/improvements.csv",
            caption="report/improvements.rst",
            category="Metrics",
            labels={"table": "SID minus baseline (paired)"},
        ),
        method_pairs=report(
            "results/metrics/method_pairs.csv",
            caption="report/method_pairs.rst",
            category="Metrics",
            labels={"table": "method A minus method B (paired)"},
        ),
        concepts=report(
            "results/metrics/concepts.csv",
            caption="report/concepts.rst",
            category="Metrics",
            labels={"table": "concept subjects: carrier vs transfer prompts"},
        ),
        comparisons=report(
            "results/metrics/comparisons.csv",
            caption="report/comparisons.rst",
            category="Metrics",
            labels={"table": "chosen arms: A minus B (paired)"},
        ),
        concept_pairs=report(
            "results/metrics/concept_pairs.csv",
            caption="report/concept_pairs.rst",
            category="Metrics",
            labels={
                "table": "concept subjects: method A minus method B per prompt group"
            },
        ),
        tables=expand(
            "results/metrics/tables/{table}.{ext}",
            table=["main", "cases", "vlms", "single_reference"],
            ext=["csv", "md"],
        ),
        table_main=report(
            "results/metrics/tables/main.html",
            caption="report/paper_tables.rst",
            category="Metrics",
            labels={"table": "main: method x baseline / SID"},
        ),
        table_cases=report(
            "results/metrics/tables/cases.html",
            caption="report/paper_tables.rst",
            category="Metrics",
            labels={"table": "cases (Table E.3)"},
        ),
        table_vlms=report(
            "results/metrics/tables/vlms.html",
            caption="report/paper_tables.rst",
            category="Metrics",
            labels={"table": "VLMs (Table E.4)"},
        ),
        table_single_reference=report(
            "results/metrics/tables/single_reference.html",
            caption="report/paper_tables.rst",
            category="Metrics",
            labels={"table": "single reference (Fig. 6, 9)"},
        ),
        plots_svg=expand(
            "results/metrics/plots/{plot}.svg",
            plot=[
                "pareto",
                "pareto_single_reference",
                "subjects",
                "improvements",
                "comparisons",
                "agreement",
            ],
        ),
        pareto=report(
            "results/metrics/plots/pareto.png",
            caption="report/pareto.rst",
            category="Pareto",
            labels={"figure": "Pareto fronts"},
        ),
        pareto_single_reference=report(
            "results/metrics/plots/pareto_single_reference.png",
            caption="report/pareto.rst",
            category="Pareto",
            labels={"figure": "single reference (Fig. 9)"},
        ),
        subjects_plot=report(
            "results/metrics/plots/subjects.png",
            caption="report/pareto.rst",
            category="Pareto",
            labels={"figure": "per subject"},
        ),
        improvements_plot=report(
            "results/metrics/plots/improvements.png",
            caption="report/pareto.rst",
            category="Pareto",
            labels={"figure": "SID improvements"},
        ),
        comparisons_plot=report(
            "results/metrics/plots/comparisons.png",
            caption="report/comparisons.rst",
            category="Pareto",
            labels={"figure": "chosen arms: A minus B"},
        ),
        agreement_plot=report(
            "results/metrics/plots/agreement.png",
            caption="report/agreement.rst",
            category="Pareto",
            labels={"figure": "proxies vs ground truth"},
        ),
    log:
        "results/logs/analyze/analyze.log",
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("analyze", 8000),
        runtime=job_runtime("analyze", 30),
    params:
        subjects=[dict(row) for row in SUBJECTS.values()],
        n_boot=config["metrics"].get("bootstrap", 1000),
        untrained=UNTRAINED,
        comparisons=COMPARISONS,
    script:
        "../workflow_scripts/analyze.py"
