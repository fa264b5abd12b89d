"""Snakemake adapter: rule gather_metrics."""

from pathlib import Path

from sidpipe.io import job_log
from sidpipe.metric_tables import gather_metrics

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    gather_metrics([Path(p) for p in smk.input], Path(smk.output[0]))
