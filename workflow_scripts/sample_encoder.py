"""Snakemake adapter: rule sample_encoder (BLIP-Diffusion, ELITE, the base model)."""

from pathlib import Path

from sidpipe.io import job_log
from sidpipe.models import setup_job

smk = snakemake  # noqa: F821
setup_job(smk.threads)  # torch on the job's threads, bitsandbytes hidden: before imports
with job_log(smk.log[0]):
    from sidpipe.encoders.sampling import sample_encoder_arm
    from sidpipe.sample_grids import write_grids

    out_dir = Path(smk.output.manifest).parent
    rows = sample_encoder_arm(
        out_dir=out_dir,
        references_dir=(
            Path(smk.input.references).parent if "references" in smk.input.keys() else None
        ),
        masks_dir=Path(smk.input.masks).parent if "masks" in smk.input.keys() else None,
        **smk.params.settings,
    )
    write_grids(out_dir, rows, Path(smk.output.grid))
