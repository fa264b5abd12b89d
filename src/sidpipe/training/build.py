"""What a training run is made of, built from its settings: the settings checked, the method's
`Trainer`, the optimizer, mixed precision and gradient checkpointing. Shared by the loop and
the memory estimate (`memory.py`), which must build exactly what the loop trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sidpipe.io import SidpipeError
from sidpipe.models import import_bitsandbytes
from sidpipe.training import trainer_class
from sidpipe.training.base import Trainer

MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# AdamW as in diffusers' DreamBooth / LoRA / TI scripts; a method's settings may override.
ADAM = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}


def check_settings(
    settings: dict,
    class_images_dir: Path | None,
    masks_dir: Path | None,
    mixed_precision: str,
    checkpoint_every: int,
) -> None:
    """Raise on settings a run cannot start with, saying which and how to fix them."""
    steps = settings.get("steps")
    if not isinstance(steps, int) or steps < 1:
        raise SidpipeError(f"method setting steps must be a positive integer, got {steps!r}")
    if int(settings.get("batch_size", 1)) < 1:
        raise SidpipeError(f"batch_size must be at least 1, got {settings['batch_size']}")
    if settings.get("prior_preservation") and class_images_dir is None:
        raise SidpipeError(
            "prior_preservation is on but no class images were given (class_images_dir); "
            "generate them with the class_images stage or set prior_preservation: false"
        )
    if settings.get("masked") and masks_dir is None:
        raise SidpipeError(
            "masked is on but no masks were given (masks_dir); run segment_references for "
            "this subject or set masked: false"
        )
    if mixed_precision not in MIXED_PRECISION:
        raise SidpipeError(
            f"mixed_precision {mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}"
        )
    if checkpoint_every < 1:
        raise SidpipeError(f"checkpoint_every must be at least 1, got {checkpoint_every}")


def make_optimizer(param_groups: list[dict], settings: dict, use_8bit_adam: bool) -> Any:
    """AdamW over the trained parameter groups (bitsandbytes' 8-bit AdamW if asked for)."""
    kwargs = {
        "betas": tuple(settings.get("adam_betas", ADAM["betas"])),
        "eps": float(settings.get("adam_epsilon", ADAM["eps"])),
        "weight_decay": float(settings.get("adam_weight_decay", ADAM["weight_decay"])),
    }
    if not use_8bit_adam:
        # Fused: one kernel over all tensors instead of a Python loop per tensor (the CPU
        # default; 5x faster on the tiny models, where the optimizer was a fifth of a step).
        devices = {p.device.type for group in param_groups for p in group["params"]}
        fused = devices <= {"cpu", "cuda"}
        return torch.optim.AdamW(param_groups, fused=fused, foreach=not fused, **kwargs)
    try:
        bnb = import_bitsandbytes()  # the only user of bitsandbytes: jobs hide it otherwise
    except ImportError as err:
        raise SidpipeError(
            "training.use_8bit_adam is true but bitsandbytes is not installed; install it "
            "(pinned in requirements.txt and envs/) or set use_8bit_adam: false"
        ) from err
    return bnb.optim.AdamW8bit(param_groups, **kwargs)


def enable_gradient_checkpointing(components: Any, text_encoder: bool) -> None:
    """Recompute activations in the backward pass instead of keeping them (UNet, and the text
    encoder when it trains): less memory for about a third more compute."""
    components.unet.enable_gradient_checkpointing()
    if text_encoder:
        # transformers 5 renamed it; the old name still works but warns.
        enable = getattr(components.text_encoder, "activation_checkpointing_enable", None)
        (enable or components.text_encoder.gradient_checkpointing_enable)()


def build_trainer(
    algorithm: str, components: Any, settings: dict, identifier: str, class_name: str
) -> Trainer:
    """The method's Trainer over the loaded SD components; an unknown algorithm is a clear
    error."""
    try:
        cls = trainer_class(algorithm)
    except KeyError as err:
        raise SidpipeError(str(err.args[0])) from None
    return cls(components, settings, identifier, class_name)
