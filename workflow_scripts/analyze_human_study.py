"""Snakemake adapter: rule analyze_human_study."""

from pathlib import Path

from sidpipe.human_study.analysis import analyze_study
from sidpipe.io import job_log

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    out = {key: smk.output[key] for key in ("table", "table_md", "table_html", "agreement")}
    out |= {key: smk.output[key] for key in ("subjects", "metric_agreement")}
    out["plot"] = Path(smk.output.plot).with_suffix("")
    analyze_study(
        smk.input.responses,
        smk.input.site,
        smk.input.metrics,
        out,
        n_boot=smk.params.settings["n_boot"],
        seed=smk.params.settings["seed"],
    )
