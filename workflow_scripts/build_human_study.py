"""Snakemake adapter: rule human_study."""

from sidpipe.human_study.build import build_study
from sidpipe.io import job_log

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    settings = dict(smk.params.settings)
    pairs = [(arm, subject) for subject in settings["subjects"] for arm in settings["arms"]]
    build_study(
        smk.output.site,
        **settings,
        sample_manifests=dict(zip(pairs, smk.input.samples, strict=True)),
        reference_manifests=dict(zip(settings["subjects"], smk.input.references, strict=True)),
        design_csv=smk.output.design,
        responses=smk.params.responses,
    )
