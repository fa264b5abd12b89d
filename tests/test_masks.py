"""Tests for sidpipe.masks (stage `segment_references`); references and tiny models built here."""

from __future__ import annotations

import logging
import re
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sidpipe.grounded_sam import _label, grounding_prompt, postprocess_mask, segment_boxes
from sidpipe.io import SidpipeError, read_csv
from sidpipe.masks import (
    BOX_COLOR,
    MANIFEST_FIELDS,
    OVERLAY_COLOR,
    mask_bbox,
    non_subject_segment,
    overlay,
    segment_references,
    subject_segment,
)
from sidpipe.references import prepare_references
from sidpipe.tiny_models import build_tiny_models

CORPUS = ["a photo of sks dog", "a dog on the beach", "a red mug on a table"]
COLOR = (200, 60, 40)
SIZE = 64  # the demo's reference resolution
FOLDERS = ("masks", "overlays", "subject", "non_subject")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_tiny_models(tmp_path_factory.mktemp("models") / "tiny", CORPUS, seed=0)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random RGB in 1..255: no pixel is black, so zeroed pixels are easy to spot."""
    return np.random.default_rng(seed).integers(1, 256, (height, width, 3), dtype=np.uint8)


def rect_mask(height: int, width: int, top: int, left: int, h: int, w: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[top : top + h, left : left + w] = True
    return mask


def make_refs(root: Path, masks: dict[str, np.ndarray | None], seed: int = 0) -> Path:
    """Source photos (noise with a coloured square) plus the given masks, run through
    prepare_references at SIZE px (sources are SIZE px too, so masks stay pixel-exact)."""
    src = root / "src"
    src.mkdir(parents=True)
    for i, (stem, mask) in enumerate(masks.items()):
        arr = noise(SIZE, SIZE, seed + i)
        arr[16:48, 12 + i : 44 + i] = COLOR
        Image.fromarray(arr).save(src / f"{stem}.png")
        if mask is not None:
            Image.fromarray(mask.astype(np.uint8) * 255).save(src / f"{stem}.mask.png")
    refs = root / "references" / "dog"
    prepare_references(src, refs, subject="dog", resolution=SIZE, min_images=1)
    return refs


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img).copy()


def assert_clean(out_dir: Path) -> None:
    """A failed run leaves neither the output folder nor atomic_dir's temp folder behind."""
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.tmp-*"))


# --- geometry ------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(10, 20), (20, 10)])
def test_subject_segment_is_centred_and_keeps_the_aspect_ratio(h: int, w: int) -> None:
    arr = noise(SIZE, SIZE)
    top, left = 40, 5  # off-centre
    arr[top : top + h, left : left + w] = COLOR
    mask = rect_mask(SIZE, SIZE, top, left, h, w)
    seg = subject_segment(Image.fromarray(arr), mask, 224)
    assert (seg.mode, seg.size) == ("RGB", (224, 224))

    out = np.asarray(seg).astype(int)
    # Where the blurred edge crosses half the red value is the true edge, to a pixel.
    coloured = out[..., 0] > COLOR[0] / 2
    assert np.all(np.abs(out[100:124, 100:124] - COLOR) <= 2)  # the middle keeps its colour
    rows, cols = np.flatnonzero(coloured.any(axis=1)), np.flatnonzero(coloured.any(axis=0))
    # The 2:1 rectangle fills the long side and half the short side, centred: 56..168.
    long_span, short_span = (0, 224), (56, 168)
    want_rows, want_cols = (short_span, long_span) if w > h else (long_span, short_span)
    for got, want in ((rows, want_rows), (cols, want_cols)):
        assert abs(got[0] - want[0]) <= 1 and abs(got[-1] + 1 - want[1]) <= 1
    # The padding is black: bicubic only blends within a source pixel (11 px) of the edge.
    margins = (out[:40], out[184:]) if w > h else (out[:, :40], out[:, 184:])
    assert max(part.max() for part in margins) == 0


