"""One training step's pieces: which images a step draws (a pure function of the seed and the
step, so a resumed job needs no iterator state), its noise, timesteps and flips, and the update.
`loop.train_subject` calls them once per step."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from sidpipe.training.augment import resize_batch
from sidpipe.training.base import Batch
from sidpipe.training.data import LatentSource, TrainingSet

# --- randomness -----------------------------------------------------------------------------


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def stream_indices(n: int, seed: int, step: int, batch_size: int, salt: int) -> list[int]:
    """Images for `step`: positions step*B .. step*B+B-1 of an endless stream that visits all
    `n` images once per epoch in a fresh seeded order. A pure function of its arguments, so a
    resumed job needs no iterator state."""
    out, cache = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(position, n)
        if epoch not in cache:
            generator = torch.Generator().manual_seed(_derived_seed(seed, salt, epoch))
            cache[epoch] = torch.randperm(n, generator=generator).tolist()
        out.append(cache[epoch][k])
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- one step -------------------------------------------------------------------------------


def draw_batch(
    index: int,
    data: TrainingSet,
    latents: LatentSource,
    all_ids: torch.Tensor,
    generator: torch.Generator,
    *,
    seed: int,
    batch_size: int,
    prior: bool,
    flip: bool,
    masked: bool,
    num_train_timesteps: int,
    device: torch.device,
    resized_ids: torch.Tensor | None = None,
    latent_size: int = 0,
) -> tuple[torch.Tensor, Batch, torch.Tensor, torch.Tensor]:
    """Step `index`'s images (instance images, then as many class images with prior
    preservation), their flips, noise and timesteps, drawn from `generator` in a fixed order
    so that a resumed run draws what the uninterrupted one did. Returns the images' indices
    (the text cache's rows), the batch, the noise and the timesteps.

    `resized_ids` (instance images x caption prefixes x tokens) turns on the resize
    augmentation: the instance images are rescaled, encoded afresh and captioned with their
    prefix (`augment.PREFIXES`); their loss masks are `latent_size` square."""
    n_inst = len(data.image_ids)
    chosen = stream_indices(n_inst, seed, index, batch_size, salt=0)
    is_prior = [False] * batch_size
    if prior:
        n_class = len(data.class_pixels)
        chosen += [n_inst + i for i in stream_indices(n_class, seed, index, batch_size, 1)]
        is_prior += [True] * batch_size
    idx = torch.tensor(chosen)
    if flip:
        flipped = torch.rand(len(chosen), generator=generator) < 0.5
    else:
        flipped = torch.zeros(len(chosen), dtype=torch.bool)
    input_ids, masks = all_ids[idx], None
    if resized_ids is not None:  # never with `masked` (train_subject refuses the pair)
        sampled, input_ids, masks = _resized(
            idx, flipped, data, latents, resized_ids, all_ids, generator, batch_size, latent_size
        )
        sampled, masks = sampled.to(device), masks.to(device)
    else:
        sampled = latents.sample(idx, flipped, generator).to(device)
    noise = torch.randn(sampled.shape, generator=generator).to(device)
    timesteps = torch.randint(0, num_train_timesteps, (len(chosen),), generator=generator)
    if masked:
        inst = data.masks[idx[:batch_size]]
        inst = torch.where(flipped[:batch_size, None, None, None], inst.flip(-1), inst)
        # Class images keep the plain loss; their mask rows are never read.
        masks = torch.cat([inst, torch.ones_like(inst)]) if prior else inst
        masks = masks.to(device)
    batch = Batch(
        latents=sampled,
        input_ids=input_ids.to(device),
        is_prior=torch.tensor(is_prior, device=device),
        masks=masks,
        masks_per_image=resized_ids is not None,
    )
    return idx, batch, noise, timesteps.to(device)


def _resized(
    idx: torch.Tensor,
    flipped: torch.Tensor,
    data: TrainingSet,
    latents: LatentSource,
    resized_ids: torch.Tensor,
    all_ids: torch.Tensor,
    generator: torch.Generator,
    batch_size: int,
    latent_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The resize augmentation's latents, caption ids and loss masks for a batch whose first
    `batch_size` images are references (rescaled) and the rest class images (whole, cached;
    their masks are all ones)."""
    inst, rest = idx[:batch_size], idx[batch_size:]
    images, masks, prefixes = resize_batch(
        data.pixels[inst], flipped[:batch_size], latent_size, generator
    )
    sampled = latents.sample_images(images, generator)
    ids = resized_ids[inst, torch.tensor(prefixes)]
    if len(rest):
        sampled = torch.cat([sampled, latents.sample(rest, flipped[batch_size:], generator)])
        ids = torch.cat([ids, all_ids[rest]])
        masks = torch.cat([masks, torch.ones(len(rest), *masks.shape[1:])])
    return sampled, ids, masks


def update(
    loss: torch.Tensor,
    optimizer: Any,
    scaler: torch.amp.GradScaler | None,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
) -> None:
    """Backward, clip the gradients' norm (if > 0), step and clear: with fp16 through the
    gradient scaler, unscaled before clipping."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
