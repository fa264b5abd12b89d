"""Snakemake adapter: rule build_tiny_models."""

from pathlib import Path

from sidpipe.config import tokenizer_corpus
from sidpipe.io import job_log

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    from sidpipe.models import build_tiny_models  # imported here so library warnings reach the log

    corpus = tokenizer_corpus(list(smk.input.corpus), smk.params.classes, smk.params.identifier)
    build_tiny_models(
        Path(smk.output[0]), corpus, seed=smk.params.seed, resolution=smk.params.resolution
    )
