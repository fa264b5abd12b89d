"""Decoding an untrusted image file defensively: its size checked before any pixel is decoded,
animated and truncated files refused, EXIF orientation applied, any Pillow mode made 8-bit RGB
(or, for a mask, binary), and a centre crop to a square. Used by `prepare_references`."""

from __future__ import annotations

import contextlib
import re
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from sidpipe.io import SidpipeError

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
# Exceptions Pillow's decoders raise for damaged data (struct.error from header parsers).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


@contextlib.contextmanager
def _pil_limits(max_pixels: int) -> Iterator[None]:
    """Make Pillow refuse images over `max_pixels` and truncated files, restoring its globals.

    Pillow only warns between MAX_IMAGE_PIXELS and twice that, so the warning becomes an error;
    setting the global to our limit makes `references.max_pixels` the single knob. Another
    library may have switched LOAD_TRUNCATED_IMAGES on, which would silently pad with grey.
    """
    old_max, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_max, old_truncated


def _too_many_pixels(path: Path, pixels: int | str, max_pixels: int) -> SidpipeError:
    return SidpipeError(
        f"{path}: image has {pixels} pixels, more than the limit of {max_pixels} set by "
        "references.max_pixels in the config; downscale the image or raise the limit"
    )


def _bomb_error(path: Path, exc: Exception, max_pixels: int) -> SidpipeError:
    """Reword Pillow's decompression-bomb error; its own threshold is 2x ours, so omit it."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return _too_many_pixels(path, match.group(1) if match else f"too many ({exc})", max_pixels)


def load_oriented(path: Path, max_pixels: int) -> Image.Image:
    """Open, validate and fully decode `path`, then apply its EXIF orientation.

    The returned image keeps its original mode and no longer depends on the file.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise SidpipeError(
            f"{path}: cannot read the file ({exc}); check that it exists and is readable"
        ) from exc
    # Opening the file ourselves guarantees it is closed even when Image.open raises.
    with handle, _pil_limits(max_pixels):
        try:
            img = Image.open(handle)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb_error(path, exc, max_pixels) from exc
        except UnidentifiedImageError as exc:
            raise SidpipeError(
                f"{path}: not a readable image (Pillow recognises no image format in it); "
                "re-export it as JPEG or PNG, or move it out of the reference folder"
            ) from exc
        except _DECODE_ERRORS as exc:
            raise SidpipeError(
                f"{path}: not a readable image ({exc}); re-export it as JPEG or PNG, "
                "or move it out of the reference folder"
            ) from exc
        width, height = img.size
        # Image.open only parsed the header, so this check runs before any pixel is decoded.
        if width * height > max_pixels:
            raise _too_many_pixels(path, f"{width}x{height} = {width * height}", max_pixels)
        try:
            frames = getattr(img, "n_frames", 1)
            animated = getattr(img, "is_animated", False) or frames > 1
        except _DECODE_ERRORS as exc:
            raise SidpipeError(
                f"{path}: truncated or corrupt image ({exc}); re-export or re-download it"
            ) from exc
        # MPO (JPEG with extra pictures: phone depth or gain maps) shows its primary picture.
        if animated and img.format != "MPO":
            raise SidpipeError(
                f"{path}: animated images are not supported; export one frame "
                f"(found {frames} frames) as PNG or JPEG"
            )
        try:
            img.load()
            # exif_transpose returns a copy, detached from the file handle.
            return ImageOps.exif_transpose(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb_error(path, exc, max_pixels) from exc
        except _DECODE_ERRORS as exc:
            raise SidpipeError(
                f"{path}: truncated or corrupt image ({exc}); re-export or re-download it"
            ) from exc


def _to_uint8(img: Image.Image) -> Image.Image:
    """Map a high-bit-depth single-channel image (I;16*, I, F) to mode L.

    16-bit data is divided by 257 so 0..65535 maps exactly onto 0..255. For 32-bit integer and
    float images the scale follows the data's actual range: [0, 1] floats are scaled by 255,
    data already in [0, 255] (floats) or [0, 65535] is treated like 8-/16-bit, and anything
    else (negative values, wider ranges) is stretched linearly from its min..max.
    """
    values = np.asarray(img).astype(np.float64)
    low = float(values.min()) if values.size else 0.0
    high = float(values.max()) if values.size else 0.0
    if img.mode in _SIXTEEN_BIT_MODES:
        scaled = values / 257.0
    elif img.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif img.mode == "F" and low >= 0.0 and high <= 255.0:
        scaled = values
    elif low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited over white."""
    source_mode = img.mode
    try:
        if img.mode in _SIXTEEN_BIT_MODES or img.mode in {"I", "F"}:
            img = _to_uint8(img)
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba)
        rgb = img if img.mode == "RGB" else img.convert("RGB")
    except ValueError as exc:  # e.g. LAB TIFFs: Pillow has no conversion without a profile
        raise SidpipeError(
            f"{path}: colour mode {source_mode} cannot be converted to RGB ({exc}); "
            "re-export the image as 8-bit RGB"
        ) from exc
    # Drop metadata: an embedded ICC profile (e.g. CMYK) would be wrong for the new pixels.
    rgb.info = {}
    return rgb


def to_binary_mask(img: Image.Image, path: Path) -> Image.Image:
    """Convert a black-and-white mask of any mode to mode L with values 0 and 255.

    Accepted: values 0 and 255 (after conversion to grayscale), or 0 and 1; 16-bit and 32-bit
    masks also 0 and their maximum (65535). Anything else (grey anti-aliased or JPEG edges, a
    colour drawing) is an error: thresholding it silently would guess the subject's outline.
    """
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"))
        # A cut-out (subject opaque, the rest transparent but white) would read as all subject
        # by brightness; transparent black is read as it looks.
        if ((rgba[..., 3] < 255) & (rgba[..., :3].max(axis=-1) > 0)).any():
            raise SidpipeError(
                f"{path}: the mask has transparent pixels that are not black; masks are read by "
                "brightness (white = subject), so flatten it: save the subject white and the "
                "rest black, without transparency"
            )
    try:
        if img.mode in _SIXTEEN_BIT_MODES or img.mode in {"I", "F"}:
            values = np.asarray(img)
            foregrounds = (1, 255, 65535)
        else:
            values = np.asarray(img.convert("L"))
            foregrounds = (1, 255)
    except ValueError as exc:
        raise SidpipeError(
            f"{path}: mask mode {img.mode} cannot be read ({exc}); save it as a black-and-white "
            "PNG with values 0 and 255"
        ) from exc
    present = np.unique(values)
    if not any(np.isin(present, (0, fg)).all() for fg in foregrounds):
        shown = ", ".join(f"{v:g}" for v in present[:6].tolist())
        more = ", ..." if present.size > 6 else ""
        raise SidpipeError(
            f"{path}: mask is not black-and-white: it has {present.size} distinct values "
            f"({shown}{more}); save it as a black-and-white PNG with values 0 and 255 "
            "(white = subject), without anti-aliasing or JPEG compression"
        )
    binary = Image.fromarray(np.where(values > 0, 255, 0).astype(np.uint8))
    binary.info = {}
    return binary


def load_rgb(path: Path, max_pixels: int) -> Image.Image:
    """Open `path` with all validity checks, apply its EXIF orientation, return 8-bit RGB."""
    return to_rgb(load_oriented(path, max_pixels), Path(path))


def center_crop_resize(
    img: Image.Image, resolution: int, resample: Image.Resampling | int
) -> Image.Image:
    """Crop the largest centred square from `img` and resize it to `resolution` squared."""
    if resolution <= 0:
        raise SidpipeError(f"resolution must be a positive number of pixels, got {resolution}")
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Crop first: resize(box=...) would let the filter read pixels outside the square.
    square = img.crop((left, top, left + side, top + side))
    return square.resize((resolution, resolution), resample=resample)
