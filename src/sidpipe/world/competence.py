"""Competence of the world's base model: does it draw what a prompt asks, for combinations of
class, colour and background that no pretraining caption (or scene) held?"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidpipe.world.captions import background_phrase
from sidpipe.world.judge import load_judge, read_images


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(centre - half, 4), round(centre + half, 4))


def competence_prompts(held_out: list, seeds: list[int]) -> list[dict[str, Any]]:
    """ "a {colour} {class} {background}" for every held-out triple and seed."""
    rows = []
    for cls, colour, background in sorted(tuple(t) for t in held_out):
        prompt = f"a {colour} {cls} {background_phrase(background, 'prompt')}"
        for seed in seeds:
            rows.append(
                {
                    "prompt": prompt,
                    "class": cls,
                    "colour": colour,
                    "background": background,
                    "seed": seed,
                }
            )
    return rows


@torch.no_grad()
def measure_competence(
    sd_model: str | Path,
    judge_model: str | Path,
    held_out: list,
    seeds: list[int],
    steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Sample the base model on held-out combinations; the judge's read of background,
    colour and class: accuracy with Wilson 95 % intervals."""
    from sidpipe.models import load_sd_pipeline

    pipe = load_sd_pipeline(str(sd_model), "float32", "cpu")
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(judge_model)
    rows = competence_prompts(held_out, seeds)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        generators = [torch.Generator().manual_seed(int(r["seed"])) for r in chunk]
        out = pipe(
            [r["prompt"] for r in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=size,
            width=size,
        )
        images.extend(out.images)
    seen = read_images(judge, images)
    result: dict[str, Any] = {"samples": len(rows), "prompts": len({r["prompt"] for r in rows})}
    for key in ("background", "colour", "class"):
        hits = int(sum(s[key] == r[key] for s, r in zip(seen, rows, strict=True)))
        result[key] = {"accuracy": round(hits / len(rows), 4), "ci95": wilson(hits, len(rows))}
    result["images"] = images
    result["rows"] = rows
    result["seen"] = seen
    return result


def contact_sheet(images: list, columns: int = 16, scale: int = 2):
    """The images in a grid (nearest upscaling), for a quick look."""
    from PIL import Image

    arrays = [np.asarray(i) for i in images]
    h, w = arrays[0].shape[:2]
    rows = math.ceil(len(arrays) / columns)
    sheet = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for k, a in enumerate(arrays):
        r, c = divmod(k, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = a
    return Image.fromarray(sheet).resize(
        (columns * w * scale, rows * h * scale), Image.Resampling.NEAREST
    )
