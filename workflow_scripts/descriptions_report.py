"""Snakemake adapter: rule descriptions_report."""

from pathlib import Path

from sidpipe.descriptions.report import write_descriptions_table
from sidpipe.io import job_log

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    write_descriptions_table(
        Path(smk.input.references).parent, list(smk.input.descriptions), Path(smk.output[0])
    )