def test_subject_segment_blacks_out_the_bbox_outside_the_mask() -> None:
    arr = noise(SIZE, SIZE)
    mask = np.zeros((SIZE, SIZE), bool)
    for i in range(12):  # a triangle, bbox rows 20..32, cols 30..42
        mask[20 + i, 30 : 31 + i] = True
    # At size == the bbox side, resize is the identity: compare exactly.
    seg = np.asarray(subject_segment(Image.fromarray(arr), mask, 12))
    assert mask_bbox(mask) == (30, 20, 42, 32)
    expected = np.where(mask[20:32, 30:42, None], arr[20:32, 30:42], 0)
    assert np.array_equal(seg, expected)


def test_subject_segment_refuses_an_empty_or_misshapen_mask() -> None:
    image = Image.fromarray(noise(SIZE, SIZE))
    with pytest.raises(SidpipeError, match="empty"):
        subject_segment(image, np.zeros((SIZE, SIZE), bool), 32)
    with pytest.raises(SidpipeError, match="does not match"):
        subject_segment(image, np.ones((SIZE, SIZE + 1), bool), 32)


def test_non_subject_segment_zeroes_exactly_the_mask() -> None:
    arr = noise(48, 40)
    mask = np.random.default_rng(1).random((48, 40)) > 0.6
    out = np.asarray(non_subject_segment(Image.fromarray(arr), mask.astype(np.uint8) * 255))
    assert out.shape == arr.shape
    assert np.all(out[mask] == 0)
    assert np.array_equal(out[~mask], arr[~mask])


def test_overlay_tints_the_mask_and_draws_the_box() -> None:
    arr = np.full((SIZE, SIZE, 3), 100, np.uint8)
    mask = rect_mask(SIZE, SIZE, 10, 10, 20, 20)
    plain = np.asarray(overlay(Image.fromarray(arr), mask))
    assert np.array_equal(plain[~mask], arr[~mask])
    tinted = np.rint(0.5 * np.array([100, 100, 100]) + 0.5 * np.array(OVERLAY_COLOR))
    assert np.all(plain[mask] == tinted)
    boxed = np.asarray(overlay(Image.fromarray(arr), mask, box=(40.0, 40.0, 60.0, 56.0)))
    assert tuple(boxed[40, 50]) == BOX_COLOR and tuple(boxed[55, 59]) == BOX_COLOR
    assert tuple(boxed[48, 50]) == (100, 100, 100)  # inside the box, off the mask


# --- post-processing -----------------------------------------------------------------------


def _bfs_labels(binary: np.ndarray) -> np.ndarray:
    """Reference 4-connected labelling (smallest raster index per component), -1 elsewhere."""
    height, width = binary.shape
    labels = np.full(binary.shape, -1)
    for y, x in zip(*np.nonzero(binary), strict=True):
        if labels[y, x] >= 0:
            continue
        labels[y, x] = y * width + x
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < height and 0 <= nx < width and binary[ny, nx] and labels[ny, nx] < 0:
                    labels[ny, nx] = labels[y, x]
                    queue.append((ny, nx))
    return labels


@pytest.mark.parametrize("density", [0.3, 0.55, 0.7])
def test_labelling_matches_a_flood_fill(density: float) -> None:
    rng = np.random.default_rng(int(density * 100))
    for _ in range(3):
        binary = rng.random((37, 53)) < density
        assert np.array_equal(_label(binary), _bfs_labels(binary))


def test_labelling_handles_long_winding_shapes() -> None:
    snake = np.zeros((101, 101), bool)
    snake[::2] = True
    snake[1::4, -1] = snake[3::4, 0] = True
    labels = _label(snake)
    assert np.unique(labels[snake]).tolist() == [0]


def test_postprocess_fills_holes_and_drops_islands() -> None:
    mask = rect_mask(40, 40, 5, 5, 20, 20)
    mask[10:15, 10:15] = False  # a hole
    mask[30:33, 30:33] = True  # an island
    mask[0:3, 12:15] = True  # an island on the border
    filled = postprocess_mask(mask, fill_holes=True, largest_component=False)
    assert filled[10:15, 10:15].all() and filled[30:33, 30:33].all() and filled[0:3, 12:15].all()
    clean = postprocess_mask(mask, fill_holes=True, largest_component=True)
    assert np.array_equal(clean, rect_mask(40, 40, 5, 5, 20, 20))
    assert np.array_equal(postprocess_mask(mask, False, False), mask)
    only_largest = postprocess_mask(mask, fill_holes=False, largest_component=True)
    assert not only_largest[10:15, 10:15].any() and not only_largest[30:, 30:].any()


