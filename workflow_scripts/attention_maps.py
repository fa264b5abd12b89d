"""Snakemake adapter: rule attention_maps."""

from pathlib import Path

from sidpipe.io import job_log

smk = snakemake  # noqa: F821
with job_log(smk.log[0]):
    from sidpipe.attention import attention_for_arm, write_overlay_grid
    from sidpipe.sampling import arm_prompts

    settings = dict(smk.params.settings)
    negative_csv = smk.input.negative if "negative" in smk.input.keys() else None
    token, prompts, negative = arm_prompts(
        settings.pop("templates"),
        settings["class_name"],
        smk.input.info,
        negative_csv,
        settings["base_model"],
    )
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
