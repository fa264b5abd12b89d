"""Stage `class_images`: prior-preservation images of a subject's class from the base model.

Image i always comes from its own generator seeded by (seed, i), so a batch size change or a
resumed run gives the same pictures. Each PNG is written through a temp file + rename and
carries its prompt/seed/model in PNG text chunks; a rerun keeps every PNG whose chunks match
and generates only the missing or stale ones. `manifest.csv` is written last.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from sidpipe.io import SidpipeError, atomic_file, log, write_csv
from sidpipe.models import load_sd_pipeline

MANIFEST_FIELDS = ["index", "path", "prompt", "seed"]
CLASS_PLACEHOLDER = "{class}"


def image_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for image `index` of a run seeded `seed`."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _metadata(prompt: str, seed: int, fingerprint: dict[str, str]) -> dict[str, str]:
    return {"sidpipe_prompt": prompt, "sidpipe_seed": str(seed), **fingerprint}


def _is_valid(path: Path, resolution: int, expected: dict[str, str]) -> bool:
    """An existing image is kept only if it decodes, has the right size and was made with
    the same prompt, seed and sampler settings (its PNG text chunks say so)."""
    try:
        with Image.open(path) as img:
            img.load()
            text = dict(getattr(img, "text", {}))
            size = img.size
    except (OSError, SyntaxError, ValueError):
        return False
    return size == (resolution, resolution) and all(text.get(k) == v for k, v in expected.items())


def _save_png(img: Image.Image, path: Path, metadata: dict[str, str]) -> None:
    """Write via a temp file + rename so a killed job never leaves a truncated PNG."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    with atomic_file(path, "wb") as handle:
        img.save(handle, "PNG", pnginfo=info)


def generate_class_images(
    base_model: str,
    class_name: str,
    out_dir: Path,
    count: int = 200,
    prompt: str = "a photo of a {class}",
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "auto",
) -> list[dict]:
    """Generate (or complete) `count` class images `<i:04d>.png` plus `manifest.csv` in
    `out_dir` with the base model's DDIM sampler; return the manifest rows."""
    out_dir = Path(out_dir)
    if count < 1:
        raise SidpipeError(f"class_images.count must be at least 1, got {count}")
    if batch_size < 1:
        raise SidpipeError(f"class_images.batch_size must be at least 1, got {batch_size}")
    if resolution <= 0 or resolution % 8:
        raise SidpipeError(f"resolution={resolution} must be a positive multiple of 8")
    text = prompt.replace(CLASS_PLACEHOLDER, class_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Images made by another model or sampler setting are stale even if their prompt matches.
    fingerprint = {
        "sidpipe_model": str(base_model),
        "sidpipe_steps": str(steps),
        "sidpipe_guidance_scale": repr(float(guidance_scale)),
    }
    rows = [
        {"index": i, "path": f"{i:04d}.png", "prompt": text, "seed": image_seed(seed, i)}
        for i in range(count)
    ]
    missing = [
        row
        for row in rows
        if not _is_valid(
            out_dir / row["path"], resolution, _metadata(text, row["seed"], fingerprint)
        )
    ]
    log.info(
        "class images %r: %d of %d present, %d to generate in %s",
        class_name,
        count - len(missing),
        count,
        len(missing),
        out_dir,
    )
    if missing:
        pipe = load_sd_pipeline(base_model, dtype=dtype, device=device)
        pipe.set_progress_bar_config(disable=True)
        progress = tqdm(total=len(missing), desc=f"class images {class_name}", file=sys.stderr)
        with progress:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                # CPU generators: the same noise on any device, one stream per image.
                generators = [torch.Generator("cpu").manual_seed(row["seed"]) for row in chunk]
                images = pipe(
                    [text] * len(chunk),
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    height=resolution,
                    width=resolution,
                    generator=generators,
                ).images
                for row, img in zip(chunk, images, strict=True):
                    _save_png(img, out_dir / row["path"], _metadata(text, row["seed"], fingerprint))
                progress.update(len(chunk))
    write_csv(out_dir / "manifest.csv", rows, MANIFEST_FIELDS)
    return rows
