"""Snakemake adapter: rule download_dataset."""

from pathlib import Path

from sidpipe.download import fetch_dataset
from sidpipe.io import job_log

with job_log(snakemake.log[0]):  # noqa: F821
    fetch_dataset(
        name=snakemake.wildcards.dataset,  # noqa: F821
        downloads=snakemake.params.downloads,  # noqa: F821
        dest=Path(snakemake.output.folder),  # noqa: F821
        manifest=Path(snakemake.output.manifest),  # noqa: F821
        timeout=float(snakemake.params.timeout),  # noqa: F821
    )
