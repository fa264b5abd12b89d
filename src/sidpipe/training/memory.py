"""Peak memory of a training job, counted without running it and without a GPU.

The job's device-side work runs on fake tensors (shapes and dtypes, no data, no compute): the
latent cache is filled with the VAE, the VAE leaves the device (as the loop moves it to the CPU;
with Custom Diffusion's resize augmentation it stays and encodes the batch's references at every
step), then two optimisation steps run with the loop's trainer, optimizer, gradient
checkpointing and autocast. A dispatch mode adds up the bytes of every live tensor storage and
keeps the peak: what `torch.cuda.max_memory_allocated` reports, less the caching allocator's
rounding and cuDNN's workspaces (keep a margin; the CUDA context is outside both). Mixed
precision is counted with CPU autocast at the same dtype (its cast lists are close to CUDA's).
The loss is `diffusion_loss`'s squared error without its per-part bookkeeping, which branches
on values fake tensors lack.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from sidpipe.training.base import prediction_target
from sidpipe.training.build import (
    MIXED_PRECISION,
    build_trainer,
    enable_gradient_checkpointing,
    make_optimizer,
)
from sidpipe.training.data import LatentSource


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storage (each storage once, however many views), and their peak.

    Counts the storages of every op's outputs while active, plus those given to `add`."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, size)

    def exclude(self, tensor: torch.Tensor) -> None:
        """Never count this tensor's storage (nor views of it): it lives elsewhere."""
        self._seen[tensor.untyped_storage()] = 0

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.add, out)
        return out


def components_from_configs(model: str) -> SimpleNamespace:
    """`load_sd_components`' namespace with the model's architecture and random weights: only
    its config files are read (call it inside the fake mode: no memory, no time)."""
    from sidpipe.io import expand_home

    model = expand_home(model)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    return SimpleNamespace(
        tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(model, subfolder="text_encoder")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(model, subfolder="vae")),
        unet=UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(model, subfolder="unet")
        ),
        noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler"),
    )


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    storages = {
        id(v.untyped_storage()): v.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    }
    return sum(storages.values())


def estimate_training_memory(
    build_components: Callable[[], SimpleNamespace],
    algorithm: str,
    settings: dict,
    resolution: int,
    identifier: str = "sks",
    class_name: str = "dog",
    n_references: int = 5,
    n_class_images: int = 200,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    use_8bit_adam: bool = False,
    fake: bool = True,
) -> dict[str, float | int]:
    """Peak bytes of `algorithm`'s training job on `build_components()` (a
    `load_sd_components`-like namespace, built inside the fake mode). `fake=False` runs the same
    on real tensors (slow at full size; used to check the fake count)."""
    # Non-fake inputs allowed: bitsandbytes keeps its quantization maps as real tensors.
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    enter = mode if mode is not None else contextlib.nullcontext()
    batch_size = int(settings.get("batch_size", 1))
    prior = bool(settings.get("prior_preservation", False))
    amp_dtype = MIXED_PRECISION[mixed_precision]
    with enter:
        c = build_components()
        trainer = build_trainer(algorithm, c, settings, identifier, class_name)
        groups = trainer.prepare()
        params = [p for group in groups for p in group["params"]]
        max_grad_norm = float(settings.get("max_grad_norm", trainer.max_grad_norm))
        if gradient_checkpointing:
            enable_gradient_checkpointing(c, trainer.trains_text_encoder)
        n_images = n_references + (n_class_images if prior else 0)
        pixels = torch.zeros(n_images, 3, resolution, resolution)
        ids = torch.zeros(2 * batch_size if prior else batch_size, 77, dtype=torch.long)
    # Outside the fake mode: bitsandbytes builds its quantization maps from real values.
    optimizer = make_optimizer(groups, settings, use_8bit_adam)
    tracker = LiveTensorBytes()
    with enter:
        for name in ("unet", "text_encoder", "vae"):
            module = getattr(c, name)
            for tensor in [*module.parameters(), *module.buffers()]:
                tracker.add(tensor)
        del module, tensor  # no reference may keep the VAE alive once it leaves the device
        weights = tracker.current
        # The loop keeps the pixels on the CPU and moves one VAE batch at a time to the device.
        tracker.exclude(pixels)
        vae = sum(t.untyped_storage().nbytes() for t in [*c.vae.parameters(), *c.vae.buffers()])
        with tracker:
            source = LatentSource(c.vae, pixels, flip=bool(settings.get("flip", False)))
        resize = trainer.resize_augmentation
        if resize:  # the augmentation encodes its rescaled references at every step
            vae = 0  # so the VAE stays among the weights on the device
        else:
            del source.vae, c.vae  # the loop moves the VAE to the CPU once the cache is full
            gc.collect()  # modules hold reference cycles
        after_cache = tracker.current
        autocast = torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None)
        activations = 0
        with tracker:
            for _ in range(2):  # the optimizer's state appears in the first step
                start = tracker.current
                index = torch.arange(len(ids)) % n_images
                latents = source.sample(index, torch.zeros(len(ids), dtype=torch.bool), None)
                if resize:  # the batch's references, rescaled and encoded afresh
                    fresh = torch.zeros(batch_size, 3, resolution, resolution)
                    latents[:batch_size] = source.sample_images(fresh, None)
                noise = torch.zeros_like(latents)
                timesteps = torch.zeros(len(ids), dtype=torch.long)
                with autocast:
                    hidden = c.text_encoder(ids).last_hidden_state
                    noisy = c.noise_scheduler.add_noise(latents, noise, timesteps)
                    pred = c.unet(noisy, timesteps, hidden).sample
                    target = prediction_target(c.noise_scheduler, latents, noise, timesteps)
                    loss = F.mse_loss(pred.float(), target.float())
                activations = max(activations, tracker.current - start)
                loss.backward()
                del hidden, noisy, pred, target, loss
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return {
            "peak_bytes": tracker.peak,
            # what the forward pass keeps for the backward (and autocast's weight copies)
            "activation_bytes": activations,
            "weights_bytes": weights,
            "latent_cache_bytes": after_cache - (weights - vae),
            "optimizer_state_bytes": _state_bytes(optimizer),
            "trainable_parameters": trainer.trained_parameter_count(params),
        }
