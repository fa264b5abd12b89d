"""Snakemake adapter: rules sample and sample_and_attention (one pipeline load for both)."""

from pathlib import Path

from sidpipe.io import job_log
from sidpipe.models import setup_job

smk = snakemake  # noqa: F821
setup_job(smk.threads)  # torch on the job's threads, bitsandbytes hidden: before imports
with job_log(smk.log[0]):
    from sidpipe.sample_grids import write_grids
    from sidpipe.sampling import LazyPipeline, arm_prompts, sample_arm

    settings = dict(smk.params.settings)
    negative_csv = smk.input.negative if "negative" in smk.input.keys() else None
    token, prompts, negative = arm_prompts(
        settings.pop("templates"),
        settings.pop("class_name"),
        smk.input.info,
        negative_csv,
        settings["base_model"],
        settings.pop("concept", None),
    )
    arm = {"token": token, "negative_prompt": negative, "weights_dir": Path(smk.input.weights)}
    model = {key: settings[key] for key in ("base_model", "algorithm", "dtype")}
    pipe = LazyPipeline(weights_dir=arm["weights_dir"], **model)  # loaded when first needed
    out_dir = Path(smk.output.manifest).parent
    rows = sample_arm(out_dir=out_dir, prompts=prompts, loader=pipe, **arm, **settings)
    write_grids(out_dir, rows, Path(smk.output.grid))
    if "attention" in smk.params.keys():  # rule sample_and_attention: same pipeline
        from sidpipe.attention import attention_for_arm, write_overlay_grid

        maps_dir = Path(smk.output.attention).parent
        attention = dict(smk.params.attention)
        maps = attention_for_arm(out_dir=maps_dir, prompts=prompts, loader=pipe, **arm, **attention)
        write_overlay_grid(maps_dir, maps, Path(smk.output.attention_grid))
