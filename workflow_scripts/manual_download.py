"""Snakemake adapter: rule manual_download (a file the user downloads by hand is missing)."""

from sidpipe.io import SidpipeError, job_log

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    raise SidpipeError(smk.params.instructions)
