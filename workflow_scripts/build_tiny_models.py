"""Snakemake adapter: rule build_tiny_models."""

from pathlib import Path

from sidpipe.config import tokenizer_corpus
from sidpipe.io import job_log
from sidpipe.models import setup_job

smk = snakemake  # noqa: F821
setup_job(smk.threads)  # torch on the job's threads, bitsandbytes hidden: before imports
with job_log(smk.log[0]):
    from sidpipe.tiny_models import build_tiny_models  # here: library warnings reach the log

    corpus = tokenizer_corpus(list(smk.input.corpus), smk.params.classes, smk.params.identifier)
    build_tiny_models(
        Path(smk.output[0]), corpus, seed=smk.params.seed, resolution=smk.params.resolution
    )
