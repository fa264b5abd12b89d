"""The world's parts, each trained from scratch on rendered scenes: the VAE, the CLIP (contrastive,
plus heads that read the attributes a caption names from its text states), the judge (on scenes
and their VAE reconstructions, so it reads decoded images too), the DINO-role ViT and the UNet
(latent diffusion with SD's noise schedule, the frozen CLIP text tower, caption dropout, min-SNR
weighting, the subject's cells weighted up, EMA). `pretrain.pretrain_world` runs them in order.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from sidpipe.io import SidpipeError, log
from sidpipe.world.architectures import (
    JUDGE_FLAGS,
    JUDGE_HEADS,
    TEXT_WIDTH,
    WorldJudge,
    clip_config,
    unet_kwargs,
    vae_kwargs,
    vit_config,
)
from sidpipe.world.captions import pretraining_caption, pretraining_caption_naming
from sidpipe.world.dataset import SceneSet

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _progress(iterable: range, desc: str) -> Iterator[int]:
    return tqdm(iterable, desc=desc, file=sys.stderr, mininterval=15, maxinterval=60)


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _optimise(
    params: list[torch.nn.Parameter],
    cfg: dict,
    desc: str,
    loss_fn: Callable[[int], torch.Tensor],
    weight_decay: float = 1e-2,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW with warm-up + cosine decay, gradient clipping at 1; returns the losses."""
    optimizer = torch.optim.AdamW(
        params, lr=cfg["learning_rate"], weight_decay=weight_decay, fused=True
    )
    steps = int(cfg["steps"])
    warmup = max(1, steps // 20)
    losses = []
    bar = _progress(range(steps), desc)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg["learning_rate"] * _schedule(step, steps, warmup)
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise SidpipeError(
                f"world pretraining ({desc}): loss {float(loss)} at step {step}; "
                "lower its learning_rate"
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    log.info("%s: %d steps, final loss %.4f", desc, steps, float(np.mean(losses[-50:])))
    return losses


def _normalise(pixels: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """[-1, 1] pixels -> a processor's normalisation (rescale to [0, 1], then mean/std)."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((pixels + 1) / 2 - m) / s


# --- parts -------------------------------------------------------------------------------------


def train_vae(data: SceneSet, cfg: dict, seed: int) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_kwargs())
    vae.train()
    rng = np.random.default_rng(seed)

    def loss_fn(step: int) -> torch.Tensor:
        idx = rng.integers(len(data), size=cfg["batch_size"])
        x = data.pixels(idx)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg["kl_weight"] * posterior.kl().mean()

    _optimise(list(vae.parameters()), cfg, "vae", loss_fn, weight_decay=0.0)
    vae.eval()
    # SD's convention: latents times scaling_factor have unit variance.
    with torch.no_grad():
        sample = torch.cat(
            [
                vae.encode(data.pixels(slice(i, i + 256))).latent_dist.mean
                for i in range(0, min(len(data), 2048), 256)
            ]
        )
    vae.register_to_config(scaling_factor=float(1.0 / sample.std()))
    return vae


@torch.no_grad()
def encode_latents(vae: Any, data: SceneSet, batch: int = 512) -> torch.Tensor:
    """Latent means of every scene, times the scaling factor (the UNet's training targets)."""
    out = [
        vae.encode(data.pixels(slice(i, i + batch))).latent_dist.mean
        for i in range(0, len(data), batch)
    ]
    return torch.cat(out) * vae.config.scaling_factor


@torch.no_grad()
def reconstruct(
    vae: Any, data: SceneSet, limit: int | None = None, batch: int = 512
) -> torch.Tensor:
    """The first `limit` scenes (all by default) through the VAE (encode mean, decode), as
    [-1, 1] pixels: what a decoded image looks like, for the judge to learn to read."""
    n = len(data) if limit is None else min(limit, len(data))
    out = [
        vae.decode(vae.encode(data.pixels(slice(i, min(i + batch, n)))).latent_dist.mean).sample
        for i in range(0, n, batch)
    ]
    return torch.cat(out).clamp(-1, 1)


TEXT_ATTRIBUTES = ("background", "class", "colour", "pattern", "accent")


def _text_attribute_targets(
    labels: dict[str, np.ndarray], named: list[frozenset[str]]
) -> dict[str, torch.Tensor]:
    """Per attribute, each scene's label (`SceneSet.labels`' rows) where its caption names the
    attribute, else -1 (ignored by the loss)."""
    return {
        k: torch.from_numpy(np.where([k in names for names in named], labels[k], -1))
        for k in TEXT_ATTRIBUTES
    }


def train_clip(data: SceneSet, tokenizer: Any, cfg: dict, seed: int) -> Any:
    """Contrastive CLIP training, plus (weight `text_attribute_weight`) linear heads that read
    each attribute a caption names from its text states: the EOS state and the mean over the
    tokens. Why: the frozen text tower is SD's text encoder, and contrastive training alone left
    the pattern words at cosine 0.98-0.99 at their token (README, "What the base model cannot
    draw"), so the UNet got one condition for every pattern. The heads are dropped after."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**clip_config(tokenizer)))
    model.train()
    heads = torch.nn.ModuleDict(
        {k: torch.nn.Linear(TEXT_WIDTH, len(JUDGE_HEADS[k])) for k in TEXT_ATTRIBUTES}
    )
    rng = np.random.default_rng(seed)

    def loss_fn(step: int) -> torch.Tensor:
        idx = rng.choice(len(data), size=cfg["batch_size"], replace=False)
        scenes = [data.scenes[i] for i in idx]
        captions, named = zip(*(pretraining_caption_naming(s, rng) for s in scenes), strict=True)
        tokens = tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt")
        pixels = _normalise(data.pixels(idx), CLIP_MEAN, CLIP_STD)
        out = model(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            pixel_values=pixels,
            return_loss=True,
        )
        text = out.text_model_output
        valid = tokens.attention_mask.unsqueeze(-1).float()
        mean = (text.last_hidden_state * valid).sum(1) / valid.sum(1)
        targets = _text_attribute_targets(
            {k: data.labels[k][idx] for k in TEXT_ATTRIBUTES}, list(named)
        )
        attribute = sum(
            F.cross_entropy(heads[k](states), targets[k], ignore_index=-1)
            for k in TEXT_ATTRIBUTES
            if (targets[k] >= 0).any()
            for states in (text.pooler_output, mean)
        )
        return out.loss + cfg["text_attribute_weight"] * attribute / (2 * len(TEXT_ATTRIBUTES))

    _optimise([*model.parameters(), *heads.parameters()], cfg, "clip", loss_fn)
    return model.eval()


def _augment(
    pixels: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise, a shift of up to 2 px and a horizontal flip."""
    b = pixels.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    pixels = torch.roll(pixels, (dy, dx), dims=(2, 3))
    masks = torch.roll(masks, (dy, dx), dims=(1, 2))
    sigma = torch.rand(b, 1, 1, 1, generator=generator) * 0.1
    pixels = pixels + sigma * torch.randn(pixels.shape, generator=generator)
    return pixels.clamp(-1, 1), masks


def judge_loss(
    judge: WorldJudge,
    pixels: torch.Tensor,
    labels: dict[str, torch.Tensor],
    flags: torch.Tensor,
    valid: torch.Tensor,
    masks: torch.Tensor,
) -> torch.Tensor:
    out = judge(pixels)
    loss = sum(F.cross_entropy(out[k], labels[k], ignore_index=-1) for k in JUDGE_HEADS)
    flag_loss = F.binary_cross_entropy_with_logits(out["flags"], flags, reduction="none")
    # Summed over flags: each element's presence weighs as much as a categorical head.
    loss = loss + (flag_loss * valid).sum() / len(flags)
    return loss + F.binary_cross_entropy_with_logits(out["mask"], masks)


def train_judge(data: SceneSet, reconstructed: torch.Tensor, cfg: dict, seed: int) -> WorldJudge:
    torch.manual_seed(seed)
    judge = WorldJudge(heads={k: list(v) for k, v in JUDGE_HEADS.items()}, flags=list(JUDGE_FLAGS))
    judge.train()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    n_recon = len(reconstructed)  # the first n_recon scenes also have a VAE reconstruction

    def loss_fn(step: int) -> torch.Tensor:
        idx = rng.integers(len(data), size=cfg["batch_size"])
        recon = torch.from_numpy((rng.random(len(idx)) < 0.5) & (idx < n_recon))
        pixels = data.pixels(idx)
        if recon.any():
            pixels[recon] = reconstructed[idx[recon.numpy()]]
        masks = torch.from_numpy(data.masks[idx]).float()
        pixels, masks = _augment(pixels, masks, generator)
        flags = torch.from_numpy(data.flags[idx])
        labels = {k: torch.from_numpy(v[idx]) for k, v in data.labels.items()}
        return judge_loss(
            judge, pixels, labels, flags, torch.from_numpy(data.flag_valid[idx]), masks
        )

    _optimise(list(judge.parameters()), cfg, "judge", loss_fn)
    return judge.eval()


def _views(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random resized crop (scale 0.55-1, any position) with a random flip, via one affine
    resampling per image."""
    b = pixels.shape[0]
    scale = 0.55 + 0.45 * torch.rand(b, generator=generator)
    shift = (1 - scale)[:, None] * (2 * torch.rand(b, 2, generator=generator) - 1)
    sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale * sign
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


def train_dino(data: SceneSet, cfg: dict, seed: int) -> Any:
    """Self-supervised, images only: SimCLR's NT-Xent between two augmented views of each
    scene, on the CLS token through a projection head that is dropped afterwards."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    vit = ViTModel(ViTConfig(**vit_config()), add_pooling_layer=False)
    width = vit.config.hidden_size
    head = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 64)
    )
    vit.train()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        idx = rng.choice(len(data), size=cfg["batch_size"], replace=False)
        pixels = data.pixels(idx)
        both = torch.cat([_views(pixels, generator), _views(pixels, generator)])
        cls = vit(pixel_values=_normalise(both, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state
        z = F.normalize(head(cls[:, 0]), dim=-1)
        logits = z @ z.T / cfg["temperature"]
        logits.fill_diagonal_(float("-inf"))
        n = len(idx)
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        return F.cross_entropy(logits, target)

    _optimise([*vit.parameters(), *head.parameters()], cfg, "dino", loss_fn)
    return vit.eval()


def train_unet(
    data: SceneSet,
    latents: torch.Tensor,
    tokenizer: Any,
    text_encoder: Any,
    cfg: dict,
    seed: int,
    scheduler_kwargs: dict,
) -> Any:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kwargs())
    unet.train()
    noise_scheduler = DDPMScheduler(
        **{k: v for k, v in scheduler_kwargs.items() if k != "set_alpha_to_one"}
    )
    alphas = noise_scheduler.alphas_cumprod
    snr_all = alphas / (1 - alphas)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    ema = [p.detach().clone() for p in unet.parameters()]
    # The loss weight per latent cell: 1 + subject_loss_weight x the subject's share of it. The
    # subject is ~10 % of a 32 px scene and its pattern ~2 %; unweighted, the background
    # decides the loss and the base model drew a named pattern at about its prior rate.
    subject = F.avg_pool2d(torch.from_numpy(data.masks).unsqueeze(1).float(), 2)
    cell_weight = 1 + cfg["subject_loss_weight"] * subject
    text_encoder.eval().requires_grad_(False)

    def loss_fn(step: int) -> torch.Tensor:
        idx = rng.integers(len(data), size=cfg["batch_size"])
        captions = [
            ""
            if rng.random() < cfg["caption_dropout"]
            else pretraining_caption(data.scenes[i], rng)
            for i in idx
        ]
        ids = tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            hidden = text_encoder(ids).last_hidden_state
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator
        )
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, hidden).sample
        snr = snr_all[t]
        weight = torch.clamp(snr, max=cfg["snr_gamma"]) / snr  # min-SNR-gamma, epsilon target
        cells = cell_weight[idx]
        error = F.mse_loss(pred, noise, reduction="none").mean(1, keepdim=True)
        per_sample = (cells * error).sum((1, 2, 3)) / cells.sum((1, 2, 3))
        return (weight * per_sample).mean()

    def update_ema(step: int) -> None:
        decay = min(cfg["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, param in zip(ema, unet.parameters(), strict=True):
                shadow.lerp_(param.detach(), 1 - decay)

    _optimise(list(unet.parameters()), cfg, "unet", loss_fn, after_step=update_ema)
    with torch.no_grad():
        for shadow, param in zip(ema, unet.parameters(), strict=True):
            param.copy_(shadow)
    return unet.eval()
