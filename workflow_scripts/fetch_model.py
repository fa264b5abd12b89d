"""Snakemake adapter: rule fetch_model."""

from pathlib import Path

from sidpipe.hub import fetch_model, repo_id_of
from sidpipe.io import job_log

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    fetch_model(repo_id_of(smk.wildcards.repo), Path(smk.output[0]), list(smk.params.used_by))
