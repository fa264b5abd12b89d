"""Snakemake adapter: rule sample."""

import json
from pathlib import Path

from sidpipe.io import job_log, read_csv

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    from sidpipe.sampling import (
        expand_prompts,
        negative_prompt_from_descriptions,
        sample_arm,
        write_grids,
    )

    settings = dict(smk.params.settings)
    token = json.loads(Path(smk.input.info).read_text())["token"]
    prompts = expand_prompts(settings.pop("templates"), settings.pop("class_name"), token)
    negative = None
    if "negative" in smk.input.keys():
        texts = [row["description"] for row in read_csv(smk.input.negative)]
        negative = negative_prompt_from_descriptions(texts, smk.params.settings["class_name"])
    out_dir = Path(smk.output.manifest).parent
    rows = sample_arm(
        out_dir=out_dir,
        prompts=prompts,
        weights_dir=Path(smk.input.weights),
        token=token,
        negative_prompt=negative,
        **settings,
    )
    write_grids(out_dir, rows, Path(smk.output.grid))
