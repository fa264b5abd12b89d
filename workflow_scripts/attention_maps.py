"""Snakemake adapter: rule attention_maps."""

import json
from pathlib import Path

from sidpipe.io import job_log, read_csv

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    from sidpipe.attention import attention_for_arm, write_overlay_grid
    from sidpipe.sampling import expand_prompts, negative_prompt_from_descriptions

    settings = dict(smk.params.settings)
    token = json.loads(Path(smk.input.info).read_text())["token"]
    class_name = settings["class_name"]
    prompts = expand_prompts(settings.pop("templates"), class_name, token)
    negative = None
    if "negative" in smk.input.keys():
        texts = [row["description"] for row in read_csv(smk.input.negative)]
        negative = negative_prompt_from_descriptions(texts, class_name)
    out_dir = Path(smk.output.table).parent
    rows = attention_for_arm(
        out_dir=out_dir,
        prompts=prompts,
        weights_dir=Path(smk.input.weights),
        token=token,
        negative_prompt=negative,
        **settings,
    )
    write_overlay_grid(out_dir, rows, Path(smk.output.grid))
