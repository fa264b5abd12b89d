"""Custom Diffusion's resize augmentation, as diffusers' examples/custom_diffusion does it (on
unless `--noaug`; the official code's `MaskBase(aug=True)` does the same, see below).

Each time a reference is drawn it is rescaled to a random side: with probability 0.66 between
a third of the training resolution and the resolution itself, pasted at a random place on a
zero (mid-grey) canvas, and otherwise between 1.2 and 1.4 times the resolution, randomly
cropped back to it. The loss only counts the latent cells inside the pasted image (a mask one
cell in from its edge), and the caption says what happened: "a far away " or "very small "
before it when the side is under 0.6 of the resolution, "zoomed in " or "close up " when it is
over the resolution. Class (prior) images are not rescaled.

Where the official code (adobe-research/custom-diffusion, `src/finetune_data.py`) differs:
it shrinks with probability 2/3, only below 0.6 of the resolution (between 0.6 and 1 the image
stays whole), rounds the side to an even number, centres the paste at a random point and
resizes bicubically. We follow diffusers, the implementation this pipeline's other methods
follow too. Where we differ from both: they rescale the original photo (diffusers squashing a
non-square one), we the prepared reference, already centre-cropped and resized to the training
resolution (so a zoom-in is upsampled from it); and the loss's scale (see `diffusion_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Caption prefixes, by index; 0 is none.
PREFIXES = ("", "a far away ", "very small ", "zoomed in ", "close up ")
_SHRINK_PROBABILITY = 0.66


@dataclass(frozen=True)
class Resize:
    """One draw: the rescaled side, the paste (or crop) offset and the caption prefix."""

    side: int
    top: int
    left: int
    prefix: int  # index into PREFIXES


def draw_resize(size: int, generator: torch.Generator) -> Resize:
    """A random rescale of a `size` x `size` image, drawn from `generator` in the reference's
    order (which branch, the side, the offsets, the prefix)."""

    def integer(low: int, high: int) -> int:  # numpy's randint(low, high): high excluded
        return int(torch.randint(low, high, (), generator=generator))

    if float(torch.rand((), generator=generator)) < _SHRINK_PROBABILITY:
        side = integer(size // 3, size + 1)
    else:
        side = integer(int(1.2 * size), int(1.4 * size))
    outer, inner = (side, size) if side > size else (size, side)
    top, left = integer(0, outer - inner + 1), integer(0, outer - inner + 1)
    prefix = 0
    if side < 0.6 * size:
        prefix = 1 + integer(0, 2)
    elif side > size:
        prefix = 3 + integer(0, 2)
    return Resize(side=side, top=top, left=left, prefix=prefix)


def resize_image(
    pixels: torch.Tensor, resize: Resize, latent_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pixels` (3, S, S) in [-1, 1] rescaled by `resize`: the (3, S, S) training image and the
    (1, h, h) mask of the latent cells the loss counts (h = `latent_size`).

    Bilinear with antialiasing, as PIL's BILINEAR that the reference uses. A shrunk image's
    mask starts and ends one cell inside it (the reference's `top // factor + 1` ..
    `(top + side) // factor - 1`); at tiny resolutions that can leave no cell at all, and the
    image then adds 0 to the mean over the batch's images (the reference would give NaN)."""
    size = pixels.shape[-1]
    factor = size // latent_size
    side, top, left = resize.side, resize.top, resize.left
    scaled = F.interpolate(
        pixels[None].float(), size=(side, side), mode="bilinear", antialias=True
    )[0]
    if side > size:
        image = scaled[:, top : top + size, left : left + size]
        return image.contiguous(), torch.ones(1, latent_size, latent_size)
    image = torch.zeros(3, size, size)
    image[:, top : top + side, left : left + side] = scaled
    mask = torch.zeros(1, latent_size, latent_size)
    rows = slice(top // factor + 1, (top + side) // factor - 1)
    cols = slice(left // factor + 1, (left + side) // factor - 1)
    mask[0, rows, cols] = 1.0
    return image, mask


def resize_batch(
    pixels: torch.Tensor, flipped: torch.Tensor, latent_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Each (3, S, S) image of `pixels`, mirrored where `flipped` (before rescaling, as the
    reference), rescaled by a fresh draw: the images, their loss masks (B, 1, h, h) and the
    indices of their caption prefixes."""
    images, masks, prefixes = [], [], []
    for image, mirror in zip(pixels, flipped.tolist(), strict=True):
        resize = draw_resize(image.shape[-1], generator)
        image, mask = resize_image(image.flip(-1) if mirror else image, resize, latent_size)
        images.append(image)
        masks.append(mask)
        prefixes.append(resize.prefix)
    return torch.stack(images), torch.stack(masks), prefixes
