"""Snakemake adapter: rule class_images."""

from pathlib import Path

from sidpipe.io import job_log
from sidpipe.models import setup_job

smk = snakemake  # noqa: F821
setup_job(smk.threads)  # torch on the job's threads, bitsandbytes hidden: before imports
with job_log(smk.log[0]):
    from sidpipe.class_images import generate_class_images

    generate_class_images(out_dir=Path(smk.output.manifest).parent, **smk.params.settings)
