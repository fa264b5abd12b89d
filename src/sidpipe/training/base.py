"""The contract between the training loop and the personalization methods.

A method (`Trainer` subclass) decides what trains, how `[V]` becomes text, and how its result is
saved and loaded back over a base pipeline. The loop (`sidpipe.training.loop`) owns data,
latents, noise, optimizer, checkpoints and logging, and calls `diffusion_loss` for every step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

PLACEHOLDER = "[V]"


@dataclass
class Batch:
    """One optimisation step's inputs, already on the device.

    latents: (B, 4, h, w) VAE latents times the VAE scaling factor.
    input_ids: (B, 77) token ids of each image's own caption.
    is_prior: (B,) True for class (prior-preservation) images.
    masks: (B, 1, h, w) subject masks at latent resolution in [0, 1], or None (unmasked loss).
    masks_per_image: the instance loss averages each image's masked mean (Custom Diffusion's
    resize augmentation, whose masks are the rescaled images' regions), not all masked cells.
    """

    latents: torch.Tensor
    input_ids: torch.Tensor
    is_prior: torch.Tensor
    masks: torch.Tensor | None = None
    masks_per_image: bool = False


def prediction_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict, read from the scheduler config (never assumed)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r} in the scheduler config")


def diffusion_loss(
    unet: torch.nn.Module,
    scheduler: Any,
    batch: Batch,
    encoder_hidden_states: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prior_loss_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DreamBooth's objective: instance MSE (mask-weighted when masks are given) plus
    `prior_loss_weight` x class-image MSE. Returns the loss and its parts for the log."""
    noisy = scheduler.add_noise(batch.latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states).sample
    target = prediction_target(scheduler, batch.latents, noise, timesteps)
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    instance = ~batch.is_prior
    parts: dict[str, float] = {}
    loss = pred.new_zeros((), dtype=torch.float32)
    if instance.any():
        err = error[instance]
        if batch.masks is not None and batch.masks_per_image:
            # Custom Diffusion's references: each image's mean over its region, then their
            # mean. Over the 4 latent channels too: diffusers' script divides by the 1-channel
            # mask's sum, which weighs the instance term 4x against the prior term; the
            # official code masks every image alike, so its balance stays 1:1, as here.
            weight = batch.masks[instance].expand_as(err)
            per_image = (err * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3)).clamp_min(1e-8)
            inst = per_image.mean()
        elif batch.masks is not None:
            # Break-a-Scene style: only the subject's pixels teach [V].
            weight = batch.masks[instance].expand_as(err)
            inst = (err * weight).sum() / weight.sum().clamp_min(1e-8)
        else:
            inst = err.mean()
        loss = loss + inst
        parts["instance_loss"] = float(inst.detach())
    if batch.is_prior.any():
        prior = error[batch.is_prior].mean()
        loss = loss + prior_loss_weight * prior
        parts["prior_loss"] = float(prior.detach())
    return loss, parts


def train_rows(weight: torch.Tensor, rows: list[int]) -> None:
    """Let only `weight[rows]` (new tokens' embeddings) get a gradient: the other rows' are
    zeroed in the backward pass, so they stay out of the optimizer's moments and the
    gradient clipping (AdamW's weight decay still touches them: see `FrozenRows`)."""
    only_rows = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    only_rows[rows] = 1.0
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * only_rows.to(grad.dtype))


def train_one_row(weight: torch.Tensor, row: int) -> None:
    """`train_rows` for one token's row."""
    train_rows(weight, [row])


