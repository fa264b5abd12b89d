# The human study of the paper (App. B, Table B.2): a site of image pairs from two arms, served
# to participants by `sidpipe study serve` (README "The human study"), and its analysis.


rule human_study:
    input:
        unpack(human_study_inputs),
    output:
        site=directory("results/human_study/{study}/site"),
        design=report(
            "results/human_study/{study}/design.csv",
            caption="report/human_study_design.rst",
            category="Human study",
            labels={"study": "{study}", "table": "design (who sees what)"},
        ),
    log:
        "results/logs/human_study/{study}.log",
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("human_study", 2000),
        runtime=job_runtime("human_study", 30),
    params:
        settings=human_study_build_settings,
        # only read: judgements already recorded must fit the new plan, else the job fails
        responses=human_study_responses,
    script:
        "../workflow_scripts/build_human_study.py"


# Needs the participants' responses, which only `sidpipe study serve` writes: it is in `all`
# once the responses file exists; `snakemake --profile profiles/local
# results/human_study/<study>/table_b2.csv` asks for it.
rule analyze_human_study:
    input:
        responses=human_study_responses,
        site="results/human_study/{study}/site",
        metrics="results/metrics/subjects.csv",
    output:
        table="results/human_study/{study}/table_b2.csv",
        table_md="results/human_study/{study}/table_b2.md",
        table_html=report(
            "results/human_study/{study}/table_b2.html",
            caption="report/human_study_table.rst",
            category="Human study",
            labels={"study": "{study}", "table": "Table B.2"},
        ),
        agreement=report(
            "results/human_study/{study}/agreement.csv",
            caption="report/human_study_agreement.rst",
            category="Human study",
            labels={"study": "{study}", "table": "inter-rater agreement"},
        ),
        subjects=report(
            "results/human_study/{study}/subjects.csv",
            caption="report/human_study_subjects.rst",
            category="Human study",
            labels={"study": "{study}", "table": "per subject"},
        ),
        metric_agreement=report(
            "results/human_study/{study}/metric_agreement.csv",
            caption="report/human_study_metrics.rst",
            category="Human study",
            labels={"study": "{study}", "table": "humans vs metrics"},
        ),
        plot=report(
            "results/human_study/{study}/plots/human_study.png",
            caption="report/human_study_table.rst",
            category="Human study",
            labels={"study": "{study}", "figure": "Table B.2 and humans vs metrics"},
        ),
        plot_svg="results/human_study/{study}/plots/human_study.svg",
    log:
        "results/logs/analyze_human_study/{study}.log",
    conda:
        "../envs/cpu.yaml"
    resources:
        gpu=0,
        mem_mb=job_memory("analyze_human_study", 2000),
        runtime=job_runtime("analyze_human_study", 10),
    params:
        settings=human_study_analysis_settings,
    script:
        "../workflow_scripts/analyze_human_study.py"
