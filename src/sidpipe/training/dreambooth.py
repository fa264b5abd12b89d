"""DreamBooth: the whole UNet (and, if `train_text_encoder`, the text encoder) fine-tuned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from sidpipe.models import load_sd_pipeline, torch_dtype
from sidpipe.training.base import Trainer

DEFAULT_LR = 2e-6


def _cpu_state(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


class DreamBoothTrainer(Trainer):
    """Full fine-tune; saves `unet/` (and `text_encoder/`) as `save_pretrained` folders."""

    algorithm = "dreambooth"
    weight_files = ("unet/diffusion_pytorch_model.safetensors",)

    def __init__(self, components: Any, settings: dict, identifier: str, class_name: str) -> None:
        super().__init__(components, settings, identifier, class_name)
        if self.trains_text_encoder:
            self.weight_files = (*self.weight_files, "text_encoder/model.safetensors")

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.settings.get("train_text_encoder", False))

    def prepare(self) -> list[dict]:
        c = self.c
        c.vae.requires_grad_(False)
        c.text_encoder.requires_grad_(self.trains_text_encoder)
        c.unet.requires_grad_(True)
        c.unet.train()
        c.text_encoder.train(self.trains_text_encoder)
        params = list(c.unet.parameters())
        if self.trains_text_encoder:
            params += list(c.text_encoder.parameters())
        return [{"params": params, "lr": float(self.settings.get("learning_rate", DEFAULT_LR))}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = _cpu_state(self.c.unet, "unet.")
        if self.trains_text_encoder:
            state.update(_cpu_state(self.c.text_encoder, "text_encoder."))
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.c.unet.load_state_dict(_split(state, "unet."))
        if self.trains_text_encoder:
            self.c.text_encoder.load_state_dict(_split(state, "text_encoder."))

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        self.c.unet.save_pretrained(out_dir / "unet", safe_serialization=True)
        if self.trains_text_encoder:
            self.c.text_encoder.save_pretrained(out_dir / "text_encoder")

    @staticmethod
    def load_into(pipe: Any, weights_dir: Path) -> Any:
        weights_dir = Path(weights_dir)
        unet = UNet2DConditionModel.from_pretrained(
            weights_dir, subfolder="unet", dtype=pipe.unet.dtype
        )
        pipe.unet = unet.to(pipe.device).eval()
        if (weights_dir / "text_encoder").is_dir():
            text_encoder = CLIPTextModel.from_pretrained(
                weights_dir, subfolder="text_encoder", dtype=pipe.text_encoder.dtype
            )
            pipe.text_encoder = text_encoder.to(pipe.device).eval()
        return pipe

    @classmethod
    def load_pipeline(cls, base_model: str, weights_dir: Path, dtype: str, device: str) -> Any:
        """The fine-tuned UNet (and text encoder) go into the pipeline as it is built: the base
        model's, which they replace, are never loaded (3.5 GB of UNet at SD-2.1 size)."""
        weights_dir, dt = Path(weights_dir), torch_dtype(dtype)
        trained = {
            "unet": UNet2DConditionModel.from_pretrained(weights_dir, subfolder="unet", dtype=dt)
        }
        if (weights_dir / "text_encoder").is_dir():
            trained["text_encoder"] = CLIPTextModel.from_pretrained(
                weights_dir, subfolder="text_encoder", dtype=dt
            )
        return load_sd_pipeline(base_model, dtype, device, **trained)
