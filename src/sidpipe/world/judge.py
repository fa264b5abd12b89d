"""Reading images with the world's judge: what it sees, as names and probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sidpipe.io import SidpipeError
from sidpipe.world.architectures import WorldJudge


def load_judge(path: str | Path) -> WorldJudge:
    """The judge saved by `pretrain_world` (a folder with config.json + model.safetensors)."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise SidpipeError(
            f"judge folder {folder} (config key models.judge) has no config.json; point it at "
            "the judge/ folder written by pretrain_world"
        )
    return WorldJudge.from_pretrained(str(folder)).eval()


def to_pixels(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images -> (B, 3, r, r) in [-1, 1] (box-resized when not already r x r)."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.Resampling.BOX)
        arrays.append(np.asarray(image))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


@torch.no_grad()
def read_images(
    judge: WorldJudge, images: Sequence[Image.Image], batch_size: int = 256
) -> list[dict[str, Any]]:
    """Per image: the most likely name per head (with its probability), each flag's
    probability, and the subject mask (bool array at the image's resolution)."""
    out: list[dict[str, Any]] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = to_pixels(chunk, judge.resolution)
        raw = judge(pixels)
        flags = torch.sigmoid(raw["flags"])
        for i in range(len(chunk)):
            seen: dict[str, Any] = {}
            for head, names in judge.heads_vocab.items():
                probs = torch.softmax(raw[head][i], dim=0)
                best = int(probs.argmax())
                seen[head] = names[best]
                seen[f"{head}_p"] = float(probs[best])
            for j, name in enumerate(judge.flag_names):
                seen[name] = float(flags[i, j])
            mask = (raw["mask"][i] > 0).numpy()
            size = chunk[i].size
            if mask.shape != (size[1], size[0]):
                mask = (
                    np.asarray(
                        Image.fromarray(mask.astype(np.uint8) * 255).resize(
                            size, Image.Resampling.NEAREST
                        )
                    )
                    > 127
                )
            seen["mask"] = mask
            out.append(seen)
    return out
