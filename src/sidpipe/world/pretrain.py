"""Rule `pretrain_world`: the world's CLIP, VAE, UNet, DINO-role ViT and judge, trained from
scratch on rendered scenes (`trainers`) and written with `save_pretrained` in the real models'
layouts.

Order: scenes -> tokenizer -> VAE -> CLIP -> judge -> DINO-role ViT -> UNet. Each part is
seeded from the one seed; `manifest.json` records the settings, the code's digest, each part's
time and the judge's held-out accuracy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidpipe.io import SidpipeError, atomic_dir, log
from sidpipe.world.architectures import JUDGE_FLAGS, JUDGE_HEADS, WorldJudge
from sidpipe.world.captions import describe, pretraining_caption
from sidpipe.world.dataset import SceneSet, random_scenes
from sidpipe.world.grammar import BACKGROUNDS, COLOURS, ELEMENTS, SUBJECT_CLASSES, held_out_triples
from sidpipe.world.trainers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    encode_latents,
    reconstruct,
    train_clip,
    train_dino,
    train_judge,
    train_unet,
    train_vae,
)

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "threads": 2,
    "scenes": 30000,
    "held_out_fraction": 0.1,
    "eval_scenes": 2000,
    "vocab_size": 1000,
    "vae": {"steps": 600, "batch_size": 64, "learning_rate": 2.0e-3, "kl_weight": 1.0e-6},
    "clip": {
        "steps": 1200,
        "batch_size": 256,
        "learning_rate": 1.0e-3,
        "text_attribute_weight": 1.0,
    },
    "judge": {"steps": 1200, "batch_size": 128, "learning_rate": 2.0e-3},
    "dino": {"steps": 600, "batch_size": 128, "learning_rate": 1.0e-3, "temperature": 0.2},
    "unet": {
        "steps": 1200,
        "batch_size": 64,
        "learning_rate": 5.0e-4,
        "caption_dropout": 0.1,
        "snr_gamma": 5.0,
        "ema_decay": 0.999,
        "subject_loss_weight": 4.0,
    },
}
PARTS = ("vae", "clip", "judge", "dino", "unet")
SHARD = "4MB"  # the repository ships the weights: every file under 5 MB
TRAINING_SOURCES = (
    "grammar.py",
    "draw.py",
    "captions.py",
    "architectures.py",
    "dataset.py",
    "pretrain.py",
    "trainers.py",
)


def merged_settings(settings: dict | None) -> dict[str, Any]:
    """DEFAULTS overridden by `settings` (one level deep for the parts' dicts)."""
    out = copy.deepcopy(DEFAULTS)
    for key, value in (settings or {}).items():
        if key not in out:
            raise SidpipeError(
                f"world pretraining: unknown setting {key!r}; known: {', '.join(sorted(out))}"
            )
        if isinstance(out[key], dict):
            unknown = set(value) - set(out[key])
            if unknown:
                raise SidpipeError(
                    f"world pretraining: unknown {key} setting(s) "
                    f"{sorted(unknown)}; known: {sorted(out[key])}"
                )
            out[key].update(value)
        else:
            out[key] = value
    return out


def code_digest() -> str:
    """SHA-256 over the sources that decide the weights (scenes, captions, architectures,
    training): which code made them. Measures, subjects and the judge's reader are left out,
    so editing them does not mark shipped weights stale."""
    digest = hashlib.sha256()
    for name in TRAINING_SOURCES:
        path = Path(__file__).parent / name
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --- tokenizer ---------------------------------------------------------------------------------


def tokenizer_corpus(identifier: str = "sks") -> list[str]:
    """Every word the world writes: captions at all levels, prompts, and the identifier."""
    rng = np.random.default_rng(123)
    texts = []
    data = random_scenes(400, seed=99, resolution=8)
    for scene in data.scenes:
        texts.append(pretraining_caption(scene, rng))
        texts.extend(describe(scene, case) for case in (2, 3, 4))
    for entry in BACKGROUNDS.values():
        texts.extend([*entry["phrases"], entry["spec"]])
    for name, entry in ELEMENTS.items():
        texts.append(f"{name} {entry['noun']} {entry['what']}")
    texts.append(
        " ".join(
            [
                *COLOURS,
                *SUBJECT_CLASSES,
                "wearing",
                "hat",
                "upside",
                "down",
                "photo",
                "of",
                "a",
                "an",
            ]
        )
    )
    # The rare identifier is in the vocabulary (one token, as "sks" is for SD) but no caption
    # of the pretraining ever uses it.
    texts.extend([f"a {identifier} thing"] * 3)
    return texts


# --- judge accuracy ----------------------------------------------------------------------------


@torch.no_grad()
def judge_accuracy(
    judge: WorldJudge, data: SceneSet, pixels: torch.Tensor | None = None
) -> dict[str, float]:
    """Per head: accuracy on `data` (its own pixels, or `pixels`); per flag: accuracy where it
    applies; mask: mean IoU."""
    pixels = data.pixels(slice(None)) if pixels is None else pixels
    outs = [judge(pixels[i : i + 512]) for i in range(0, len(pixels), 512)]
    out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    acc = {}
    for key in JUDGE_HEADS:
        target = torch.from_numpy(data.labels[key])
        ok = target >= 0
        acc[key] = float((out[key].argmax(1)[ok] == target[ok]).float().mean())
    flags = torch.from_numpy(data.flags)
    valid = torch.from_numpy(data.flag_valid) > 0
    predicted = out["flags"] > 0
    for j, name in enumerate(JUDGE_FLAGS):
        ok = valid[:, j]
        acc[name] = float((predicted[ok, j] == (flags[ok, j] > 0.5)).float().mean())
    mask = out["mask"] > 0
    truth = torch.from_numpy(data.masks)
    inter = (mask & truth).sum((1, 2)).float()
    union = (mask | truth).sum((1, 2)).float().clamp_min(1)
    acc["mask_iou"] = float((inter / union).mean())
    return {k: round(v, 4) for k, v in acc.items()}


# --- the job -----------------------------------------------------------------------------------


def _write_processors(out: Path, tokenizer: Any) -> None:
    from transformers import CLIPImageProcessorPil, CLIPProcessor, ViTImageProcessorPil

    size = {"shortest_edge": 32}
    CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size=size, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    ).save_pretrained(out / "clip")
    ViTImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    ).save_pretrained(out / "dino")


