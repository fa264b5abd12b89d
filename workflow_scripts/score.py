"""Snakemake adapter: rule score."""

from pathlib import Path

from sidpipe.io import job_log, write_csv
from sidpipe.models import setup_job

smk = snakemake  # noqa: F821
setup_job(smk.threads)  # torch on the job's threads, bitsandbytes hidden: before imports
with job_log(smk.log[0]):
    from sidpipe.metrics import FIELDS, score_arm

    arm = {
        "subject": smk.wildcards.subject,
        "method": smk.wildcards.method,
        "descriptions": smk.wildcards.descriptions,
        "inference": smk.wildcards.inference,
    }
    samples_dir = Path(smk.input.samples).parent
    rows = score_arm(
        samples_dir=samples_dir,
        masks_dir=Path(smk.input.masks).parent,
        references_dir=Path(smk.input.references).parent,
        clip_model=smk.params.clip,
        dino_model=smk.params.dino,
        batch_size=smk.params.batch_size,
        **arm,
    )
    if "truth" in smk.input.keys():  # a world subject, and the world's judge is configured
        from sidpipe.world.measures import measure_arm

        rows += measure_arm(samples_dir, smk.input.truth, smk.params.judge, **arm)
    write_csv(smk.output[0], rows, FIELDS)
