"""The world's models: the real classes (CLIP, AutoencoderKL, UNet2DConditionModel, ViT) at
sizes a 2-core CPU trains in minutes, and the judge, a small CNN that reads scene truth.

Every builder returns a randomly initialised model; `pretrain` trains them and saves them with
`save_pretrained`, so the workflow loads them with the same `from_pretrained` calls as the
paper's models.
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.nn import functional as F

from sidpipe.world.grammar import (
    BACKGROUND_NAMES,
    COLOURS,
    ELEMENT_NAMES,
    PATTERNS,
    SUBJECT_CLASSES,
)

RESOLUTION = 32  # pixels; the VAE halves it: latents are 16 x 16 x 4
TEXT_WIDTH = 64  # CLIP's text width = the UNet's cross-attention width (SD's frozen encoder)


def clip_config(tokenizer: Any) -> dict:
    """CLIPConfig kwargs: a 3-layer text tower (77 tokens, as CLIP) and a 4-layer ViT on
    32 px images in 4 px patches.

    The patches are small because SD's text encoder is this CLIP's text tower, frozen: words
    its image side cannot tell apart, contrastive training has no reason to tell apart either.
    With 8 px patches (a ball is two patches wide) and 600 steps the tower held "mug" and
    "ball" at cosine 0.95 and the UNet drew both alike; 4 px patches and 1,500 steps: 0.75."""
    return {
        "text_config": {
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 2 * TEXT_WIDTH,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "vision_config": {
            "image_size": RESOLUTION,
            "patch_size": 4,  # 8 x 8 patches (ViT-B/32 sees 7 x 7, ViT-B/16 14 x 14)
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
        },
        "projection_dim": 64,
    }


def vae_kwargs() -> dict:
    """AutoencoderKL: one 2x downsampling (32 px -> 16 x 16 x 4), no attention in the middle
    block; small, because the world's images are flat colours and simple shapes."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": RESOLUTION,
        "mid_block_add_attention": False,
    }


def unet_kwargs() -> dict:
    """UNet2DConditionModel on 16 x 16 latents: cross-attention at 8 x 8 and 4 x 4. Attention
    at 16 x 16 too (SD's layout) made the step 1.65x slower and drew the subject no better
    (README, "What the base model cannot draw")."""
    return {
        "sample_size": RESOLUTION // 2,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64, 128),
        "layers_per_block": 1,
        "cross_attention_dim": TEXT_WIDTH,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    }


def vit_config() -> dict:
    """ViTConfig kwargs of the DINO-role encoder (DINO ViT-S/16's shape, scaled down)."""
    return {
        "image_size": RESOLUTION,
        "patch_size": 8,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
    }


# --- the judge ---------------------------------------------------------------------------------

# Heads: name -> the names its classes stand for (binary heads: one logit).
JUDGE_HEADS: dict[str, tuple[str, ...]] = {
    "background": BACKGROUND_NAMES,
    "class": SUBJECT_CLASSES,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "accent": tuple(COLOURS),
}
JUDGE_FLAGS = (*ELEMENT_NAMES, "hat", "upside_down")


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class WorldJudge(nn.Module, PyTorchModelHubMixin):
    """Reads a scene: one softmax head per categorical truth, one logit per flag (each element
    present, hat, upside down, facing left) and the subject's mask (predicted at half
    resolution, upsampled). Input: RGB in [-1, 1] at `resolution` px."""

    def __init__(
        self,
        width: int = 16,
        heads: dict[str, list[str]] | None = None,
        flags: list[str] | None = None,
        resolution: int = RESOLUTION,
    ) -> None:
        super().__init__()
        self.heads_vocab = {k: list(v) for k, v in (heads or JUDGE_HEADS).items()}
        self.flag_names = list(flags or JUDGE_FLAGS)
        self.resolution = resolution
        w = width
        self.stage1 = nn.Sequential(_conv(3, w), _conv(w, w))  # full resolution: small things
        self.stage2 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.quarter = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w))
        self.eighth = nn.Sequential(_conv(4 * w, 4 * w, 2), _conv(4 * w, 4 * w))
        features = 3 * 4 * w
        self.heads = nn.ModuleDict(
            {k: nn.Linear(features, len(v)) for k, v in self.heads_vocab.items()}
        )
        self.flags = nn.Linear(features, len(self.flag_names))
        self.mask = nn.Sequential(_conv(4 * w + 2 * w, 2 * w), nn.Conv2d(2 * w, 1, 1))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        half = self.stage2(self.stage1(pixels))
        quarter = self.quarter(half)
        eighth = self.eighth(quarter)
        # Max over the 8 x 8 map keeps small objects; mean and max over 4 x 4 the layout.
        pooled = torch.cat([quarter.amax((2, 3)), eighth.mean((2, 3)), eighth.amax((2, 3))], 1)
        out = {k: head(pooled) for k, head in self.heads.items()}
        out["flags"] = self.flags(pooled)
        up = F.interpolate(quarter, scale_factor=2.0, mode="nearest")
        mask = self.mask(torch.cat([up, half], dim=1))
        out["mask"] = F.interpolate(
            mask, size=pixels.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
        return out