def pretrain_world(
    out_dir: Path, settings: dict | None = None, identifier: str = "sks"
) -> dict[str, Any]:
    """Train every world model and write out_dir/{sd,clip,dino,judge}/ and manifest.json."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sidpipe.models import SD_SCHEDULER_KWARGS
    from sidpipe.tiny_models import train_clip_tokenizer

    cfg = merged_settings(settings)
    torch.set_num_threads(int(cfg["threads"]))
    seed = int(cfg["seed"])
    times: dict[str, float] = {}
    t_job = time.perf_counter()

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        times[name] = round(time.perf_counter() - start, 1)
        log.info("%s took %.1f s", name, times[name])
        return result

    held_out = held_out_triples(seed, cfg["held_out_fraction"])
    data = timed("scenes", lambda: random_scenes(cfg["scenes"], seed, 32, held_out))
    evaluation = timed("eval_scenes", lambda: random_scenes(cfg["eval_scenes"], seed + 1, 32))
    log.info(
        "%d training scenes (%d class/colour/background triples held out), %d held-out "
        "evaluation scenes",
        len(data),
        len(held_out),
        len(evaluation),
    )
    with atomic_dir(out_dir) as tmp:
        tokenizer = train_clip_tokenizer(
            tokenizer_corpus(identifier), tmp / "sd" / "tokenizer", vocab_size=cfg["vocab_size"]
        )
        vae = timed("vae", lambda: train_vae(data, cfg["vae"], seed))
        clip = timed("clip", lambda: train_clip(data, tokenizer, cfg["clip"], seed + 1))
        reconstructed = timed("reconstruct", lambda: reconstruct(vae, data, cfg["scenes"] // 3))
        judge = timed("judge", lambda: train_judge(data, reconstructed, cfg["judge"], seed + 2))
        accuracy = {
            "scenes": judge_accuracy(judge, evaluation),
            "vae_reconstructions": judge_accuracy(judge, evaluation, reconstruct(vae, evaluation)),
        }
        log.info("judge accuracy on %d held-out scenes: %s", len(evaluation), accuracy["scenes"])
        dino = timed("dino", lambda: train_dino(data, cfg["dino"], seed + 3))

        # SD's text encoder is CLIP's text tower, frozen.
        text_encoder = copy.deepcopy(clip.text_model).eval()
        latents = timed("latents", lambda: encode_latents(vae, data))
        unet = timed(
            "unet",
            lambda: train_unet(
                data, latents, tokenizer, text_encoder, cfg["unet"], seed + 4, SD_SCHEDULER_KWARGS
            ),
        )

        StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler(**SD_SCHEDULER_KWARGS),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(tmp / "sd", max_shard_size=SHARD)
        clip.save_pretrained(tmp / "clip", max_shard_size=SHARD)
        dino.save_pretrained(tmp / "dino", max_shard_size=SHARD)
        _write_processors(tmp, tokenizer)
        judge.save_pretrained(tmp / "judge")
        times["total"] = round(time.perf_counter() - t_job, 1)
        manifest = {
            "settings": cfg,
            "identifier": identifier,
            "code_sha256": code_digest(),
            "held_out_triples": sorted(list(t) for t in held_out),
            "judge_accuracy": accuracy,
            "seconds": times,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("world models written to %s in %.0f s", out_dir, times["total"])
    return manifest