def test_postprocess_keeps_background_that_reaches_the_border() -> None:
    ring = rect_mask(30, 30, 0, 0, 20, 20)
    ring[5:15, 5:25] = False  # a notch open to the right: not a hole
    assert np.array_equal(postprocess_mask(ring, True, False), ring)
    diagonal = np.zeros((6, 6), bool)
    diagonal[1:3, 1:3] = diagonal[3:6, 3:6] = True  # touching at a corner only: 4-connectivity
    assert np.array_equal(postprocess_mask(diagonal, False, True), rect_mask(6, 6, 3, 3, 3, 3))
    assert not postprocess_mask(np.zeros((5, 5), bool), True, True).any()


def test_grounding_prompt() -> None:
    assert grounding_prompt("Toy  Car") == "toy car."
    assert grounding_prompt("dog.") == "dog."
    assert grounding_prompt("cat. dog") == "cat. dog."
    with pytest.raises(SidpipeError, match="text_prompt"):
        grounding_prompt(" . ")


# --- provided masks ------------------------------------------------------------------------


def test_provided_masks_are_used_exactly(tmp_path: Path) -> None:
    given = {
        "a": rect_mask(SIZE, SIZE, 16, 12, 32, 32),
        "b": postprocess_mask(np.random.default_rng(2).random((SIZE, SIZE)) > 0.5, True, True),
    }
    refs = make_refs(tmp_path, given)
    out = tmp_path / "masks" / "dog"
    rows = segment_references(
        refs, out, "dog", "dog", backend="provided", detector="/no/such/model", segment_size=32
    )
    assert [r["image_id"] for r in rows] == ["a", "b"]
    assert read_csv(out / "manifest.csv") == [{k: str(v) for k, v in r.items()} for r in rows]
    assert list(read_csv(out / "manifest.csv")[0]) == MANIFEST_FIELDS
    assert sorted(p.name for p in out.iterdir()) == sorted([*FOLDERS, "manifest.csv"])
    for row in rows:
        mask = given[row["image_id"]]
        assert np.array_equal(pixels(out / row["mask_path"]), mask.astype(np.uint8) * 255)
        assert row["backend"] == "provided"
        assert all(row[k] == "" for k in ("detector", "segmenter", "text_prompt", "sam_iou"))
        assert all(row[k] == "" for k in ("detector_score", "box_x0", "box_y1"))
        assert row["mask_fraction"] == round(mask.mean(), 4) and row["flag"] == ""
        image = Image.open(refs / f"{row['image_id']}.png").convert("RGB")
        non_subject = pixels(out / row["non_subject_segment_path"])
        assert np.array_equal(non_subject, np.asarray(non_subject_segment(image, mask)))
        with Image.open(out / row["subject_segment_path"]) as seg:
            assert (seg.mode, seg.size) == ("RGB", (32, 32))
        with Image.open(out / row["overlay_path"]) as ov:
            assert (ov.mode, ov.size) == ("RGB", (SIZE, SIZE))


def test_missing_provided_mask_names_image_and_fix(tmp_path: Path) -> None:
    refs = make_refs(tmp_path, {"a": rect_mask(SIZE, SIZE, 0, 0, 9, 9), "b": None})
    out = tmp_path / "masks" / "dog"
    with pytest.raises(SidpipeError) as info:
        segment_references(refs, out, "dog", "dog", backend="provided")
    message = str(info.value)
    assert "b has none" in message and str(tmp_path / "src" / "b.mask.png") in message
    assert "grounded_sam" in message
    assert_clean(out)


def test_tampered_prepared_mask_is_refused(tmp_path: Path) -> None:
    refs = make_refs(tmp_path, {"a": rect_mask(SIZE, SIZE, 0, 0, 9, 9)})
    Image.new("L", (SIZE, SIZE), 128).save(refs / "masks" / "a.png")
    out = tmp_path / "masks" / "dog"
    with pytest.raises(SidpipeError, match=r"masks/a\.png: not a 64x64 0/255 mask.*re-run"):
        segment_references(refs, out, "dog", "dog", backend="provided")
    assert_clean(out)


