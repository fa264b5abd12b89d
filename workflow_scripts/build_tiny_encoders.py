"""Snakemake adapter: rule build_tiny_encoders."""

from pathlib import Path

from sidpipe.io import atomic_dir, job_log
from sidpipe.models import setup_job

smk = snakemake  # noqa: F821
setup_job(smk.threads)  # torch on the job's threads, bitsandbytes hidden: before imports
with job_log(smk.log[0]):
    from sidpipe.encoders.tiny import build_tiny_blip_diffusion, build_tiny_elite

    with atomic_dir(Path(smk.output[0])) as tmp:
        build_tiny_blip_diffusion(tmp / "blip_diffusion", seed=smk.params.seed)
        # ELITE on the tiny SD: its mapper files take their K/V shapes from its UNet
        build_tiny_elite(tmp / "elite", str(Path(smk.input[0]) / "sd"), seed=smk.params.seed)
