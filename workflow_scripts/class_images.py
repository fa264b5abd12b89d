"""Snakemake adapter: rule class_images."""

from pathlib import Path

from sidpipe.io import job_log
from sidpipe.models import hide_bitsandbytes

smk = snakemake  # noqa: F821
hide_bitsandbytes()  # only 8-bit Adam needs it, but diffusers and peft would import it
with job_log(smk.log[0]):
    from sidpipe.class_images import generate_class_images

    generate_class_images(out_dir=Path(smk.output.manifest).parent, **smk.params.settings)