def test_empty_provided_mask_is_an_error_naming_the_users_file(tmp_path: Path) -> None:
    refs = make_refs(tmp_path, {"a": np.zeros((SIZE, SIZE), bool)})
    out = tmp_path / "masks" / "dog"
    with pytest.raises(SidpipeError) as info:
        segment_references(refs, out, "dog", "dog", backend="provided")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'src' / 'a.mask.png'}: the provided mask of a")
    assert "all black" in message and "grounded_sam" in message
    assert_clean(out)


def test_small_and_large_masks_are_kept_but_flagged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    masks = {
        "big": np.ones((SIZE, SIZE), bool),  # 100% > 95%
        "fine": rect_mask(SIZE, SIZE, 10, 10, 30, 30),
        "small": rect_mask(SIZE, SIZE, 10, 10, 4, 4),  # 0.4% < 1%
    }
    refs = make_refs(tmp_path, masks)
    out = tmp_path / "masks" / "dog"
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        rows = segment_references(refs, out, "dog", "dog", backend="provided")
    assert {r["image_id"]: r["flag"] for r in rows} == {
        "big": "large_mask",
        "fine": "",
        "small": "small_mask",
    }
    assert np.array_equal(pixels(out / "masks" / "small.png") > 0, masks["small"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any("dog/small: small_mask" in w and "overlays/small.png" in w for w in warnings)
    assert any("dog/big: large_mask" in w for w in warnings)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "magic"}, "unknown mask backend 'magic'"),
        ({"box_mode": "widest"}, "unknown box_mode"),
        ({"min_fraction": 0.5, "max_fraction": 0.4}, "min_fraction"),
        ({"segment_size": 0}, "segment_size"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(SidpipeError, match=match):
        segment_references(tmp_path, tmp_path / "out", "dog", "dog", **kwargs)


def test_missing_or_foreign_manifest(tmp_path: Path) -> None:
    with pytest.raises(SidpipeError, match=r"manifest\.csv does not exist.*prepare_references"):
        segment_references(tmp_path, tmp_path / "out", "dog", "dog", backend="provided")
    refs = make_refs(tmp_path, {"a": rect_mask(SIZE, SIZE, 0, 0, 9, 9)})
    with pytest.raises(SidpipeError, match="belongs to subject"):
        segment_references(refs, tmp_path / "out", "cat", "cat", backend="provided")


# --- Grounded-SAM on the tiny random models --------------------------------------------------


def _run_gsam(refs: Path, out: Path, tiny: dict[str, str], **kwargs) -> list[dict]:
    # A random detector's scores are arbitrary: threshold 0 keeps every box, so one is found.
    kwargs = {"box_threshold": 0.0, "text_threshold": 0.0, "device": "cpu", **kwargs}
    return segment_references(
        refs,
        out,
        "dog",
        "Dog",
        backend="grounded_sam",
        detector=tiny["grounding_dino"],
        segmenter=tiny["sam"],
        **kwargs,
    )


@pytest.fixture(scope="module")
def gsam_refs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # No masks: grounded_sam must not need them. Three images with batch_size 2 -> a batch of 1.
    return make_refs(tmp_path_factory.mktemp("gsam"), {"01": None, "02": None, "03": None})


def test_grounded_sam_writes_binary_masks_segments_and_manifest(
    tiny: dict[str, str], gsam_refs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "masks" / "dog"
    rows = _run_gsam(gsam_refs, out, tiny, batch_size=2, segment_size=48)
    assert [r["image_id"] for r in rows] == ["01", "02", "03"]
    assert read_csv(out / "manifest.csv") == [{k: str(v) for k, v in r.items()} for r in rows]
    for row in rows:
        assert row["backend"] == "grounded_sam" and row["text_prompt"] == "dog."
        assert (row["detector"], row["segmenter"]) == (tiny["grounding_dino"], tiny["sam"])
        assert 0.0 <= row["detector_score"] <= 1.0 and isinstance(row["sam_iou"], float)
        x0, y0, x1, y1 = (row[f"box_{k}"] for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 <= x1 <= SIZE and 0 <= y0 <= y1 <= SIZE
        with Image.open(out / row["mask_path"]) as img:
            assert (img.mode, img.size) == ("L", (SIZE, SIZE))
        mask = pixels(out / row["mask_path"])
        assert set(np.unique(mask).tolist()) <= {0, 255} and mask.any()
        keep = mask > 0
        assert row["mask_fraction"] == round(keep.mean(), 4)
        expected_flag = {keep.mean() < 0.01: "small_mask", keep.mean() > 0.95: "large_mask"}
        assert row["flag"] == expected_flag.get(True, "")
        # Hole filling and largest-component cleanup ran: nothing left to change.
        assert np.array_equal(postprocess_mask(keep, True, True), keep)
        with Image.open(out / row["subject_segment_path"]) as seg:
            assert (seg.mode, seg.size) == ("RGB", (48, 48))
        non_subject = pixels(out / row["non_subject_segment_path"])
        assert np.all(non_subject[keep] == 0) and np.all(non_subject[~keep] > 0)
        overlay_px = pixels(out / row["overlay_path"])
        assert overlay_px.shape == (SIZE, SIZE, 3)


def test_grounded_sam_union_box_contains_the_best_box(
    tiny: dict[str, str], gsam_refs: Path, tmp_path: Path
) -> None:
    best = _run_gsam(gsam_refs, tmp_path / "best", tiny, batch_size=8)
    union = _run_gsam(gsam_refs, tmp_path / "union", tiny, box_mode="union", fill_holes=False)
    for b, u in zip(best, union, strict=True):
        assert u["box_x0"] <= b["box_x0"] and u["box_y0"] <= b["box_y0"]
        assert u["box_x1"] >= b["box_x1"] and u["box_y1"] >= b["box_y1"]
        assert u["detector_score"] == b["detector_score"]


def test_no_box_above_threshold_is_an_error_with_scores_and_ways_out(
    tiny: dict[str, str], gsam_refs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "masks" / "dog"
    with pytest.raises(SidpipeError) as info:
        _run_gsam(gsam_refs, out, tiny, box_threshold=1.01, text_prompt="Sks Dog")
    message = str(info.value)
    assert "subject 'dog'" in message and "box_threshold=1.01" in message
    assert "'sks dog.'" in message and "in 3 of 3 reference images" in message
    for image_id in ("01", "02", "03"):
        assert re.search(
            rf"{image_id} \(.*{image_id}\.png\): best candidate scores "
            r"\d\.\d{3}, \d\.\d{3}, \d\.\d{3}",
            message,
        )
    assert "`box_threshold` column" in message  # way out 1
    assert "`text_prompt` column" in message  # way out 2
    assert "<stem>.mask.png" in message and "`provided` backend" in message  # way out 3
    assert_clean(out)


def test_missing_detector_is_a_config_error(gsam_refs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SidpipeError, match=r"no_detector.*models\.grounding_dino"):
        segment_references(
            gsam_refs, out, "dog", "dog", detector=str(tmp_path / "no_detector"), device="cpu"
        )
    assert_clean(out)


def test_sam_gives_one_mask_per_box_as_grounded_sams_demo(tiny: dict[str, str]) -> None:
    """SAM is asked for one mask per box (multimask_output=False, as Grounded-SAM's demo asks
    it), not the best of the three masks it proposes for an ambiguous point, which may be a part
    of the object; two images in a batch of two, each mask and IoU its own single-image call's."""
    import torch

    from sidpipe.models import load_sam

    images = [Image.fromarray(noise(40, 48, seed)) for seed in (1, 2)]
    boxes = [(5.0, 4.0, 30.0, 36.0), (10.0, 2.0, 44.0, 20.0)]
    found = segment_boxes(images, boxes, tiny["sam"], "cpu", batch_size=2, subject="dog")
    sam, processor = load_sam(tiny["sam"], "cpu")
    for image, box, (mask, iou) in zip(images, boxes, found, strict=True):
        inputs = processor(images=[image], input_boxes=[[list(box)]], return_tensors="pt")
        with torch.inference_mode():
            output = sam(
                pixel_values=inputs["pixel_values"],
                input_boxes=inputs["input_boxes"].float(),
                multimask_output=False,
            )
        single = processor.post_process_masks(
            output.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )[0][0, 0].numpy()
        assert mask.shape == (40, 48) and np.array_equal(mask, single)
        assert iou == pytest.approx(float(output.iou_scores[0, 0, 0]), abs=1e-5)
