"""Snakemake adapter: rule prepare_references."""

from pathlib import Path

from sidpipe.io import job_log
from sidpipe.references import prepare_references

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    prepare_references(
        source_dir=Path(smk.params.images),
        out_dir=Path(smk.output.manifest).parent,
        subject=smk.wildcards.subject,
        resolution=smk.params.resolution,
        min_images=smk.params.min_images,
        max_pixels=smk.params.max_pixels,
        min_side=smk.params.min_side,
    )
