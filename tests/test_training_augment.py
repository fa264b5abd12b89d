"""Custom Diffusion's resize augmentation (`sidpipe.training.augment`): the draws, the rescaled
image and its loss mask, and the per-image masked loss."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from sidpipe.training.augment import PREFIXES, Resize, draw_resize, resize_batch, resize_image
from sidpipe.training.base import Batch, diffusion_loss


def test_draws_follow_the_reference_script() -> None:
    """diffusers' train_custom_diffusion.py: a side in [S//3, S] with probability 0.66, else in
    [int(1.2 S), int(1.4 S)); offsets inside the larger square; the far-away prefixes below
    0.6 S, the close-up ones above S, none in between."""
    size, n = 64, 3000
    generator = torch.Generator().manual_seed(0)
    draws = [draw_resize(size, generator) for _ in range(n)]
    shrunk = [d for d in draws if d.side <= size]
    assert all(size // 3 <= d.side <= size for d in shrunk)
    assert all(int(1.2 * size) <= d.side < int(1.4 * size) for d in draws if d.side > size)
    assert abs(len(shrunk) / n - 0.66) < 0.03
    for d in draws:
        room = abs(d.side - size)
        assert 0 <= d.top <= room and 0 <= d.left <= room
        if d.side < 0.6 * size:
            assert PREFIXES[d.prefix] in ("a far away ", "very small ")
        elif d.side > size:
            assert PREFIXES[d.prefix] in ("zoomed in ", "close up ")
        else:
            assert d.prefix == 0
    assert set(Counter(d.prefix for d in draws)) == set(range(len(PREFIXES)))
    # the whole of each range is drawn, and the offsets spread over their room
    assert min(d.side for d in shrunk) == size // 3 and max(d.side for d in shrunk) == size
    zoomed = [d.side for d in draws if d.side > size]
    assert min(zoomed) == int(1.2 * size) and max(zoomed) == int(1.4 * size) - 1
    for axis in ("top", "left"):
        spread = [getattr(d, axis) / abs(d.side - size) for d in draws if d.side != size]
        assert abs(sum(spread) / len(spread) - 0.5) < 0.03
        assert min(spread) == 0 and max(spread) == 1
    again = torch.Generator().manual_seed(0)
    assert [draw_resize(size, again) for _ in range(n)] == draws  # the generator decides all


def test_a_shrunk_image_is_pasted_on_grey_and_its_mask_starts_one_cell_in() -> None:
    pixels = torch.rand(3, 32, 32) * 2 - 1
    image, mask = resize_image(pixels, Resize(side=20, top=4, left=6, prefix=1), latent_size=16)
    scaled = F.interpolate(pixels[None], size=(20, 20), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(image[:, 4:24, 6:26], scaled)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[4:24, 6:26] = False
    assert torch.all(image[:, outside] == 0)
    expected = torch.zeros(1, 16, 16)
    expected[0, 3:11, 4:12] = 1  # rows 4//2+1 .. 24//2-1, columns 6//2+1 .. 26//2-1
    assert torch.equal(mask, expected)


def test_a_zoomed_image_is_a_crop_of_the_enlarged_one_with_a_full_mask() -> None:
    pixels = torch.rand(3, 32, 32) * 2 - 1
    image, mask = resize_image(pixels, Resize(side=42, top=7, left=3, prefix=3), latent_size=16)
    scaled = F.interpolate(pixels[None], size=(42, 42), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(image, scaled[:, 7:39, 3:35])
    assert torch.equal(mask, torch.ones(1, 16, 16))


def test_a_batch_is_mirrored_before_it_is_rescaled() -> None:
    pixels = torch.rand(2, 3, 32, 32)
    flipped = torch.tensor([True, False])
    images, masks, prefixes = resize_batch(pixels, flipped, 16, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    for i, source in enumerate((pixels[0].flip(-1), pixels[1])):
        draw = draw_resize(32, generator)
        image, mask = resize_image(source, draw, 16)
        assert torch.equal(images[i], image) and torch.equal(masks[i], mask)
        assert prefixes[i] == draw.prefix


class _Echo(torch.nn.Module):
    """A "UNet" whose prediction is its input: the error is then known in closed form."""

    def forward(self, sample, timesteps, hidden):
        return type("Out", (), {"sample": sample})()


class _NoNoise:
    config = type("Config", (), {"prediction_type": "epsilon"})()

    @staticmethod
    def add_noise(latents, noise, timesteps):
        return latents


def test_each_image_counts_alike_however_large_its_region() -> None:
    """The reference: every image's mean squared error over its own region, then the mean over
    the images; a pooled mean over all region cells would let the larger region dominate."""
    latents = torch.zeros(3, 4, 4, 4)
    latents[0] = 1.0  # error 1 everywhere
    latents[1] = 3.0  # error 9 everywhere
    masks = torch.zeros(3, 1, 4, 4)
    masks[0, 0, :1, :1] = 1  # one cell
    masks[1] = 1  # all 16 cells
    masks[2] = 1  # the class image: plain mean, error 0
    noise = torch.zeros_like(latents)
    batch = Batch(latents, torch.zeros(3, 77), torch.tensor([False, False, True]), masks, True)
    loss, parts = diffusion_loss(_Echo(), _NoNoise(), batch, None, noise, None, 1.0)
    assert parts["instance_loss"] == pytest.approx((1 + 9) / 2)
    assert parts["prior_loss"] == 0.0
    pooled = Batch(latents, torch.zeros(3, 77), batch.is_prior, masks, False)
    _, parts = diffusion_loss(_Echo(), _NoNoise(), pooled, None, noise, None, 1.0)
    assert parts["instance_loss"] == pytest.approx((1 + 16 * 9) / 17)
