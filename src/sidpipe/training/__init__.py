"""Personalization methods trained on per-image descriptions (see `base.Trainer`)."""

from __future__ import annotations

import importlib

from sidpipe.training.base import Trainer

# algorithm (config `methods.*.algorithm`) -> (module, class); imported lazily (heavy deps).
TRAINERS: dict[str, tuple[str, str]] = {
    "dreambooth": ("dreambooth", "DreamBoothTrainer"),
    "dreambooth_lora": ("lora", "LoraTrainer"),
    "custom_diffusion": ("custom_diffusion", "CustomDiffusionTrainer"),
    "svdiff": ("svdiff", "SVDiffTrainer"),
    "textual_inversion": ("textual_inversion", "TextualInversionTrainer"),
    "lego": ("lego", "LegoTrainer"),
    "sefi_ide": ("sefi_ide", "SeFiIdeTrainer"),
}


def trainer_class(algorithm: str) -> type[Trainer]:
    """The Trainer subclass of an algorithm name."""
    if algorithm not in TRAINERS:
        raise KeyError(f"unknown algorithm {algorithm!r}; known: {', '.join(sorted(TRAINERS))}")
    module, name = TRAINERS[algorithm]
    return getattr(importlib.import_module(f"sidpipe.training.{module}"), name)
