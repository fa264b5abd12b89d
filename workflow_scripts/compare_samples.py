"""Snakemake adapter: rule compare_samples."""

from pathlib import Path

from sidpipe.io import job_log
from sidpipe.sample_grids import write_side_by_side

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    write_side_by_side(
        Path(smk.input.baseline).parent,
        Path(smk.input.sid).parent,
        Path(smk.output[0]),
        prompt_ids=smk.params.prompt_ids,
        seed=smk.params.seed,
    )
