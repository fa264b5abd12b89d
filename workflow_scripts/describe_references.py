"""Snakemake adapter: rule describe_references."""

from pathlib import Path

from sidpipe.io import job_log

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    from sidpipe.descriptions.stage import describe_references

    describe_references(
        references_dir=Path(smk.input.references).parent,
        out_csv=Path(smk.output[0]),
        cache_dir=Path("results/descriptions/cache"),
        subject=smk.wildcards.subject,
        description_set=smk.wildcards.descriptions,
        **smk.params.settings,
    )
