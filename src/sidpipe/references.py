"""Stage `prepare_references`: validate a subject's reference photos and make square RGB PNGs.

Every source image is opened defensively (size checked before any pixel is decoded, animated
and truncated files refused), EXIF-rotated, converted to 8-bit RGB, centre-cropped to a square
and resized. An optional binary mask `<stem>.mask.png` next to an image gets the same geometry;
anything named like a mask (`<stem>.mask.<image suffix>`, any case) is never a reference.
Duplicates (same pixels) and images under `min_side` are refused; small or very elongated ones
are flagged in the log and the manifest's `warnings` column.
Outputs and `manifest.csv` are written through `atomic_dir`, so a failed run leaves the previous
complete output or nothing (an output whose manifest is gone is removed, never kept half).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import unicodedata
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from sidpipe.image_decode import center_crop_resize, load_oriented, to_binary_mask, to_rgb
from sidpipe.io import (
    SidpipeError,
    atomic_dir,
    log,
    read_csv,
    remove_incomplete,
    sha256_file,
    write_csv,
)

IMAGE_SUFFIXES = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"
}  # fmt: skip
# Photos a phone or camera writes that the references are not read from: named, not skipped.
UNREAD_PHOTO_SUFFIXES = {".heic", ".heif", ".avif", ".dng", ".cr2", ".cr3", ".nef", ".arw"}
MASK_SUFFIX = ".mask.png"
MANIFEST_FIELDS = [
    "subject",
    "image_id",
    "path",
    "sha256",
    "width",
    "height",
    "source_path",
    "source_sha256",
    "source_width",
    "source_height",
    "source_mode",
    "mask_path",
    "warnings",
]
# A source image whose centre crop keeps less than 1/MAX_ASPECT of it, or that is upscaled more
# than UPSCALE_WARN times, is flagged (log and manifest `warnings`).
MAX_ASPECT = 2.5
UPSCALE_WARN = 2.0

_INVALID_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def is_mask_file(path: Path) -> bool:
    """Whether a file is named like a subject mask: `<stem>.mask.<image suffix>`, any case."""
    name = Path(path).name.lower()
    return any(name.endswith(".mask" + suffix) for suffix in IMAGE_SUFFIXES)


def mask_path_for(image: Path) -> Path:
    """Where the optional mask of a reference image must be: `<stem>.mask.png` beside it."""
    return Path(image).with_name(Path(image).stem + MASK_SUFFIX)


def _check_folder(source_dir: Path) -> None:
    if not source_dir.exists():
        raise SidpipeError(
            f"reference folder {source_dir} does not exist; "
            "create it and put the subject's photos in it, or fix the path in the config"
        )
    if not source_dir.is_dir():
        raise SidpipeError(
            f"reference folder {source_dir} is not a directory; "
            "point the config at the folder that holds the subject's photos"
        )


def _visible(source_dir: Path) -> list[Path]:
    return sorted(
        (path for path in source_dir.iterdir() if not path.name.startswith(".")),
        key=lambda path: path.name,
    )


def list_reference_images(source_dir: Path) -> list[Path]:
    """Return the image files directly inside `source_dir`, sorted by name.

    Masks (anything named `*.mask.<image suffix>`, any case), files without an image suffix
    (descriptions.yaml, README, .DS_Store), hidden files (macOS `._photo.jpg` resource forks are
    not images) and broken links (see `broken_links`) are skipped.
    """
    source_dir = Path(source_dir)
    _check_folder(source_dir)
    return [
        path
        for path in _visible(source_dir)
        if path.is_file() and not is_mask_file(path) and path.suffix.lower() in IMAGE_SUFFIXES
    ]


def list_mask_files(source_dir: Path) -> list[Path]:
    """Every file in `source_dir` named like a mask, well-formed (`<stem>.mask.png`) or not."""
    source_dir = Path(source_dir)
    _check_folder(source_dir)
    return [path for path in _visible(source_dir) if path.is_file() and is_mask_file(path)]


def reference_inputs(source_dir: Path) -> list[Path]:
    """The files `prepare_references` reads from a folder: images and anything named like a
    mask (so that renaming a mask reruns the subject)."""
    return sorted(
        list_reference_images(source_dir) + list_mask_files(source_dir), key=lambda p: p.name
    )


def broken_links(source_dir: Path) -> list[Path]:
    """Symbolic links with an image suffix whose target is missing."""
    return [
        path
        for path in _visible(Path(source_dir))
        if path.is_symlink() and not path.exists() and path.suffix.lower() in IMAGE_SUFFIXES
    ]


def _check_mask_names(source_dir: Path) -> None:
    """Masks must be `<stem>.mask.png` exactly; any other mask-like name is an error (it would
    otherwise be ignored, and the subject segmented without it)."""
    problems = []
    for mask in list_mask_files(source_dir):
        if mask.name.endswith(MASK_SUFFIX):
            continue
        stem = mask.name[: mask.name.lower().rindex(".mask.")]
        target = mask.with_name(stem + MASK_SUFFIX)
        how = (
            f"rename it to {target.name}"
            if mask.name.lower().endswith(MASK_SUFFIX)
            else f"save it as a black-and-white PNG named {target.name} (lossy formats such as "
            "JPEG blur its edges) and delete this file"
        )
        problems.append(f"{mask}: named like a mask, but masks must be <stem>{MASK_SUFFIX}; {how}")
    if problems:
        raise SidpipeError(
            f"{source_dir}: mask file name(s) the workflow would not use:\n  "
            + "\n  ".join(problems)
        )


def image_id_for(path: Path) -> str:
    """The manifest id of a source image: its stem with characters outside [A-Za-z0-9_-] -> _.

    A stem with non-ASCII characters is transliterated (accents dropped, other characters
    removed; `img` if nothing is left) and suffixed with 8 hex digits of its sha256, so
    `café`, `cafe`, `犬` and `猫` all get distinct ids (the hash of the NFC form: macOS and Linux
    spellings of the same name agree).
    """
    stem = unicodedata.normalize("NFC", Path(path).stem)
    if stem.isascii():
        return _INVALID_ID_CHARS.sub("_", stem)
    plain = "".join(
        ch for ch in unicodedata.normalize("NFKD", stem) if not unicodedata.combining(ch)
    )
    plain = re.sub(r"_+", "_", _INVALID_ID_CHARS.sub("_", plain)).strip("_-") or "img"
    return f"{plain}-{hashlib.sha256(stem.encode('utf-8')).hexdigest()[:8]}"


def _check_ids(images: list[Path]) -> dict[str, Path]:
    """Map image ids to sources, refusing ids that clash (also case-insensitively: the PNGs
    must not overwrite each other on macOS or Windows filesystems)."""
    seen: dict[str, Path] = {}
    by_id: dict[str, Path] = {}
    for path in images:
        image_id = image_id_for(path)
        other = seen.get(image_id.lower())
        if other is not None:
            other_id = image_id_for(other)
            clash = (
                f"both give image id {image_id!r}"
                if other_id == image_id
                else f"give image ids {other_id!r} and {image_id!r}, which differ only in case"
            )
            raise SidpipeError(
                f"{other} and {path} {clash} (ids are file stems with characters outside "
                "[A-Za-z0-9_-] replaced by '_'); rename one of them"
            )
        seen[image_id.lower()] = path
        by_id[image_id] = path
    return by_id


def _prepare_mask(
    mask_path: Path, source: Path, source_size: tuple[int, int], resolution: int, max_pixels: int
) -> Image.Image:
    mask = load_oriented(mask_path, max_pixels)
    if mask.size != source_size:
        raise SidpipeError(
            f"{mask_path}: mask size {mask.size[0]}x{mask.size[1]} differs from its image "
            f"{source} ({source_size[0]}x{source_size[1]}, after EXIF orientation); "
            "re-export the mask at the image's size and orientation, or delete it"
        )
    # Checking first means an error names the user's file, and resize never sees exotic modes;
    # NEAREST only picks pixels, so the resized mask stays 0/255.
    # Named here, by the user's file; an error only where the masks are used (segment_references
    # with the provided backend), as grounded_sam subjects ignore them.
    binary = to_binary_mask(mask, mask_path)
    prepared = center_crop_resize(binary, resolution, Image.Resampling.NEAREST)
    if binary.getbbox() is None:
        log.warning("%s: the mask is all black (no subject pixels)", mask_path)
    elif prepared.getbbox() is None:
        log.warning(
            "%s: the subject lies outside the square centre crop of %s (or is under one pixel "
            "at %d px), so its prepared image does not show it; crop the image (and its mask) "
            "around the subject",
            mask_path,
            source,
            resolution,
        )
    return prepared


def _size_warnings(width: int, height: int, resolution: int) -> list[str]:
    short, long = min(width, height), max(width, height)
    found = []
    if short * UPSCALE_WARN < resolution:
        found.append(
            f"small: its shorter side of {short} px is upscaled {resolution / short:.1f}x to "
            f"the {resolution} px training resolution (blurry)"
        )
    if long > MAX_ASPECT * short:
        found.append(
            f"elongated: aspect ratio {width}:{height}, the square centre crop keeps "
            f"{100 * short / long:.0f} % of it"
        )
    return found


def prepare_references(
    source_dir: Path,
    out_dir: Path,
    subject: str,
    resolution: int,
    min_images: int = 3,
    max_pixels: int = 40_000_000,
    min_side: int = 64,
) -> list[dict]:
    """Write square RGB PNGs, optional binary masks and `manifest.csv` for one subject.

    `out_dir` is created (or replaced) only if every image succeeds; a failure leaves the
    previous complete output, or nothing. Returns the manifest rows; `source_width`/
    `source_height` are the source size after EXIF orientation. Images whose shorter side is
    under `min_side` pixels and images with the same pixels as another are refused.
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if resolution <= 0:
        raise SidpipeError(f"resolution must be a positive number of pixels, got {resolution}")
    if max_pixels <= 0:
        raise SidpipeError(
            f"references.max_pixels must be a positive number of pixels, got {max_pixels}"
        )
    if min_side <= 0:
        raise SidpipeError(f"references.min_side must be a positive number, got {min_side}")
    remove_incomplete(out_dir, "manifest.csv")
    try:
        return _prepare(source_dir, out_dir, subject, resolution, min_images, max_pixels, min_side)
    except BaseException:
        remove_incomplete(out_dir, "manifest.csv")
        raise


