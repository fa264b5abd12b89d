"""Snakemake adapter: rule plan_experiments."""

from sidpipe.io import job_log, log, write_csv

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    rows = smk.params.rows
    write_csv(smk.output[0], rows, list(rows[0]))
    log.info("%d arm x subject rows written to %s", len(rows), smk.output[0])
