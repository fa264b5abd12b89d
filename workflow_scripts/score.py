"""Snakemake adapter: rule score."""

from pathlib import Path

from sidpipe.io import job_log, write_csv

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    from sidpipe.metrics import FIELDS, score_arm

    rows = score_arm(
        samples_dir=Path(smk.input.samples).parent,
        masks_dir=Path(smk.input.masks).parent,
        references_dir=Path(smk.input.references).parent,
        subject=smk.wildcards.subject,
        method=smk.wildcards.method,
        descriptions=smk.wildcards.descriptions,
        inference=smk.wildcards.inference,
        clip_model=smk.params.clip,
        dino_model=smk.params.dino,
        batch_size=smk.params.batch_size,
    )
    write_csv(smk.output[0], rows, FIELDS)
