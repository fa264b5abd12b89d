"""Snakemake adapter: rule analyze."""

from pathlib import Path

from sidpipe.analysis import analyze
from sidpipe.io import job_log

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    analyze(
        Path(smk.input[0]),
        Path(smk.output.summary).parent,
        smk.params.subjects,
        n_boot=smk.params.n_boot,
        untrained=smk.params.untrained,
        arm_pairs=smk.params.comparisons,
    )