def _prepare(
    source_dir: Path,
    out_dir: Path,
    subject: str,
    resolution: int,
    min_images: int,
    max_pixels: int,
    min_side: int,
) -> list[dict]:
    images = list_reference_images(source_dir)
    if unread := [
        p.name for p in _visible(source_dir) if p.suffix.lower() in UNREAD_PHOTO_SUFFIXES
    ]:
        log.warning(
            "%s: not read as references (format not supported): %s; convert them to JPEG or "
            "PNG to use them",
            source_dir,
            ", ".join(unread),
        )
    links = broken_links(source_dir)
    skipped = (
        "; skipped broken link(s): "
        + ", ".join(f"{link} -> {os.readlink(link)}" for link in links)
        + " (restore their targets or delete the links)"
        if links
        else ""
    )
    if not images:
        raise SidpipeError(
            f"no reference images in {source_dir}; expected files with suffixes "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} (masks named *{MASK_SUFFIX} do not count)"
            + skipped
        )
    if len(images) < min_images:
        raise SidpipeError(
            f"{source_dir}: found {len(images)} reference image(s) but at least {min_images} "
            "are needed; add more photos of the subject, or lower references.min_images "
            "in the config" + skipped
        )
    if links:
        log.warning("%s: %d reference image(s) used%s", source_dir, len(images), skipped)
    _check_mask_names(source_dir)
    by_id = _check_ids(images)
    stems = {path.stem for path in images}
    for mask in sorted(source_dir.glob(f"*{MASK_SUFFIX}")):
        source_stem = mask.name[: -len(MASK_SUFFIX)]
        if source_stem not in stems:
            log.warning("%s: mask has no matching image %s.<suffix>; ignored", mask, source_stem)

    rows: list[dict] = []
    seen: dict[str, Path] = {}  # pixel digest -> source
    with atomic_dir(out_dir) as tmp:
        progress = tqdm(by_id.items(), desc=f"references {subject}", unit="img", file=sys.stderr)
        with progress:
            for image_id, source in progress:
                row, digest = _prepare_one(
                    tmp, image_id, source, subject, resolution, max_pixels, min_side
                )
                if digest in seen:
                    raise SidpipeError(
                        f"{seen[digest]} and {source} have the same pixels (one photo under two "
                        "names): training would see that view twice; delete one of them"
                    )
                seen[digest] = source
                rows.append(row)
        write_csv(tmp / "manifest.csv", rows, MANIFEST_FIELDS)
    flagged = [row for row in rows if row["warnings"]]
    if flagged:
        log.warning(
            "%s: %d of %d reference image(s) flagged (see the manifest's `warnings` column)",
            subject,
            len(flagged),
            len(rows),
        )
    return rows


