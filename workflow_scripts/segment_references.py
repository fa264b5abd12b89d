"""Snakemake adapter: rule segment_references."""

from pathlib import Path

from sidpipe.io import job_log
from sidpipe.models import setup_job

smk = snakemake  # noqa: F821
setup_job(smk.threads)  # torch on the job's threads, bitsandbytes hidden: before imports
with job_log(smk.log[0]):
    from sidpipe.masks import segment_references, write_overlay_grid

    out_dir = Path(smk.output.manifest).parent
    rows = segment_references(
        references_dir=Path(smk.input.references).parent,
        out_dir=out_dir,
        subject=smk.wildcards.subject,
        **smk.params.settings,
    )
    write_overlay_grid(out_dir, rows, Path(smk.output.overlays))
