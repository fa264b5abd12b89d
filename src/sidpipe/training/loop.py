"""Stage `train`: fine-tune one method on one subject's references and their own descriptions.

The loop owns everything method-independent: data (`data.py`: cached latents/text), what
each step draws and its update (`step.py`), the optimizer and mixed precision (`build.py`),
checkpoints (`checkpoints.py`: a killed job resumes bit-exactly) and the outputs (`outputs.py`).
A `Trainer` (see `base.py`) decides what trains and how it is saved.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sidpipe.io import SidpipeError, log
from sidpipe.models import load_sd_components, pick_device
from sidpipe.training.augment import PREFIXES
from sidpipe.training.base import PLACEHOLDER
from sidpipe.training.build import (
    MIXED_PRECISION,
    build_trainer,
    check_settings,
    enable_gradient_checkpointing,
    make_optimizer,
)
from sidpipe.training.checkpoints import (
    CHECKPOINT_VERSION,
    TrainingInterrupted,
    load_latest,
    remove_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sigterm_flag,
    tensor_digest,
)
from sidpipe.training.data import (
    LatentSource,
    TextCache,
    TrainingSet,
    read_training_set,
    tokenize,
    warn_truncated,
)
from sidpipe.training.outputs import peak_memory, write_training_outputs
from sidpipe.training.step import draw_batch, seed_everything, update

# --- the loop -------------------------------------------------------------------------------


def train_subject(
    algorithm: str,
    settings: dict,
    base_model: str,
    references_dir: Path,
    descriptions_csv: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    identifier: str,
    class_name: str,
    class_images_dir: Path | None = None,
    masks_dir: Path | None = None,
    seed: int = 0,
    device: str = "auto",
    mixed_precision: str = "no",
    checkpoint_every: int = 100,
    gradient_checkpointing: bool = False,
    use_8bit_adam: bool = False,
    cache_latents: bool = True,
    stop_after: int | None = None,
    reference_subset: int | str | None = None,
) -> dict:
    """Train `algorithm` with `settings` on one subject; write weights/, training_log.csv,
    loss_curve.png and train_info.json into `out_dir` (atomically); return a summary.

    `reference_subset` trains on part of the references (a count or an image id: a
    single-reference experiment). `stop_after=k` saves a checkpoint after step k and returns
    early (a simulated kill); `cache_latents=False` re-encodes every image each step (for
    benchmarks only). A SIGTERM
    saves a checkpoint after the step in flight and raises `TrainingInterrupted`.
    """
    t_start = time.perf_counter()
    settings = dict(settings)
    check_settings(settings, class_images_dir, masks_dir, mixed_precision, checkpoint_every)
    steps = int(settings["steps"])
    batch_size = int(settings.get("batch_size", 1))
    prior = bool(settings.get("prior_preservation", False))
    masked = bool(settings.get("masked", False))
    flip = bool(settings.get("flip", False))
    prior_loss_weight = float(settings.get("prior_loss_weight", 1.0))

    dev = pick_device(device)
    amp_dtype = MIXED_PRECISION[mixed_precision]
    if amp_dtype is not None and dev.type != "cuda":
        log.warning(
            "mixed_precision=%s needs CUDA; training in float32 on %s", mixed_precision, dev
        )
        amp_dtype = None
    if dev.type == "cuda":
        # The whole job's peak (encoding the latent cache included) is what must fit the card.
        torch.cuda.reset_peak_memory_stats(dev)

    seed_everything(seed)
    c = load_sd_components(base_model, device=str(dev))
    trainer = build_trainer(algorithm, c, settings, identifier, class_name)
    if trainer.needs_masks and not masked:
        raise SidpipeError(
            f"{algorithm} with these settings needs the subject masks; set masked: true in the "
            "method's config entry (the masks come from segment_references)"
        )
    resize = trainer.resize_augmentation
    if resize and masked:
        raise SidpipeError(
            f"{algorithm}: the resize augmentation and masked: true do not go together (the "
            "augmentation's masks are the rescaled image's region); set resize_augmentation: "
            "false or masked: false in the method's config entry"
        )
    # Adapters (LoRA, ...) draw their initial weights from the global RNG: seeded above.
    param_groups = trainer.prepare()
    params = [p for group in param_groups for p in group["params"]]
    n_trainable = trainer.trained_parameter_count(params)
    max_grad_norm = float(settings.get("max_grad_norm", trainer.max_grad_norm))
    c.vae.eval()

    latent_factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
    data: TrainingSet = read_training_set(
        references_dir,
        descriptions_csv,
        masks_dir=masks_dir if masked else None,
        class_images_dir=class_images_dir if prior else None,
        resolution=settings.get("resolution"),
        latent_factor=latent_factor,
        reference_subset=reference_subset,
    )
    n_inst = len(data.image_ids)
    n_class = 0 if data.class_pixels is None else len(data.class_pixels)
    if prior and n_class == 0:
        raise SidpipeError(f"{class_images_dir}: no class images for prior preservation")
    captions = [trainer.caption(d) for d in data.descriptions]
    all_captions = captions + data.class_prompts
    # With the resize augmentation, each instance caption with every prefix it may get.
    variants = [p + caption for caption in captions for p in PREFIXES] if resize else captions
    warn_truncated(c.tokenizer, variants + data.class_prompts)
    all_ids = tokenize(c.tokenizer, all_captions)
    resized_ids = None
    if resize:
        resized_ids = tokenize(c.tokenizer, variants).view(n_inst, len(PREFIXES), -1)
    pixels = (
        data.pixels if data.class_pixels is None else torch.cat([data.pixels, data.class_pixels])
    )

    if gradient_checkpointing:
        enable_gradient_checkpointing(c, trainer.trains_text_encoder)

    def encode_text(input_ids: torch.Tensor) -> torch.Tensor:
        return trainer.encode_text(input_ids.to(dev))

    t_cache = time.perf_counter()
    latents_source = LatentSource(c.vae, pixels, flip=flip, cache=cache_latents, device=dev)
    text_cache = None
    if not trainer.trains_text_encoder and cache_latents:
        text_cache = TextCache(encode_text, all_captions, all_ids)
    if cache_latents and dev.type == "cuda" and not resize:
        # Cached: the frozen encoders are no longer needed on the GPU (the resize
        # augmentation encodes its rescaled references at every step).
        c.vae.to("cpu")
        if text_cache is not None:
            c.text_encoder.to("cpu")
    cache_seconds = time.perf_counter() - t_cache

    optimizer = make_optimizer(param_groups, settings, use_8bit_adam)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    generator = torch.Generator("cpu").manual_seed(seed)

    fingerprint = {
        "algorithm": algorithm,
        "settings": {k: v for k, v in sorted(settings.items()) if k != "steps"},
        "base_model": str(base_model),
        "identifier": identifier,
        "class_name": class_name,
        "seed": seed,
        "image_ids": data.image_ids,
        "captions": all_captions,
        # The optimizer's state only loads into the same optimizer; a replaced reference,
        # class image or mask under the same name is new data.
        "use_8bit_adam": use_8bit_adam,
        "data": tensor_digest(pixels, data.masks),
        # A method's default, so not always in `settings`; only where on, so the other
        # methods' checkpoints from before it existed still resume.
        **({"resize_augmentation": True} if resize else {}),
    }
    rows: list[dict] = []
    start_step, seconds_before = 0, 0.0
    state = load_latest(checkpoint_dir, fingerprint, steps)
    if state is not None:
        trainer.load_trainable_state(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(generator, state["rng"])
        rows, start_step, seconds_before = state["log"], state["step"], state["seconds"]
        del state
    resumed_from = start_step or None

    log.info(
        "%s on %d references (+%d class images), %d steps of batch %d on %s; "
        "%d trainable parameters; token %r in training, %r in prompts",
        algorithm,
        n_inst,
        n_class,
        steps,
        batch_size,
        dev,
        n_trainable,
        trainer.caption(PLACEHOLDER),
        trainer.prompt_token(),
    )
    if resize:
        log.info("resize augmentation on: references rescaled at every step (augment.py)")
    draw = {
        "seed": seed,
        "batch_size": batch_size,
        "prior": prior,
        "flip": flip,
        "masked": masked,
        "num_train_timesteps": int(c.noise_scheduler.config.num_train_timesteps),
        "device": dev,
        "resized_ids": resized_ids,
        "latent_size": data.pixels.shape[-1] // latent_factor,
    }
    log_every = max(1, min(100, steps // 10))
    autocast = (
        torch.autocast("cuda", dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )

    def checkpoint(step: int, elapsed: float) -> None:
        save_checkpoint(
            checkpoint_dir,
            step,
            {
                "version": CHECKPOINT_VERSION,
                "step": step,
                "fingerprint": fingerprint,
                "trainable": trainer.trainable_state(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(generator),
                "log": rows,
                "seconds": elapsed,
            },
        )

    t_loop = time.perf_counter()
    progress = tqdm(
        range(start_step, steps),
        initial=start_step,
        total=steps,
        desc=f"train {algorithm}",
        file=sys.stderr,
    )
    # SIGTERM or SIGINT from here on: checkpoint after the step in flight (nothing to save
    # before).
    with sigterm_flag() as interrupt:
        for index in progress:
            step = index + 1
            idx, batch, noise, timesteps = draw_batch(
                index, data, latents_source, all_ids, generator, **draw
            )
            with autocast:
                hidden = text_cache(idx) if text_cache is not None else encode_text(batch.input_ids)
                loss, parts = trainer.compute_loss(
                    batch, hidden, noise, timesteps, prior_loss_weight
                )
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SidpipeError(
                    f"{algorithm}: the loss is {value} at step {step} of {steps}; training "
                    "diverged (lower the learning rate, or use bf16 instead of fp16 mixed "
                    "precision)"
                )
            update(loss, optimizer, scaler, params, max_grad_norm)
            trainer.after_step()

            rows.append(
                {
                    "step": step,
                    "loss": value,
                    "lr": optimizer.param_groups[0]["lr"],
                    "instance_loss": parts.get("instance_loss", ""),
                    "prior_loss": parts.get("prior_loss", ""),
                    **{name: parts.get(name, "") for name in trainer.log_fields},
                }
            )
            progress.set_postfix(loss=f"{value:.4f}", refresh=False)
            if step % log_every == 0 or step == steps:
                log.info("step %d/%d loss %.5f %s", step, steps, value, parts)
            elapsed = seconds_before + time.perf_counter() - t_loop
            stopping = stop_after is not None and stop_after <= step < steps
            signalled = interrupt["signal"] is not None and step < steps
            # Not at the last step: the final weights follow at once, and a full fine-tune's
            # checkpoint is GBs.
            periodic = step % checkpoint_every == 0 and step < steps
            if periodic or stopping or signalled:
                checkpoint(step, elapsed)
            if signalled:
                progress.close()
                name = signal.Signals(interrupt["signal"]).name
                raise TrainingInterrupted(
                    f"{algorithm}: {name} received; stopped after step {step} of {steps} with a "
                    f"checkpoint in {checkpoint_dir}; rerun the job to resume from it"
                )
            if stopping:
                progress.close()
                log.info("stopping after step %d as asked (stop_after); rerun to resume", step)
                return {"finished": False, "steps": step, "final_loss": value}
    progress.close()

    run_seconds = time.perf_counter() - t_loop
    steps_run = steps - start_step
    summary = {
        "finished": True,
        "steps": steps,
        "final_loss": rows[-1]["loss"] if rows else None,
        "seconds": round(seconds_before + run_seconds, 3),
        "steps_per_second": round(steps_run / run_seconds, 4)
        if steps_run and run_seconds
        else None,
        "setup_seconds": round(t_loop - t_start, 3),
        "cache_seconds": round(cache_seconds, 3),
        "peak_memory_bytes": peak_memory(dev),
    }
    info = {
        "algorithm": algorithm,
        "settings": settings,
        "identifier": identifier,
        "token": trainer.prompt_token(),
        "class_name": class_name,
        "base_model": str(base_model),
        "seed": seed,
        "device": str(dev),
        "mixed_precision": mixed_precision if amp_dtype is not None else "no",
        "gradient_checkpointing": gradient_checkpointing,
        "use_8bit_adam": use_8bit_adam,
        "checkpoint_every": checkpoint_every,
        "cache_latents": cache_latents,
        "resize_augmentation": resize,
        "resumed_from_step": resumed_from,
        "reference_subset": reference_subset,
        "trainable_parameters": n_trainable,
        "images": [
            {"image_id": i, "description": d, "caption": cap}
            for i, d, cap in zip(data.image_ids, data.descriptions, captions, strict=True)
        ],
        "class_images": n_class,
        "class_prompts": sorted(set(data.class_prompts)),
        **summary,
    }
    write_training_outputs(out_dir, trainer, algorithm, rows, info)
    # Finished: the (possibly GB-sized) checkpoints are no longer needed.
    remove_checkpoints(checkpoint_dir)
    with contextlib.suppress(OSError):
        Path(checkpoint_dir).rmdir()
    log.info(
        "%s finished: %d steps in %.1f s (%.2f steps/s), final loss %.5f",
        algorithm,
        steps,
        summary["seconds"],
        summary["steps_per_second"] or 0.0,
        summary["final_loss"] or float("nan"),
    )
    return summary
