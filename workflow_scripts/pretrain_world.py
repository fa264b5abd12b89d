"""Snakemake adapter: rule pretrain_world."""

from pathlib import Path

from sidpipe.io import job_log
from sidpipe.models import setup_job

smk = snakemake  # noqa: F821
setup_job(smk.threads)  # torch on the job's threads, bitsandbytes hidden: before imports
with job_log(smk.log[0]):
    from sidpipe.world.pretrain import pretrain_world

    settings = {"threads": smk.threads, **smk.params.settings}
    pretrain_world(Path(smk.output[0]), settings, identifier=smk.params.identifier)
