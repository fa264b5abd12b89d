"""Snakemake adapter: rules train and train_full_finetune."""

from pathlib import Path

from sidpipe.io import job_log
from sidpipe.models import setup_job

smk = snakemake  # noqa: F821
setup_job(smk.threads)  # torch on the job's threads, bitsandbytes hidden: before imports
with job_log(smk.log[0]):
    from sidpipe.training.loop import train_subject

    run_dir = Path(smk.output.info).parent
    train_subject(
        references_dir=Path(smk.input.references).parent,
        descriptions_csv=Path(smk.input.descriptions),
        class_images_dir=Path(smk.input.class_images).parent
        if "class_images" in smk.input.keys()
        else None,
        masks_dir=Path(smk.input.masks).parent if "masks" in smk.input.keys() else None,
        out_dir=run_dir,
        # outside the outputs: Snakemake keeps it when a job dies, so the rerun resumes
        checkpoint_dir=run_dir.with_name(run_dir.name + ".checkpoints"),
        **smk.params.settings,
    )
