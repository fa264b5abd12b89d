"""SVDiff (Han et al., 2023): spectral shifts, as svdiff-pytorch (mkshing) trains them.

Every weight of the UNet's (and, with `train_text_encoder`, the text encoder's) `Linear`,
`Conv2d`, `Embedding`, `LayerNorm` and `GroupNorm` layers (the layers svdiff-pytorch swaps for
its SVD variants; biases stay frozen) is decomposed once, W = U diag(S) Vh (a conv weight as
(out, in*kh*kw), a 1-D norm weight as a (1, C) row), and only a shift `delta` of its singular
values trains: W' = U diag(ReLU(S + delta)) Vh. As in svdiff-pytorch the shifts of the norm
weights (one scalar each) get `learning_rate_1d`, all others `learning_rate`. The frozen U, S,
Vh are kept in float32 (roughly 1-2x the shifted models' size) and W' is rebuilt every forward,
as svdiff-pytorch does. `learning_rate_1d` defaults to svdiff-pytorch's 1e-6.

`save` writes only the shifts, `spectral_shifts.safetensors` (+ `spectral_shifts_te.safetensors`
when the text encoder trains), keyed `<module path>.delta` like svdiff-pytorch's files. Load the
result over a base pipeline with sidpipe's loader, which recomputes the SVDs of the base weights
and writes the shifted weights in place (no parametrization at inference; on a float16 pipeline
the SVD is of its float16-rounded weights, which moves the applied shift by about 1 % of its
size against svdiff-pytorch's float32 loading). svdiff-pytorch's files may hold a
downsampler's shift twice (diffusers 0.14 named that conv `conv` and `Conv2d_0`); ours hold it
once, so read theirs with their loader::

    from sidpipe.training.svdiff import SVDiffTrainer
    pipe = SVDiffTrainer.load_into(pipe, "results/train/svdiff/sid/standard/cat")
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from sidpipe.training.base import Trainer

UNET_WEIGHTS = "spectral_shifts.safetensors"
TEXT_ENCODER_WEIGHTS = "spectral_shifts_te.safetensors"
SHIFTED_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm)
DEFAULT_LR_1D = 1e-6  # svdiff-pytorch's --learning_rate_1d
_SUFFIX = ".delta"


def _svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a weight seen as a matrix, in float32 (no half-precision SVD kernels)."""
    matrix = weight.detach().float()
    matrix = matrix.reshape(matrix.shape[0], -1) if matrix.ndim > 1 else matrix[None]
    return torch.linalg.svd(matrix, full_matrices=False)


def _update(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, delta: torch.Tensor
) -> torch.Tensor:
    # U diag(ReLU(S + delta)) Vh written as W + U diag(ReLU(S + delta) - S) Vh: the same
    # weight (S >= 0), but delta = 0 gives back W bit for bit instead of an SVD round trip.
    return (u * (F.relu(s + delta) - s)) @ vh


class SpectralShift(nn.Module):
    """Parametrization of one weight; U, S, Vh are frozen non-persistent buffers."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        u, s, vh = _svd(weight)
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("s", s, persistent=False)
        self.register_buffer("vh", vh, persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(s))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        update = _update(self.u, self.s, self.vh, self.delta)
        return weight + update.reshape(weight.shape).to(weight.dtype)


def shifted_weight(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`weight` with its singular values shifted by `delta` (what `SpectralShift` computes)."""
    u, s, vh = _svd(weight)
    update = _update(u, s, vh, delta.to(device=s.device, dtype=s.dtype))
    # Summed in float32: a half-precision pipeline rounds once, not twice.
    return (weight.float() + update.reshape(weight.shape)).to(weight.dtype)


def add_spectral_shifts(model: nn.Module) -> dict[str, SpectralShift]:
    """Parametrize every shifted layer's weight of `model`; returns {module path: shift}.
    Freeze the model first: the shifts are created trainable, the weights left as they are."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, SHIFTED_LAYERS) and getattr(module, "weight", None) is not None
    ]
    shifts: dict[str, SpectralShift] = {}
    for name, module in targets:  # collected first: parametrizing adds modules
        shift = SpectralShift(module.weight)
        parametrize.register_parametrization(module, "weight", shift)
        shifts[name] = shift
    return shifts


class SVDiffTrainer(Trainer):
    """Spectral shifts of the UNet (and text encoder) weights (see the module docstring)."""

    algorithm = "svdiff"
    weight_files = (UNET_WEIGHTS,)

    def __init__(
        self, components: SimpleNamespace, settings: dict, identifier: str, class_name: str
    ) -> None:
        super().__init__(components, settings, identifier, class_name)
        # {"unet" | "text_encoder": {module path: shift}}
        self.shifts: dict[str, dict[str, SpectralShift]] = {}
        self._norms: set[int] = set()  # ids of the shifts of norm weights (learning_rate_1d)

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.settings.get("train_text_encoder", False))

    def prepare(self) -> list[dict]:
        for model in (self.c.unet, self.c.text_encoder, self.c.vae):
            model.requires_grad_(False)
        models = {"unet": self.c.unet}
        if self.trains_text_encoder:
            models["text_encoder"] = self.c.text_encoder
        for part, model in models.items():
            # Train mode as the reference (it also lets transformers' gradient checkpointing act).
            model.train()
            self.shifts[part] = add_spectral_shifts(model)
            self._norms.update(
                id(shift)
                for name, shift in self.shifts[part].items()
                if isinstance(model.get_submodule(name), NORM_LAYERS)
            )
        shifts = [s for part in self.shifts.values() for s in part.values()]
        groups = [
            {
                "name": "spectral_shifts",
                "params": [s.delta for s in shifts if id(s) not in self._norms],
                "lr": float(self.settings["learning_rate"]),
            },
            {
                "name": "spectral_shifts_1d",
                "params": [s.delta for s in shifts if id(s) in self._norms],
                "lr": float(self.settings.get("learning_rate_1d", DEFAULT_LR_1D)),
            },
        ]
        return [group for group in groups if group["params"]]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{part}.{name}{_SUFFIX}": shift.delta.detach().cpu().clone()
            for part, shifts in self.shifts.items()
            for name, shift in shifts.items()
        }

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state())
        if set(state) != expected:
            raise KeyError(f"checkpoint keys differ: {sorted(set(state) ^ expected)[:5]}")
        with torch.no_grad():
            for part, shifts in self.shifts.items():
                for name, shift in shifts.items():
                    shift.delta.copy_(state[f"{part}.{name}{_SUFFIX}"])

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {"unet": UNET_WEIGHTS, "text_encoder": TEXT_ENCODER_WEIGHTS}
        for part, shifts in self.shifts.items():
            tensors = {
                f"{name}{_SUFFIX}": s.delta.detach().float().cpu().contiguous()
                for name, s in shifts.items()
            }
            save_file(tensors, str(out_dir / files[part]), metadata={"format": "pt"})

    @staticmethod
    def load_into(pipe: Any, weights_dir: Path) -> Any:
        """Write the shifted weights into `pipe.unet` (and `pipe.text_encoder` when its file
        exists) in place."""
        weights_dir = Path(weights_dir)
        for file, model in ((UNET_WEIGHTS, pipe.unet), (TEXT_ENCODER_WEIGHTS, pipe.text_encoder)):
            path = weights_dir / file
            if file == TEXT_ENCODER_WEIGHTS and not path.exists():
                continue  # the text encoder was not trained
            for key, delta in load_file(str(path)).items():
                module = model.get_submodule(key.removesuffix(_SUFFIX))
                with torch.no_grad():
                    module.weight.copy_(shifted_weight(module.weight, delta))
        return pipe
