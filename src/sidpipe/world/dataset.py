"""Pretraining data: scenes rendered in bulk, with the label arrays the judge learns from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sidpipe.world.architectures import JUDGE_FLAGS, JUDGE_HEADS
from sidpipe.world.draw import render
from sidpipe.world.grammar import ELEMENT_NAMES, Scene, sample_scene


@dataclass
class SceneSet:
    """N rendered scenes: uint8 images (N, H, W, 3), bool masks (N, H, W), their truth, and
    int64 labels per judge head (-1: not applicable), float flags (N, F), flag validity."""

    images: np.ndarray
    masks: np.ndarray
    scenes: list[Scene]
    labels: dict[str, np.ndarray]
    flags: np.ndarray
    flag_valid: np.ndarray

    def __len__(self) -> int:
        return len(self.scenes)

    def pixels(self, index: np.ndarray | torch.Tensor | slice) -> torch.Tensor:
        """Images as float (B, 3, H, W) in [-1, 1]."""
        batch = torch.from_numpy(np.ascontiguousarray(self.images[index]))
        return batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def scene_labels(scene: Scene) -> tuple[dict[str, int], list[float], list[float]]:
    """Judge targets of one scene: categorical indices, flag values and flag validity."""
    subject = scene.subject
    labels = {
        "background": JUDGE_HEADS["background"].index(scene.background),
        "class": JUDGE_HEADS["class"].index(subject.cls),
        "colour": JUDGE_HEADS["colour"].index(subject.colour),
        "pattern": JUDGE_HEADS["pattern"].index(subject.pattern),
        "accent": JUDGE_HEADS["accent"].index(subject.accent) if subject.accent else -1,
    }
    present = {e.kind for e in scene.elements}
    values, valid = [], []
    for flag in JUDGE_FLAGS:
        if flag in ELEMENT_NAMES:
            values.append(float(flag in present))
            valid.append(1.0)
        elif flag == "hat":
            values.append(float(subject.hat is not None))
            valid.append(1.0)
        elif flag == "upside_down":
            values.append(float(subject.upside_down))
            valid.append(1.0)
    return labels, values, valid


def render_scenes(scenes: list[Scene], resolution: int, seed: int) -> SceneSet:
    """Render `scenes` (texture seeds derived from `seed` and the index) with their labels."""
    n = len(scenes)
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    masks = np.empty((n, resolution, resolution), dtype=bool)
    labels = {k: np.empty(n, dtype=np.int64) for k in JUDGE_HEADS}
    flags = np.empty((n, len(JUDGE_FLAGS)), dtype=np.float32)
    valid = np.empty((n, len(JUDGE_FLAGS)), dtype=np.float32)
    texture_seeds = np.random.SeedSequence([seed, 7]).generate_state(n)
    for i, scene in enumerate(scenes):
        image, mask = render(scene, resolution, seed=int(texture_seeds[i]))
        images[i] = np.asarray(image)
        masks[i] = np.asarray(mask) > 127
        row, values, ok = scene_labels(scene)
        for key, value in row.items():
            labels[key][i] = value
        flags[i], valid[i] = values, ok
    return SceneSet(images, masks, list(scenes), labels, flags, valid)


def random_scenes(
    n: int, seed: int, resolution: int, held_out: frozenset = frozenset()
) -> SceneSet:
    """`n` random scenes (none of the `held_out` class/colour/background triples)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, held_out=held_out) for _ in range(n)]
    return render_scenes(scenes, resolution, seed)
