"""A subject's training set: reference photos with their own descriptions, optional subject
masks and class (prior-preservation) images, as tensors; plus the latent and text caches.

Every image is VAE-encoded once per job (and its mirror image too when flipping is on); each
step then only samples `mean + std * noise` from the cached distribution with the job's
generator, which is exactly what re-encoding would give, minus the encoder pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from sidpipe.io import SidpipeError, log, read_csv, read_manifest
from sidpipe.subsets import select_references
from sidpipe.training.base import PLACEHOLDER

VAE_BATCH = 8  # images per VAE encoder call while filling the cache


@dataclass
class TrainingSet:
    """Pixels in [-1, 1] at the training resolution; masks at latent resolution in [0, 1]."""

    image_ids: list[str]
    descriptions: list[str]
    pixels: torch.Tensor  # (N, 3, H, W)
    masks: torch.Tensor | None  # (N, 1, h, w) or None
    class_pixels: torch.Tensor | None  # (M, 3, H, W) or None
    class_prompts: list[str] = field(default_factory=list)
    resolution: int = 512


def read_descriptions(
    descriptions_csv: Path, image_ids: list[str], subset: bool = False
) -> list[str]:
    """Each reference's own description, in `image_ids` order; exactly one per image.
    `subset`: the ids are part of the subject's references (the others' rows are expected)."""
    path = Path(descriptions_csv)
    if not path.is_file():
        raise SidpipeError(f"{path} does not exist; run describe_references first")
    rows = read_csv(path)
    if rows and not {"image_id", "description"} <= set(rows[0]):
        raise SidpipeError(f"{path}: needs the columns image_id and description")
    counts = Counter(row["image_id"] for row in rows)
    by_id = {row["image_id"]: row["description"] for row in rows}
    for image_id in image_ids:
        if counts[image_id] != 1:
            raise SidpipeError(
                f"{path}: reference image {image_id!r} has {counts[image_id]} descriptions, "
                "but needs exactly one; re-run describe_references or fix the table"
            )
        if not by_id[image_id].strip():
            raise SidpipeError(f"{path}: the description of image {image_id!r} is empty")
        if PLACEHOLDER not in by_id[image_id]:
            log.warning(
                "%s: the description of %s has no %s, so it never mentions the subject's token",
                path,
                image_id,
                PLACEHOLDER,
            )
    extra = sorted(set(counts) - set(image_ids))
    if extra and not subset:
        log.warning("%s: descriptions of unknown images %s ignored", path, ", ".join(extra))
    return [by_id[image_id] for image_id in image_ids]


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """An RGB image as a (3, R, R) float tensor in [-1, 1] (centre-cropped and resized)."""
    try:
        with Image.open(path) as handle:
            img = handle.convert("RGB")
    except OSError as exc:
        raise SidpipeError(f"{path}: cannot read the training image ({exc})") from exc
    if img.size != (resolution, resolution):
        img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.LANCZOS)
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_mask(path: Path, latent_size: int) -> torch.Tensor:
    """A 0/255 mask as the (1, h, w) fraction of subject pixels under each latent cell."""
    try:
        with Image.open(path) as handle:
            array = np.asarray(handle.convert("L"), dtype=np.float32) / 255.0
    except OSError as exc:
        raise SidpipeError(
            f"{path}: cannot read the mask ({exc}); re-run segment_references"
        ) from exc
    if array.shape[0] != array.shape[1]:
        raise SidpipeError(f"{path}: mask is {array.shape[1]}x{array.shape[0]}, not square")
    mask = torch.from_numpy(array)[None, None]
    # Area pooling keeps partial coverage (edges count by their fraction).
    return F.interpolate(mask, size=(latent_size, latent_size), mode="area")[0].clamp(0, 1)


def read_training_set(
    references_dir: Path,
    descriptions_csv: Path,
    masks_dir: Path | None = None,
    class_images_dir: Path | None = None,
    resolution: int | None = None,
    latent_factor: int = 8,
    reference_subset: int | str | None = None,
) -> TrainingSet:
    """Load one subject's references (+ descriptions, masks, class images).

    `resolution` defaults to the prepared references' size; `latent_factor` is the VAE's
    downsampling factor, giving the masks' size; `reference_subset` keeps part of the
    references (`sidpipe.subsets.select_references`: a count or an image id).
    """
    references_dir = Path(references_dir)
    refs = read_manifest(
        references_dir, "reference images", "prepare_references", ("image_id", "path")
    )
    keep = select_references(
        [row["image_id"] for row in refs], reference_subset, str(references_dir)
    )
    refs = [row for row in refs if row["image_id"] in keep]
    image_ids = [row["image_id"] for row in refs]
    descriptions = read_descriptions(descriptions_csv, image_ids, reference_subset is not None)
    if resolution is None:
        with Image.open(references_dir / refs[0]["path"]) as first:
            resolution = first.size[0]
    if resolution % latent_factor:
        raise SidpipeError(
            f"training resolution {resolution} is not a multiple of the VAE factor {latent_factor}"
        )
    pixels = torch.stack([load_pixels(references_dir / row["path"], resolution) for row in refs])

    masks = None
    if masks_dir is not None:
        masks_dir = Path(masks_dir)
        rows = {
            row["image_id"]: row
            for row in read_manifest(
                masks_dir, "masks", "segment_references", ("image_id", "mask_path")
            )
        }
        lacking = [image_id for image_id in image_ids if image_id not in rows]
        if lacking:
            raise SidpipeError(
                f"{masks_dir / 'manifest.csv'}: no mask for reference(s) {', '.join(lacking)}; "
                "re-run segment_references for this subject"
            )
        size = resolution // latent_factor
        masks = torch.stack([load_mask(masks_dir / rows[i]["mask_path"], size) for i in image_ids])

    class_pixels, class_prompts = None, []
    if class_images_dir is not None:
        class_images_dir = Path(class_images_dir)
        rows = read_manifest(class_images_dir, "class images", "class_images", ("path", "prompt"))
        class_pixels = torch.stack(
            [load_pixels(class_images_dir / row["path"], resolution) for row in rows]
        )
        class_prompts = [row["prompt"] for row in rows]
    return TrainingSet(
        image_ids=image_ids,
        descriptions=descriptions,
        pixels=pixels,
        masks=masks,
        class_pixels=class_pixels,
        class_prompts=class_prompts,
        resolution=resolution,
    )


class LatentSource:
    """VAE latents of a fixed image set: the posterior's mean/std, cached or re-encoded.

    `sample(indices, flipped, generator)` returns scaled latents
    `(mean + std * randn) * scaling_factor` with the noise drawn from `generator` (CPU), so
    cached and uncached runs consume the job's random stream identically.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        pixels: torch.Tensor,
        flip: bool,
        cache: bool = True,
        device: torch.device | None = None,
    ) -> None:
        self.vae = vae
        self.pixels = pixels
        self.flip = flip
        self.cache = cache
        self.device = device or next(vae.parameters()).device
        self.dtype = next(vae.parameters()).dtype
        config = vae.config
        self.scaling = float(config.scaling_factor)
        self.shift = float(getattr(config, "shift_factor", None) or 0.0)
        self._mean: dict[bool, torch.Tensor] = {}
        self._std: dict[bool, torch.Tensor] = {}
        if cache:
            for flipped in (False, True) if flip else (False,):
                images = pixels.flip(-1) if flipped else pixels
                mean, std = self._encode_all(images)
                self._mean[flipped], self._std[flipped] = mean, std

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _encode_all(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self._encode(images[i : i + VAE_BATCH]) for i in range(0, len(images), VAE_BATCH)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _dist(
        self, indices: torch.Tensor, flipped: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache:
            pick = flipped.to(self._mean[False].device)[:, None, None, None]
            idx = indices.to(self._mean[False].device)
            mean, std = self._mean[False][idx], self._std[False][idx]
            if self.flip:
                mean = torch.where(pick, self._mean[True][idx], mean)
                std = torch.where(pick, self._std[True][idx], std)
            return mean, std
        images = self.pixels[indices]
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
        return self._encode(images)

    def sample(
        self, indices: torch.Tensor, flipped: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        return self._draw(*self._dist(indices, flipped), generator)

    def sample_images(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of images outside the set, encoded now (the resize augmentation's
        rescaled references, new at every step)."""
        return self._draw(*self._encode(images), generator)

    def _draw(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        return (mean + std * noise.to(mean.device) - self.shift) * self.scaling


def tokenize(tokenizer: object, captions: list[str]) -> torch.Tensor:
    """(B, max_length) input ids, padded and truncated as Stable Diffusion's pipeline does."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def warn_truncated(tokenizer: object, captions: list[str]) -> None:
    """CLIP sees at most 77 tokens; long SID descriptions lose their tail silently otherwise."""
    limit = tokenizer.model_max_length
    for caption in dict.fromkeys(captions):
        length = len(tokenizer(caption, truncation=False).input_ids)
        if length > limit:
            log.warning(
                "caption has %d tokens, over the text encoder's %d; its end is cut: %r",
                length,
                limit,
                caption,
            )


class TextCache:
    """Text encoder outputs of a frozen text encoder, computed once per distinct caption."""

    def __init__(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        captions: list[str],
        input_ids: torch.Tensor,
    ) -> None:
        unique = list(dict.fromkeys(captions))
        self.row = torch.tensor([unique.index(caption) for caption in captions])
        first = [captions.index(caption) for caption in unique]
        with torch.no_grad():
            self.states = encode(input_ids[first])

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        """Encoder outputs for the images at `indices` (positions in `captions`)."""
        return self.states[self.row[indices].to(self.states.device)]