def _prepare_one(
    tmp: Path,
    image_id: str,
    source: Path,
    subject: str,
    resolution: int,
    max_pixels: int,
    min_side: int,
) -> tuple[dict, str]:
    """Write one image (and its mask, if any) into `tmp`; return its manifest row and the
    sha256 of its decoded pixels."""
    oriented = load_oriented(source, max_pixels)
    width, height = oriented.size
    if min(width, height) < min_side:
        raise SidpipeError(
            f"{source}: {width}x{height} pixels; its shorter side is under the {min_side} px "
            "that references.min_side asks for; use a larger photo, move this one out of the "
            "folder, or lower references.min_side in the config"
        )
    rgb = to_rgb(oriented, source)
    pixels = hashlib.sha256(f"{width}x{height}".encode() + rgb.tobytes()).hexdigest()
    out_name = f"{image_id}.png"
    center_crop_resize(rgb, resolution, Image.Resampling.LANCZOS).save(tmp / out_name, "PNG")

    mask_rel = ""
    mask_source = mask_path_for(source)
    if mask_source.is_file():
        mask = _prepare_mask(mask_source, source, oriented.size, resolution, max_pixels)
        mask_rel = f"masks/{image_id}.png"
        (tmp / "masks").mkdir(exist_ok=True)
        mask.save(tmp / mask_rel, "PNG")

    flags = _size_warnings(width, height, resolution)
    for flag in flags:
        log.warning("%s: %s: %s", subject, source, flag)
    log.info(
        "%s: %s (%dx%d %s) -> %s%s",
        subject,
        source,
        width,
        height,
        oriented.mode,
        out_name,
        f" + {mask_rel}" if mask_rel else "",
    )
    row = {
        "subject": subject,
        "image_id": image_id,
        "path": out_name,
        "sha256": sha256_file(tmp / out_name),
        "width": resolution,
        "height": resolution,
        "source_path": str(source),
        "source_sha256": sha256_file(source),
        "source_width": width,
        "source_height": height,
        "source_mode": oriented.mode,
        "mask_path": mask_rel,
        "warnings": "; ".join(flags),
    }
    return row, pixels


def summarize_manifests(
    manifests: list[str | Path], subjects: list[dict], out_csv: str | Path
) -> list[dict]:
    """Gather the subjects' manifests into one tidy table (one row per prepared image)."""
    info = {row["subject"]: row for row in subjects}
    fields = ["subject", "class", "kind", "source", *MANIFEST_FIELDS[1:]]
    rows = []
    for manifest in manifests:
        for row in read_csv(manifest):
            extra = info.get(row["subject"], {})
            rows.append({**row, **{k: extra.get(k, "") for k in ("class", "kind", "source")}})
    write_csv(out_csv, rows, fields)
    log.info("%d images of %d subjects summarised", len(rows), len(manifests))
    return rows
