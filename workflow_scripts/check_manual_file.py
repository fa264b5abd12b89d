"""Snakemake adapter: rule check_manual_file."""

from pathlib import Path

from sidpipe.hub import check_manual_file
from sidpipe.io import job_log

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    check_manual_file(out=Path(smk.output[0]), **smk.params.settings)