class FrozenRows:
    """The embedding rows that must not change while `trained` rows train: `restore` puts them
    back after an optimizer step (AdamW's weight decay shrinks every row)."""

    def __init__(self, weight: torch.Tensor, trained: list[int]) -> None:
        self.frozen = weight.detach().clone()
        self.keep = torch.ones(len(weight), dtype=torch.bool, device=weight.device)
        self.keep[trained] = False

    def restore(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            weight[self.keep] = self.frozen[self.keep]


class Trainer(ABC):
    """One personalization method. Subclasses set `algorithm` and implement the hooks.

    `components` is `sidpipe.models.load_sd_components(...)`'s namespace (tokenizer,
    text_encoder, vae, unet, noise_scheduler); `settings` is the method's config entry.
    """

    algorithm: str = ""
    #: weights file(s) the method writes; the loop checks they exist after `save`.
    weight_files: tuple[str, ...] = ()
    #: gradient-norm clipping, as the method's reference script does (0: none); a method
    #: setting `max_grad_norm` overrides it.
    max_grad_norm: float = 1.0

    def __init__(
        self, components: SimpleNamespace, settings: dict, identifier: str, class_name: str
    ) -> None:
        self.c = components
        self.settings = settings
        self.identifier = identifier
        self.class_name = class_name

    @property
    def trains_text_encoder(self) -> bool:
        """False lets the loop cache text embeddings (the text encoder is then frozen)."""
        return False

    def caption(self, description: str) -> str:
        """The text the model sees for a description holding the `[V]` placeholder."""
        return description.replace(PLACEHOLDER, self.identifier)

    def prompt_token(self) -> str:
        """What `[V]` becomes in the prompts the trained arm is sampled and mapped with
        (train_info.json `token`): by default what it became in training."""
        return self.caption(PLACEHOLDER)

    @abstractmethod
    def prepare(self) -> list[dict]:
        """Freeze the base model, make this method's parameters trainable (adding tokens or
        adapters if needed) and return optimizer parameter groups, each with its `lr`."""

    def trained_parameter_count(self, params: list[torch.Tensor]) -> int:
        """How many numbers training changes (for train_info.json); `params` are the
        optimizer's. A method that trains one row of a matrix says so."""
        return sum(p.numel() for p in {id(p): p for p in params}.values())

    #: extra loss parts this method reports (columns of training_log.csv after the standard ones)
    log_fields: tuple[str, ...] = ()
    #: True: the method needs the subject masks (`masked: true` in its settings).
    needs_masks: bool = False

    @property
    def resize_augmentation(self) -> bool:
        """True: the loop rescales each reference at every step (`sidpipe.training.augment`,
        Custom Diffusion's reference augmentation) instead of using it whole."""
        return False

    def compute_loss(
        self,
        batch: Batch,
        encoder_hidden_states: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        prior_loss_weight: float,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The step's loss and its parts for the log; `diffusion_loss` unless a method adds
        terms of its own (Lego, SeFi-IDE). `batch.input_ids` are the captions' token ids."""
        return diffusion_loss(
            self.c.unet,
            self.c.noise_scheduler,
            batch,
            encoder_hidden_states,
            noise,
            timesteps,
            prior_loss_weight,
        )

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Caption token ids -> the UNet's encoder_hidden_states (a method whose text
        conditioning is not the text encoder's last hidden state overrides it)."""
        return self.c.text_encoder(input_ids).last_hidden_state

    def after_step(self) -> None:  # noqa: B027 (optional hook)
        """Called after each optimizer step (e.g. to keep non-trained embedding rows fixed)."""

    @abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything that training changes, for checkpoints (CPU tensors)."""

    @abstractmethod
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `trainable_state` (resuming from a checkpoint)."""

    @abstractmethod
    def save(self, out_dir: Path) -> None:
        """Write the final weights into `out_dir` so the standard diffusers API (or this
        method's documented `load_into`) applies them over the base model."""

    @staticmethod
    @abstractmethod
    def load_into(pipe: Any, weights_dir: Path) -> Any:
        """Apply weights written by `save` to a base pipeline (in place); return it."""

    @classmethod
    def load_pipeline(cls, base_model: str, weights_dir: Path, dtype: str, device: str) -> Any:
        """The base model's SD pipeline with these weights applied (sampling). A method whose
        weights replace whole modules overrides it to skip loading the base model's."""
        from sidpipe.models import load_sd_pipeline

        pipe = load_sd_pipeline(base_model, dtype, device)
        return cls.load_into(pipe, Path(weights_dir)) or pipe
