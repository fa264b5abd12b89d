"""DreamBooth-LoRA: rank-r adapters on the UNet's attention (optionally the text encoder's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from sidpipe.training.base import Trainer

DEFAULT_LR = 1e-4
DEFAULT_RANK = 4
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights looks for


def _lora_config(rank: int, targets: list[str]) -> LoraConfig:
    # As diffusers' train_dreambooth_lora: alpha = rank (scale 1), B = 0 so training starts
    # exactly at the base model.
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)


class LoraTrainer(Trainer):
    """Saves `pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(dir)`."""

    algorithm = "dreambooth_lora"
    weight_files = (WEIGHT_NAME,)

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.settings.get("train_text_encoder", False))

    def _modules(self) -> dict[str, torch.nn.Module]:
        modules = {"unet": self.c.unet}
        if self.trains_text_encoder:
            modules["text_encoder"] = self.c.text_encoder
        return modules

    def prepare(self) -> list[dict]:
        c = self.c
        rank = int(self.settings.get("rank", DEFAULT_RANK))
        for module in (c.vae, c.text_encoder, c.unet):
            module.requires_grad_(False)
        # add_adapter marks only the new lora_A/lora_B weights trainable.
        c.unet.add_adapter(_lora_config(rank, UNET_TARGETS))
        c.unet.train()
        if self.trains_text_encoder:
            c.text_encoder.add_adapter(_lora_config(rank, TEXT_TARGETS))
            c.text_encoder.train()
        params = [p for m in self._modules().values() for p in m.parameters() if p.requires_grad]
        return [{"params": params, "lr": float(self.settings.get("learning_rate", DEFAULT_LR))}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": p.detach().to("cpu", copy=True)
            for name, module in self._modules().items()
            for key, p in module.named_parameters()
            if p.requires_grad
        }

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, module in self._modules().items():
                for key, p in module.named_parameters():
                    if p.requires_grad:
                        p.copy_(state[f"{name}.{key}"])

    def save(self, out_dir: Path) -> None:
        layers: dict[str, Any] = {}
        for name, module in self._modules().items():
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(
                # No embedding layers are adapted; "auto" would go looking for a hub config.
                get_peft_model_state_dict(module, save_embedding_layers=False)
            )
            # rank/alpha/targets travel with the weights, so loading needs no guessing.
            layers[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(
            Path(out_dir), weight_name=WEIGHT_NAME, safe_serialization=True, **layers
        )

    @staticmethod
    def load_into(pipe: Any, weights_dir: Path) -> Any:
        pipe.load_lora_weights(str(weights_dir), weight_name=WEIGHT_NAME)
        return pipe
