"""Stage `segment_references`: subject masks and subject / non-subject segments per reference.

Masks come either from the user (`<stem>.mask.png` next to each photo, prepared by
`prepare_references`) or from Grounded-SAM: GroundingDINO finds the subject's box from a text
prompt, SAM turns the box into a mask. Each image gets its binary mask, an overlay for the
report, the subject segment (square, for the CLIP image encoder) and the non-subject segment.
Everything is written through `atomic_dir`, so a failure leaves no partial output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sidpipe.grounded_sam import (
    DEFAULT_DETECTOR,
    DEFAULT_SEGMENTER,
    Box,
    detect,
    grounding_prompt,
    segment_detections,
)
from sidpipe.io import SidpipeError, atomic_dir, atomic_file, log, read_csv, write_csv
from sidpipe.references import MASK_SUFFIX, mask_path_for

MANIFEST_FIELDS = [
    "subject",
    "image_id",
    "mask_path",
    "overlay_path",
    "subject_segment_path",
    "non_subject_segment_path",
    "backend",
    "detector",
    "segmenter",
    "text_prompt",
    "detector_score",
    "box_x0",
    "box_y0",
    "box_x1",
    "box_y1",
    "sam_iou",
    "mask_fraction",
    "flag",
]
BACKENDS = ("grounded_sam", "provided")
BOX_MODES = ("best", "union")

OVERLAY_COLOR = (255, 0, 255)  # magenta: rare in photos, visible on any background
OVERLAY_ALPHA = 0.5
BOX_COLOR = (255, 255, 0)


# --- mask geometry -------------------------------------------------------------------------


def _as_bool_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Non-zero pixels are the subject; the mask must be 2-D and match the image (w, h)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape != (size[1], size[0]):
        raise SidpipeError(
            f"mask shape {mask.shape} does not match the image ({size[0]}x{size[1]}, "
            f"expected shape {(size[1], size[0])})"
        )
    return mask != 0


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the non-zero pixels, x1/y1 exclusive; None for an empty mask."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return int(x0), int(y0), int(x1) + 1, int(y1) + 1


def subject_segment(image: Image.Image, mask: np.ndarray, size: int) -> Image.Image:
    """The subject alone for the CLIP image encoder: `image` x `mask` on black, cropped to the
    mask's bounding box, centred on a black square (aspect ratio kept), resized to `size`."""
    keep = _as_bool_mask(mask, image.size)
    box = mask_bbox(keep)
    if box is None:
        raise SidpipeError("the mask is empty: there is no subject to cut out")
    x0, y0, x1, y1 = box
    rgb = np.asarray(image.convert("RGB"))
    cut = np.where(keep[..., None], rgb, 0)[y0:y1, x0:x1].astype(np.uint8)
    height, width = cut.shape[:2]
    side = max(height, width)
    canvas = np.zeros((side, side, 3), np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = cut
    return Image.fromarray(canvas).resize((size, size), Image.Resampling.BICUBIC)


def non_subject_segment(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """`image` with the subject's pixels set to black, same size."""
    keep = _as_bool_mask(mask, image.size)
    rgb = np.asarray(image.convert("RGB"))
    return Image.fromarray(np.where(keep[..., None], 0, rgb).astype(np.uint8))


def overlay(image: Image.Image, mask: np.ndarray, box: Box | None = None) -> Image.Image:
    """`image` with the mask tinted semi-transparent magenta and the detector box outlined."""
    keep = _as_bool_mask(mask, image.size)
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    tint = np.asarray(OVERLAY_COLOR, np.float32)
    rgb[keep] = (1.0 - OVERLAY_ALPHA) * rgb[keep] + OVERLAY_ALPHA * tint
    out = Image.fromarray(np.rint(rgb).astype(np.uint8))
    if box is not None:
        x0, y0, x1, y1 = (round(v) for v in box)
        width = max(1, round(max(image.size) / 128))
        ImageDraw.Draw(out).rectangle(
            (x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=BOX_COLOR, width=width
        )
    return out


# --- Grounded-SAM on the references (the models run in sidpipe.grounded_sam) ---------------


@dataclass
class _Segmentation:
    mask: np.ndarray  # bool, (height, width)
    box: Box | None = None
    score: float | None = None
    iou: float | None = None


def _ways_out(box_threshold: float) -> str:
    return (
        "Ways out: (1) lower the subject's box threshold (its `box_threshold` column in the "
        f"subjects table, or segmentation.box_threshold in the config; now {box_threshold:g}); "
        "(2) change its text prompt (the `text_prompt` column of the subjects table; a short "
        "lower-case noun phrase such as 'toy car'); (3) provide masks: save a black-and-white "
        f"`<stem>{MASK_SUFFIX}` (subject white) next to each source image and use the "
        "`provided` backend (the subject's `mask_backend` column)."
    )


def _grounded_sam(
    images: list[Image.Image],
    ids: list[str],
    paths: list[Path],
    subject: str,
    prompt: str,
    detector: str,
    segmenter: str,
    box_threshold: float,
    text_threshold: float,
    box_mode: str,
    fill_holes: bool,
    largest_component: bool,
    batch_size: int,
    device: str,
) -> list[_Segmentation]:
    detections = detect(
        images,
        prompt,
        detector,
        device,
        box_threshold,
        text_threshold,
        box_mode,
        batch_size,
        subject,
    )
    # Report every image without a box at once, before SAM is even loaded.
    missed = [
        f"  {image_id} ({path}): best candidate scores "
        + ", ".join(f"{s:.3f}" for s in det.candidates)
        for image_id, path, det in zip(ids, paths, detections, strict=True)
        if det.box is None
    ]
    if missed:
        raise SidpipeError(
            f"subject {subject!r}: GroundingDINO ({detector}) found no box scoring above "
            f"box_threshold={box_threshold:g} for the prompt {prompt!r} in {len(missed)} of "
            f"{len(ids)} reference images:\n" + "\n".join(missed) + "\n" + _ways_out(box_threshold)
        )
    segmented = segment_detections(
        images, detections, segmenter, device, batch_size, subject, fill_holes, largest_component
    )
    results = []
    for image_id, path, det, found in zip(ids, paths, detections, segmented, strict=True):
        mask, iou = found
        if not mask.any():
            raise SidpipeError(
                f"subject {subject!r}, image {image_id} ({path}): SAM ({segmenter}) returned an "
                f"empty mask for the box {tuple(round(v, 1) for v in det.box)} (detector score "
                f"{det.score:.3f}, label {det.label!r}). " + _ways_out(box_threshold)
            )
        results.append(_Segmentation(mask, det.box, det.score, iou))
    return results


# --- provided masks ------------------------------------------------------------------------


def _provided(
    rows: list[dict[str, str]], images: list[Image.Image], references_dir: Path, subject: str
) -> list[_Segmentation]:
    """The user's masks exactly as `prepare_references` cropped and resized them."""
    missing = [row for row in rows if not row.get("mask_path")]
    if missing:
        expected = ", ".join(str(mask_path_for(Path(row["source_path"]))) for row in missing)
        raise SidpipeError(
            f"subject {subject!r}: the `provided` mask backend needs a mask for every reference "
            f"image, but {', '.join(row['image_id'] for row in missing)} ha"
            f"{'s' if len(missing) == 1 else 've'} none; add a black-and-white mask (subject "
            f"white, same size as the photo) as {expected}, then re-run, or use the "
            "grounded_sam backend (the subject's `mask_backend` column or segmentation.backend)"
        )
    results = []
    for row, image in zip(rows, images, strict=True):
        path = references_dir / row["mask_path"]
        try:
            with Image.open(path) as handle:
                values = np.asarray(handle.convert("L"))
        except OSError as exc:
            raise SidpipeError(
                f"{path}: cannot read the prepared mask ({exc}); re-run prepare_references"
            ) from exc
        if values.shape != (image.height, image.width) or not np.isin(values, (0, 255)).all():
            raise SidpipeError(
                f"{path}: not a {image.width}x{image.height} 0/255 mask as prepare_references "
                "writes; re-run prepare_references for this subject"
            )
        mask = values == 255
        if not mask.any():
            raise SidpipeError(
                f"{mask_path_for(Path(row['source_path']))}: the provided mask of "
                f"{row['image_id']} has no subject pixels once prepared ({path}): it is all "
                "black, or its subject lies outside the square centre crop of the image; paint "
                "the subject white (or crop the image and its mask around the subject), or use "
                "the grounded_sam backend"
            )
        results.append(_Segmentation(mask))
    return results


# --- the stage -----------------------------------------------------------------------------


def _read_references(
    references_dir: Path, subject: str
) -> tuple[list[dict[str, str]], list[Image.Image]]:
    manifest = references_dir / "manifest.csv"
    if not manifest.is_file():
        raise SidpipeError(
            f"{manifest} does not exist; run prepare_references for subject {subject!r} first"
        )
    rows = read_csv(manifest)
    if not rows:
        raise SidpipeError(f"{manifest} lists no images; re-run prepare_references")
    others = sorted({row["subject"] for row in rows} - {subject})
    if others:
        raise SidpipeError(
            f"{manifest} belongs to subject(s) {', '.join(others)}, not {subject!r}; "
            "check the references folder passed for this subject"
        )
    images = []
    for row in rows:
        path = references_dir / row["path"]
        try:
            with Image.open(path) as handle:
                images.append(handle.convert("RGB"))
        except OSError as exc:
            raise SidpipeError(
                f"{path}: cannot read the prepared reference ({exc}); re-run prepare_references"
            ) from exc
    return rows, images


def _flag(fraction: float, min_fraction: float, max_fraction: float) -> str:
    if fraction < min_fraction:
        return "small_mask"
    if fraction > max_fraction:
        return "large_mask"
    return ""


def _check_args(
    backend: str,
    box_mode: str,
    segment_size: int,
    min_fraction: float,
    max_fraction: float,
    batch_size: int,
) -> None:
    if backend not in BACKENDS:
        raise SidpipeError(f"unknown mask backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if box_mode not in BOX_MODES:
        raise SidpipeError(f"unknown box_mode {box_mode!r}; use one of {', '.join(BOX_MODES)}")
    if segment_size < 1:
        raise SidpipeError(f"segment_size must be a positive number of pixels, got {segment_size}")
    if not 0.0 <= min_fraction <= max_fraction <= 1.0:
        raise SidpipeError(
            f"need 0 <= min_fraction <= max_fraction <= 1, got {min_fraction} and {max_fraction}"
        )
    if batch_size < 1:
        raise SidpipeError(f"batch_size must be at least 1, got {batch_size}")


def _round(value: float | None, digits: int) -> float | str:
    return "" if value is None else round(float(value), digits)


def segment_references(
    references_dir: Path,
    out_dir: Path,
    subject: str,
    class_name: str,
    backend: str = "grounded_sam",
    detector: str | None = None,
    segmenter: str | None = None,
    text_prompt: str | None = None,
    box_threshold: float = 0.3,
    text_threshold: float = 0.25,
    box_mode: str = "best",
    fill_holes: bool = True,
    largest_component: bool = True,
    segment_size: int = 224,
    min_fraction: float = 0.01,
    max_fraction: float = 0.95,
    batch_size: int = 8,
    device: str = "auto",
) -> list[dict]:
    """Write masks/, overlays/, subject/, non_subject/ (`<image_id>.png` each) and
    `manifest.csv` for one subject's prepared references; return the manifest rows.

    `out_dir` is created (or replaced) only if every image succeeds. The detector prompt is
    `text_prompt` or else `class_name`; `detector` / `segmenter` default to the paper's models.
    """
    references_dir, out_dir = Path(references_dir), Path(out_dir)
    _check_args(backend, box_mode, segment_size, min_fraction, max_fraction, batch_size)
    rows, images = _read_references(references_dir, subject)
    ids = [row["image_id"] for row in rows]
    paths = [references_dir / row["path"] for row in rows]

    prompt = detector_name = segmenter_name = ""
    if backend == "provided":
        segmentations = _provided(rows, images, references_dir, subject)
    else:
        prompt = grounding_prompt(text_prompt or class_name)
        detector_name = detector or DEFAULT_DETECTOR
        segmenter_name = segmenter or DEFAULT_SEGMENTER
        segmentations = _grounded_sam(
            images,
            ids,
            paths,
            subject,
            prompt,
            detector_name,
            segmenter_name,
            box_threshold,
            text_threshold,
            box_mode,
            fill_holes,
            largest_component,
            batch_size,
            device,
        )

    out_rows: list[dict] = []
    with atomic_dir(out_dir) as tmp:
        for folder in ("masks", "overlays", "subject", "non_subject"):
            (tmp / folder).mkdir()
        for image_id, image, seg in zip(ids, images, segmentations, strict=True):
            names = {
                folder: f"{folder}/{image_id}.png"
                for folder in ("masks", "overlays", "subject", "non_subject")
            }
            Image.fromarray(seg.mask.astype(np.uint8) * 255).save(tmp / names["masks"])
            overlay(image, seg.mask, seg.box).save(tmp / names["overlays"])
            subject_segment(image, seg.mask, segment_size).save(tmp / names["subject"])
            non_subject_segment(image, seg.mask).save(tmp / names["non_subject"])
            fraction = float(seg.mask.mean())
            flag = _flag(fraction, min_fraction, max_fraction)
            box = seg.box or (None, None, None, None)
            out_rows.append(
                {
                    "subject": subject,
                    "image_id": image_id,
                    "mask_path": names["masks"],
                    "overlay_path": names["overlays"],
                    "subject_segment_path": names["subject"],
                    "non_subject_segment_path": names["non_subject"],
                    "backend": backend,
                    "detector": detector_name,
                    "segmenter": segmenter_name,
                    "text_prompt": prompt,
                    "detector_score": _round(seg.score, 4),
                    "box_x0": _round(box[0], 1),
                    "box_y0": _round(box[1], 1),
                    "box_x1": _round(box[2], 1),
                    "box_y1": _round(box[3], 1),
                    "sam_iou": _round(seg.iou, 4),
                    "mask_fraction": round(fraction, 4),
                    "flag": flag,
                }
            )
            log.info(
                "%s/%s: %s mask covers %.1f%% of the image%s",
                subject,
                image_id,
                backend,
                100 * fraction,
                ""
                if seg.box is None
                else f" (box {tuple(round(v, 1) for v in seg.box)}, score {seg.score:.3f}, "
                f"SAM IoU {seg.iou:.3f})",
            )
            if flag:
                log.warning(
                    "%s/%s: %s: the mask covers %.1f%% of the image, outside [%g%%, %g%%]; "
                    "check %s and, if it is wrong, change the text prompt or provide a mask",
                    subject,
                    image_id,
                    flag,
                    100 * fraction,
                    100 * min_fraction,
                    100 * max_fraction,
                    out_dir / names["overlays"],
                )
        write_csv(tmp / "manifest.csv", out_rows, MANIFEST_FIELDS)
    return out_rows


__all__ = [
    "write_overlay_grid",
    "BACKENDS",
    "BOX_MODES",
    "MANIFEST_FIELDS",
    "mask_bbox",
    "non_subject_segment",
    "overlay",
    "segment_references",
    "subject_segment",
]


def write_overlay_grid(out_dir: Path, rows: list[dict], grid_path: Path, tile: int = 128) -> None:
    """One report figure per subject: every reference's overlay side by side, flags marked."""
    from PIL import ImageDraw

    tiles = [Image.open(Path(out_dir) / row["overlay_path"]).convert("RGB") for row in rows]
    grid = Image.new("RGB", (tile * max(len(tiles), 1), tile + 14), "white")
    draw = ImageDraw.Draw(grid)
    for index, (row, image) in enumerate(zip(rows, tiles, strict=True)):
        grid.paste(image.resize((tile, tile), Image.Resampling.BICUBIC), (index * tile, 14))
        label = f"{row['image_id']} {100 * float(row['mask_fraction']):.0f}% {row['flag']}"
        draw.text((index * tile + 2, 1), label, fill="red" if row["flag"] else "black")
    with atomic_file(grid_path, "wb") as handle:
        grid.save(handle, format="PNG")
