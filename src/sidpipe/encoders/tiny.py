"""Tiny random checkpoints of the encoder arms in their real layouts, for the tests and the demo
(rule build_tiny_encoders): BLIP-Diffusion in `Salesforce/blipdiffusion`'s, ELITE in the
official repository's. Every loader and sampler of `blip_diffusion` and `elite` runs on them
unchanged.

Importing this module imports torch, transformers and diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from diffusers.pipelines.deprecated.blip_diffusion import (
    Blip2QFormerModel,
    BlipDiffusionPipeline,
    BlipImageProcessor,
    ContextCLIPTextModel,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.blip_2.configuration_blip_2 import Blip2Config

from ..io import atomic_dir, atomic_file
from ..tiny_models import MAX_LENGTH, build_tiny_models, train_bert_tokenizer, train_clip_tokenizer
from .blip_diffusion import COMPONENTS, REAL_MODEL_INDEX
from .elite import Mapper, MapperLocal, add_projections

# The tiny ELITE's base model (when none is given) is trained on this.
ELITE_CORPUS = ["a photo of a S", "a S on the beach", "a S in the jungle", "a photo of a dog"]
# The tiny BLIP-Diffusion's tokenizers are trained on this (any text still encodes: byte-level
# BPE and character-level WordPiece fallbacks).
BLIP_CORPUS = [
    "a photo of a dog",
    "a dog on the beach",
    "a cat in the snow",
    "a red mug on a wooden table",
    "a toy robot in the jungle",
    "a backpack with a city in the background",
    "a vase on top of a purple rug in a forest",
    "a sneaker floating in an ocean of milk",
    "dog cat mug robot backpack vase sneaker teapot bear",
]


def build_tiny_blip_diffusion(out_dir: Path, seed: int = 0) -> str:
    """Write a tiny random BlipDiffusionPipeline in `Salesforce/blipdiffusion`'s layout.

    Every component the real checkpoint has, of the same classes (text encoder, VAE, UNet, CLIP
    tokenizer, PNDM scheduler, Q-Former with its ViT, BLIP image processor) and its
    model_index.json entries; the Q-Former's BERT tokenizer is saved in `qformer/` (the real
    one loads bert-base-uncased from the hub). 64 px images (8x8 latents: the VAE downsamples
    8x, as SD's), 32 px reference crops. Deterministic per seed.
    """
    out_dir = Path(out_dir)
    hidden = 32  # CLIP text width = Q-Former width = UNet cross-attention width
    num_query_tokens = 16  # as the real model: 16 of the 77 text-encoder positions
    with atomic_dir(out_dir) as tmp:
        tokenizer = train_clip_tokenizer(BLIP_CORPUS, tmp / "tokenizer")
        bert = train_bert_tokenizer(BLIP_CORPUS, tmp / "qformer", max_length=32)

        torch.manual_seed(seed)
        text_encoder = ContextCLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        )
        torch.manual_seed(seed)
        # Four blocks as SD's UNet, so the pipeline's own latent size (used when it draws the
        # latents itself) agrees with the VAE's 8x.
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            cross_attention_dim=hidden,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        qformer_config = Blip2Config(
            vision_config={
                "hidden_size": hidden,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 8,
                "hidden_act": "quick_gelu",
                # Blip2VisionConfig's default, 1e-10, would make the random ViT ignore its input.
                "initializer_range": 0.02,
            },
            qformer_config={
                "vocab_size": len(bert) + 1,  # + the "[DEC]" token the Q-Former adds
                "hidden_size": hidden,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
                "cross_attention_frequency": 1,
                "encoder_hidden_size": hidden,
            },
            num_query_tokens=num_query_tokens,
            # Larger than the usual 0.02, so that the reference image visibly steers the tiny
            # model (at 0.02 its share of the query embeddings is ~1e-3).
            initializer_range=0.3,
            tokenizer=str(tmp / "qformer"),
        )
        torch.manual_seed(seed)
        # diffusers' own class (its __init__ works; only its forward is broken), so the saved
        # config names the real checkpoint's architecture.
        qformer = Blip2QFormerModel(qformer_config)
        # They start as zeros (trained weights replace them): all queries would be the same.
        nn.init.normal_(qformer.query_tokens, std=1.0)
        del qformer.config.tokenizer  # a temporary path; load_blip_diffusion finds it instead
        pipe = BlipDiffusionPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            unet=unet,
            # The real checkpoint's scheduler (diffusers' conversion script).
            scheduler=PNDMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                set_alpha_to_one=False,
                skip_prk_steps=True,
            ),
            qformer=qformer,
            image_processor=BlipImageProcessor(
                size={"height": 32, "width": 32},
                image_mean=OPENAI_CLIP_MEAN,
                image_std=OPENAI_CLIP_STD,
            ),
            ctx_begin_pos=REAL_MODEL_INDEX["ctx_begin_pos"],
            mean=REAL_MODEL_INDEX["mean"],
            std=REAL_MODEL_INDEX["std"],
        )
        pipe.save_pretrained(tmp)
        # save_pretrained records our subclass and "diffusers" as libraries; write the real
        # checkpoint's entries instead, so loading is tested on the real model_index.json.
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text())
        index.update({name: REAL_MODEL_INDEX[name] for name in COMPONENTS})
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return str(out_dir)


def build_tiny_elite(out_dir: Path, base_model: str | None = None, seed: int = 0) -> dict[str, str]:
    """Tiny random ELITE in the official layout: SD (`build_tiny_models`' unless `base_model`),
    a 24-layer CLIPVisionModel (32 px, 2 px patches: the official 16x16 grid) and
    `global_mapper.pt` / `local_mapper.pt` (torch.save of the state dicts, official names, their
    to_k/to_v copied from the UNet as training initialises them). Byte-identical per seed."""
    out_dir = Path(out_dir)
    if base_model is None:
        base_model = build_tiny_models(out_dir / "tiny", ELITE_CORPUS, seed=seed)["sd"]
    text_dim = CLIPTextConfig.from_pretrained(base_model, subfolder="text_encoder").hidden_size
    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    config = CLIPVisionConfig(
        image_size=32,
        patch_size=2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=24,
        num_attention_heads=4,
    )
    torch.manual_seed(seed)
    with atomic_dir(out_dir / "image_encoder") as tmp:
        CLIPVisionModel(config).save_pretrained(tmp)
    paths = {"sd": str(base_model), "image_encoder": str(out_dir / "image_encoder")}
    for cls, name in ((Mapper, "global_mapper"), (MapperLocal, "local_mapper")):
        torch.manual_seed(seed)
        mapper = cls(config.hidden_size, text_dim, hidden_dim=32)
        add_projections(mapper, unet, copy_from_unet=True)
        with atomic_file(out_dir / f"{name}.pt", "wb") as handle:
            torch.save(mapper.state_dict(), handle)
        paths[name] = str(out_dir / f"{name}.pt")
    return paths
