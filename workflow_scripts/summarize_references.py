"""Snakemake adapter: rule summarize_references."""

from sidpipe.io import job_log
from sidpipe.references import summarize_manifests

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    summarize_manifests(list(smk.input.manifests), smk.params.subjects, smk.output[0])
