"""Tests for sidpipe.references (stage `prepare_references`); every input is built here."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from sidpipe.image_decode import center_crop_resize, load_rgb
from sidpipe.io import SidpipeError, read_csv
from sidpipe.references import (
    IMAGE_SUFFIXES,
    MANIFEST_FIELDS,
    image_id_for,
    list_reference_images,
    prepare_references,
    reference_inputs,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    return folder


@pytest.fixture
def out(tmp_path: Path) -> Path:
    # A dedicated parent, so "no leftover temp folder" means "parent is empty".
    return tmp_path / "results" / "subj"


def solid(path: Path, color=RED, size=(16, 16), mode: str = "RGB", **save_kw) -> Path:
    Image.new(mode, size, color).save(path, **save_kw)
    return path


def bands(width: int, height: int, colors: list[tuple[int, int, int]]) -> Image.Image:
    """An RGB image split into equal vertical bands of the given colours, left to right."""
    arr = np.zeros((height, width, 3), np.uint8)
    step = width // len(colors)
    for i, color in enumerate(colors):
        arr[:, i * step : (i + 1) * step] = color
    return Image.fromarray(arr)


def assert_clean(out_dir: Path) -> None:
    """A failed run leaves neither the output folder nor atomic_dir's temp folder behind."""
    assert not out_dir.exists()
    if out_dir.parent.exists():
        leftovers = [p.name for p in out_dir.parent.iterdir()]
        assert leftovers == [], leftovers


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img).copy()


def run(src: Path, out: Path, **kw) -> list[dict]:
    kw.setdefault("subject", "dog")
    kw.setdefault("resolution", 16)
    kw.setdefault("min_images", 1)
    kw.setdefault("min_side", 1)  # most images here are tiny on purpose
    return prepare_references(src, out, **kw)


# --- listing -------------------------------------------------------------------------------


def test_list_reference_images_skips_masks_non_images_and_hidden(src: Path) -> None:
    for name in ["b.PNG", "a.jpg", "c.webp"]:
        solid(src / name, format={"b.PNG": "PNG", "a.jpg": "JPEG", "c.webp": "WEBP"}[name])
    solid(src / "a.mask.png", color=(255, 255, 255))
    (src / "descriptions.yaml").write_text("a: a dog\n")
    (src / "README").write_text("photos of a dog\n")
    (src / ".DS_Store").write_bytes(b"\0\1\2")
    (src / "._a.jpg").write_bytes(b"\0\5\x16\7AppleDouble")  # macOS resource fork
    (src / "notes.txt").write_text("x")
    (src / "sub.jpg").mkdir()  # a folder with an image suffix is not an image

    assert [p.name for p in list_reference_images(src)] == ["a.jpg", "b.PNG", "c.webp"]


def test_ignored_files_do_not_reach_the_manifest(src: Path, out: Path) -> None:
    solid(src / "a.png")
    (src / "descriptions.yaml").write_text("a: a dog\n")
    (src / ".DS_Store").write_bytes(b"\0")
    rows = run(src, out)
    assert [r["image_id"] for r in rows] == ["a"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "manifest.csv"]


def test_orphan_mask_is_ignored_with_a_warning(
    src: Path, out: Path, caplog: pytest.LogCaptureFixture
) -> None:
    solid(src / "a.png")
    solid(src / "ghost.mask.png", color=255, mode="L")
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        rows = run(src, out)
    assert rows[0]["mask_path"] == ""
    assert "ghost.mask.png" in caplog.text


# --- modes ---------------------------------------------------------------------------------


def _p_with_transparency(path: Path) -> Path:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 8, 16, 16))  # bottom half: palette index 1 (blue), top: index 0 (red)
    img.save(path, transparency=0)  # index 0 is fully transparent -> white
    return path


@pytest.mark.parametrize(
    ("name", "make", "mode", "top", "bottom"),
    [
        # Pillow's CMYK->RGB: R = 255 - C - K, ... ; TIFF keeps the values exactly.
        ("cmyk.tif", lambda p: solid(p, (0, 255, 255, 0), mode="CMYK"), "CMYK", RED, RED),
        ("gray.png", lambda p: solid(p, 100, mode="L"), "L", (100,) * 3, (100,) * 3),
        ("la.png", lambda p: solid(p, (0, 0), mode="LA"), "LA", WHITE, WHITE),
        ("p.png", _p_with_transparency, "P", WHITE, BLUE),
        ("rgba.png", lambda p: solid(p, (255, 0, 0, 0), mode="RGBA"), "RGBA", WHITE, WHITE),
        ("rgba2.png", lambda p: solid(p, (0, 0, 255, 255), mode="RGBA"), "RGBA", BLUE, BLUE),
        ("one.png", lambda p: solid(p, 1, mode="1"), "1", WHITE, WHITE),
        ("one0.bmp", lambda p: solid(p, 0, mode="1"), "1", (0, 0, 0), (0, 0, 0)),
    ],
)
def test_modes_become_8bit_rgb(src: Path, out: Path, name, make, mode, top, bottom) -> None:
    make(src / name)
    rows = run(src, out, resolution=16)
    assert rows[0]["source_mode"] == mode
    with Image.open(out / rows[0]["path"]) as img:
        assert (img.mode, img.size) == ("RGB", (16, 16))
        assert "icc_profile" not in img.info
    arr = pixels(out / rows[0]["path"])
    assert tuple(arr[0, 0]) == top
    assert tuple(arr[-1, -1]) == bottom


def test_half_transparent_la_is_composited_over_white(src: Path) -> None:
    solid(src / "la.png", (0, 128), mode="LA")
    arr = np.asarray(load_rgb(src / "la.png", max_pixels=10_000))
    # black at alpha 128/255 over white: 255 * (1 - 128/255) = 127
    assert abs(int(arr[0, 0, 0]) - 127) <= 1


def test_16bit_values_map_onto_8bit(src: Path, out: Path) -> None:
    values = np.array([0, 257 * 10, 32896, 65535], np.uint16)  # -> 0, 10, 128, 255
    Image.fromarray(np.tile(values, (4, 1))).save(src / "deep.png")
    with Image.open(src / "deep.png") as img:
        assert img.mode == "I;16"  # sanity: the test really feeds 16-bit data

    rgb = load_rgb(src / "deep.png", max_pixels=10_000)
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 10, 128, 255]
    assert np.all(np.asarray(rgb)[..., 0] == np.asarray(rgb)[..., 2])

    rows = run(src, out, resolution=4)  # 4x4 -> 4x4: the resize is an identity
    assert rows[0]["source_mode"] == "I;16"
    assert pixels(out / "deep.png")[0, :, 1].tolist() == [0, 10, 128, 255]


def test_16bit_big_endian_tiff(src: Path) -> None:
    values = np.array([[0, 65535]], dtype=">u2")
    Image.fromarray(values).save(src / "be.tif")
    assert np.asarray(load_rgb(src / "be.tif", 10_000))[0, :, 0].tolist() == [0, 255]


def test_float_image_in_unit_range(src: Path) -> None:
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(src / "f.tif")
    with Image.open(src / "f.tif") as img:
        assert img.mode == "F"
    assert np.asarray(load_rgb(src / "f.tif", 10_000))[0, :, 0].tolist() == [0, 128, 255]


def test_mpo_with_extra_pictures_uses_the_primary_one(src: Path, out: Path) -> None:
    # Phone JPEGs with depth/gain maps open as multi-frame MPO; they are not animations.
    first, second = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)
    first.save(src / "phone.jpg", format="MPO", save_all=True, append_images=[second])
    with Image.open(src / "phone.jpg") as img:
        assert (img.format, img.n_frames) == ("MPO", 2)
    run(src, out)
    r, g, b = pixels(out / "phone.png")[8, 8]
    assert r > 200 and g < 50 and b < 50


# --- geometry ------------------------------------------------------------------------------


def test_exif_orientation_is_applied(src: Path, out: Path) -> None:
    # Stored 64 wide x 32 tall, red left / blue right. Orientation 6 means "rotate 90 degrees
    # clockwise to display": displayed 32x64 with red on top and blue at the bottom.
    img = bands(64, 32, [RED, BLUE])
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(src / "rot.jpg", quality=95, exif=exif)

    rows = run(src, out, resolution=32)
    assert (rows[0]["source_width"], rows[0]["source_height"]) == (32, 64)
    arr = pixels(out / "rot.png").astype(int)
    top, bottom = arr[4, 16], arr[28, 16]
    assert top[0] > 200 and top[2] < 60, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom  # blue at the bottom


def test_center_crop_keeps_only_the_centre_band(src: Path, out: Path) -> None:
    bands(90, 30, [RED, GREEN, BLUE]).save(src / "wide.png")
    run(src, out, resolution=10)
    arr = pixels(out / "wide.png")
    assert arr.shape == (10, 10, 3)
    assert np.all(arr == np.array(GREEN, np.uint8))


def test_center_crop_resize_tall_image() -> None:
    # 30 wide x 90 tall: red, green, blue from top to bottom
    img = bands(90, 30, [RED, GREEN, BLUE]).transpose(Image.Transpose.TRANSPOSE)
    assert img.size == (30, 90)
    result = center_crop_resize(img, 15, Image.Resampling.LANCZOS)
    assert result.size == (15, 15)
    assert np.all(np.asarray(result) == np.array(GREEN, np.uint8))


def test_center_crop_resize_rejects_bad_resolution() -> None:
    with pytest.raises(SidpipeError, match="positive"):
        center_crop_resize(Image.new("RGB", (4, 4)), 0, Image.Resampling.LANCZOS)


# --- manifest ------------------------------------------------------------------------------


def test_manifest_content(src: Path, out: Path, caplog: pytest.LogCaptureFixture) -> None:
    bands(40, 20, [RED, BLUE]).save(src / "b.png")
    solid(src / "a.jpg", GREEN, size=(20, 30))
    solid(src / "my photo (1).webp", BLUE, size=(12, 12), format="WEBP")

    with caplog.at_level(logging.INFO, logger="sidpipe"):
        rows = run(src, out, subject="cat", resolution=8, min_images=3)

    assert [r["image_id"] for r in rows] == ["a", "b", "my_photo__1_"]
    assert sorted(p.name for p in out.iterdir()) == [
        "a.png",
        "b.png",
        "manifest.csv",
        "my_photo__1_.png",
    ]
    assert (out / "manifest.csv").read_text().splitlines()[0] == ",".join(MANIFEST_FIELDS)
    on_disk = read_csv(out / "manifest.csv")
    assert on_disk == [{k: str(v) for k, v in r.items()} for r in rows]

    sizes = {"a": (20, 30), "b": (40, 20), "my_photo__1_": (12, 12)}
    sources = {"a": "a.jpg", "b": "b.png", "my_photo__1_": "my photo (1).webp"}
    for row in rows:
        written = out / row["path"]
        assert row["path"] == f"{row['image_id']}.png"
        assert row["sha256"] == hashlib.sha256(written.read_bytes()).hexdigest()
        source = src / sources[row["image_id"]]
        assert row["source_path"] == str(source)
        assert row["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert (row["source_width"], row["source_height"]) == sizes[row["image_id"]]
        assert (row["width"], row["height"], row["subject"]) == (8, 8, "cat")
        assert row["mask_path"] == ""
        with Image.open(written) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (8, 8))
    assert rows[0]["source_mode"] == "RGB"
    # one log line per image
    assert sum("cat:" in rec.getMessage() for rec in caplog.records) == 3


def test_rerun_is_byte_identical_and_replaces_old_output(src: Path, out: Path) -> None:
    bands(40, 20, [RED, BLUE]).save(src / "b.png")
    first = run(src, out)
    (out / "stale.txt").write_text("old")
    second = run(src, out)
    assert first == second
    assert not (out / "stale.txt").exists()


def test_failure_keeps_previous_complete_output(src: Path, out: Path) -> None:
    solid(src / "a.png")
    run(src, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (src / "z.jpg").write_text("not an image")
    with pytest.raises(SidpipeError, match="not a readable image"):
        run(src, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["subj"]


def test_failed_rerun_after_snakemake_removed_the_manifest_leaves_nothing(
    src: Path, out: Path
) -> None:
    # Snakemake deletes a job's declared output (manifest.csv) before rerunning it; the old
    # PNGs must not outlive a failed rerun as an output without a manifest.
    solid(src / "a.png")
    solid(src / "b.png", BLUE)
    run(src, out)
    (out / "manifest.csv").unlink()
    (src / "c.jpg").write_text("a broken image")
    with pytest.raises(SidpipeError, match=r"c\.jpg: not a readable image"):
        run(src, out)
    assert_clean(out)
    # ... and a successful rerun replaces such a leftover whole.
    (src / "c.jpg").unlink()
    run(src, out)
    (out / "manifest.csv").unlink()
    (out / "stale.png").write_bytes(b"x")
    run(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "manifest.csv"]


def test_unremovable_previous_output_leaves_no_temporary_folder(
    src: Path, out: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    solid(src / "a.png")
    run(src, out)
    (out / "locked.png").write_bytes(b"held open elsewhere")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fspath(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    solid(src / "b.png", BLUE)
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        rows = run(src, out)
    # The new output is complete and in place, and no temporary folder is left behind.
    assert [r["image_id"] for r in rows] == ["a", "b"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "manifest.csv"]
    leftovers = [p for p in out.parent.iterdir() if p != out]
    assert not any(".tmp-" in p.name for p in leftovers), leftovers
    # Only the undeletable previous output remains, named in the log with the fix.
    assert len(leftovers) == 1 and (leftovers[0] / "locked.png").exists()
    assert str(leftovers[0]) in caplog.text and "rm -rf" in caplog.text
    assert "locked.png" in caplog.text


def test_pillow_globals_are_restored(src: Path, out: Path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12345678)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    solid(src / "a.png")
    run(src, out, max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == 12345678
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


# --- masks ---------------------------------------------------------------------------------


def test_mask_is_cropped_and_resized_like_its_image(src: Path, out: Path) -> None:
    bands(60, 40, [RED, GREEN, BLUE]).save(src / "a.png")
    # Foreground on the right half of the centre square (columns 30..50); the crop keeps
    # columns 10..50.
    mask = np.zeros((40, 60), np.uint8)
    mask[:, 30:] = 255
    Image.fromarray(mask).save(src / "a.mask.png")
    solid(src / "b.png")  # no mask

    rows = run(src, out, resolution=20)
    assert [r["mask_path"] for r in rows] == ["masks/a.png", ""]
    with Image.open(out / "masks" / "a.png") as img:
        assert (img.mode, img.size) == ("L", (20, 20))
    arr = pixels(out / "masks" / "a.png")
    assert set(np.unique(arr).tolist()) == {0, 255}
    assert np.all(arr[:, :10] == 0) and np.all(arr[:, 10:] == 255)
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png"]


def _half_mask(values: np.ndarray) -> np.ndarray:
    """A 16x16 mask with `values[0]` on the left half and `values[1]` on the right half."""
    arr = np.empty((16, 16), values.dtype)
    arr[:, :8], arr[:, 8:] = values[0], values[1]
    return arr


@pytest.mark.parametrize(
    "mask",
    [
        Image.fromarray(_half_mask(np.array([0, 1], np.uint8))),  # 0/1 label image
        Image.fromarray(_half_mask(np.array([0, 255], np.uint8))).convert("1"),
        Image.fromarray(_half_mask(np.array([0, 255], np.uint8))).convert("RGB"),
        Image.fromarray(_half_mask(np.array([0, 65535], np.uint16))),  # I;16
        Image.fromarray(_half_mask(np.array([0.0, 1.0], np.float32))),  # F, as TIFF
    ],
    ids=["L-0-1", "1", "RGB-black-white", "I16-0-65535", "F-0-1"],
)
def test_black_and_white_masks_in_any_mode_become_0_255(
    src: Path, out: Path, mask: Image.Image
) -> None:
    solid(src / "a.png")
    # PNG has no float mode; Pillow reads the file by its content, not its suffix.
    mask.save(src / "a.mask.png", format="TIFF" if mask.mode == "F" else "PNG")
    run(src, out)
    arr = pixels(out / "masks" / "a.png")
    assert np.all(arr[:, :8] == 0) and np.all(arr[:, 8:] == 255)


@pytest.mark.parametrize(
    ("values", "shown"),
    [
        (np.array([[100, 200]], np.uint8), "2 distinct values (100, 200)"),  # greys
        (np.array([[0, 128, 255]], np.uint8), "3 distinct values (0, 128, 255)"),  # soft edge
        (np.array([[0, 1, 255]], np.uint8), "3 distinct values (0, 1, 255)"),  # mixed conventions
    ],
)
def test_non_binary_mask_is_an_error(src: Path, out: Path, values: np.ndarray, shown) -> None:
    solid(src / "a.png")
    Image.fromarray(np.resize(values, (16, 16)).astype(np.uint8)).save(src / "a.mask.png")
    with pytest.raises(SidpipeError) as info:
        run(src, out)
    message = str(info.value)
    assert "a.mask.png: mask is not black-and-white" in message and shown in message
    assert "save it as a black-and-white PNG with values 0 and 255" in message
    assert_clean(out)


def test_colour_and_jpeg_masks_are_errors(src: Path, out: Path) -> None:
    solid(src / "a.png")
    solid(src / "a.mask.png", RED)  # a red drawing: grey 76 after conversion
    with pytest.raises(SidpipeError, match=r"a\.mask\.png: mask is not black-and-white"):
        run(src, out)
    assert_clean(out)
    # JPEG blurs a sharp black/white edge into greys.
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 3:11] = 255
    Image.fromarray(mask).save(src / "a.mask.png", format="JPEG", quality=50)
    with pytest.raises(SidpipeError, match="distinct values"):
        run(src, out)
    assert_clean(out)


def test_a_cut_out_mask_with_transparency_is_refused(src: Path, out: Path) -> None:
    """White everywhere, the subject only opaque: read by brightness it was the whole photo."""
    solid(src / "a.png")
    alpha = np.zeros((16, 16), np.uint8)
    alpha[4:12, 3:11] = 255
    cut_out = np.dstack([np.full((16, 16, 3), 255, np.uint8), alpha])
    Image.fromarray(cut_out, "RGBA").save(src / "a.mask.png")
    with pytest.raises(SidpipeError, match=r"a\.mask\.png: the mask has transparent pixels that"):
        run(src, out)
    assert_clean(out)
    # read as it looks: fully opaque, or transparent where black (RGBA, or a palette's entry)
    white_subject = np.repeat(alpha[..., None], 3, axis=2)
    opaque = np.dstack([white_subject, np.full((16, 16), 255, np.uint8)])
    black_transparent = np.dstack([white_subject, alpha])
    palette = Image.fromarray(alpha).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    for mask in (
        Image.fromarray(opaque, "RGBA"),
        Image.fromarray(black_transparent, "RGBA"),
        palette,
    ):
        mask.save(src / "a.mask.png")
        rows = run(src, out)
        assert pixels(out / rows[0]["mask_path"]).mean() == pytest.approx(255 * 64 / 256)


def test_mask_follows_its_own_exif_orientation(src: Path, out: Path) -> None:
    # Image stored 40x20 with Orientation=6 (displayed 20x40); mask drawn on the displayed
    # image (20x40, no EXIF): sizes agree after orientation, so it is accepted.
    exif = Image.Exif()
    exif[0x0112] = 6
    bands(40, 20, [RED, BLUE]).save(src / "a.jpg", exif=exif)
    mask = np.zeros((40, 20), np.uint8)
    mask[20:] = 255  # bottom half of the displayed image
    Image.fromarray(mask).save(src / "a.mask.png")
    run(src, out, resolution=20)
    arr = pixels(out / "masks" / "a.png")
    assert np.all(arr[:10] == 0) and np.all(arr[10:] == 255)


def test_wrong_size_mask_is_an_error(src: Path, out: Path) -> None:
    solid(src / "a.png", size=(30, 20))
    solid(src / "a.mask.png", 255, size=(20, 30), mode="L")
    with pytest.raises(SidpipeError, match=r"a\.mask\.png: mask size 20x30 .*30x20.*re-export"):
        run(src, out)
    assert_clean(out)


def test_an_unusable_mask_is_named_by_the_users_file_at_preparation(
    src: Path, out: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """All black, or its subject cut away by the square centre crop: a warning naming the
    user's mask (an error only where the masks are used: test_masks)."""
    solid(src / "a.png", size=(40, 10))
    solid(src / "a.mask.png", 0, size=(40, 10), mode="L")
    solid(src / "b.png", (0, 0, 255), size=(40, 10))
    mask = np.zeros((10, 40), np.uint8)
    mask[:, :5] = 255  # the subject at the left edge; the crop keeps columns 15-24
    Image.fromarray(mask).save(src / "b.mask.png")
    with caplog.at_level("WARNING", logger="sidpipe"):
        run(src, out, resolution=10)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{src / 'a.mask.png'}: the mask is all black" in m for m in said), said
    assert any(
        f"{src / 'b.mask.png'}: the subject lies outside the square centre crop" in m for m in said
    ), said
    assert (out / "manifest.csv").exists()


# --- errors --------------------------------------------------------------------------------


def test_missing_source_dir(tmp_path: Path, out: Path) -> None:
    with pytest.raises(SidpipeError, match=r"nope does not exist"):
        run(tmp_path / "nope", out)
    assert_clean(out)


def test_source_dir_is_a_file(tmp_path: Path, out: Path) -> None:
    (tmp_path / "file.jpg").write_text("x")
    with pytest.raises(SidpipeError, match="is not a directory"):
        run(tmp_path / "file.jpg", out)
    assert_clean(out)


@pytest.mark.parametrize("extra", [[], ["descriptions.yaml", "README", ".DS_Store"]])
def test_no_images(src: Path, out: Path, extra: list[str]) -> None:
    for name in extra:
        (src / name).write_text("x")
    solid(src / "lonely.mask.png", 255, mode="L")  # masks alone are not references
    with pytest.raises(SidpipeError, match=r"no reference images in .*src; expected files") as e:
        run(src, out)
    assert all(suffix in str(e.value) for suffix in IMAGE_SUFFIXES)
    assert_clean(out)


def test_too_few_images(src: Path, out: Path) -> None:
    solid(src / "a.png")
    solid(src / "b.png")
    with pytest.raises(SidpipeError, match=r"found 2 .*at least 3.*references\.min_images"):
        run(src, out, min_images=3)
    assert_clean(out)


def test_windows_jpeg_suffixes_are_read_and_unread_photos_named(
    src: Path, out: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Chrome on Windows saves .jfif; a phone's .heic is not read: named in the log, not
    dropped unnoticed."""
    solid(src / "00.jfif", (255, 0, 0), format="JPEG")
    solid(src / "01.JPE", (0, 255, 0), format="JPEG")
    solid(src / "02.jpg", (0, 0, 255))
    (src / "03.HEIC").write_bytes(b"ftypheic")
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        rows = run(src, out)
    assert [Path(r["source_path"]).name for r in rows] == ["00.jfif", "01.JPE", "02.jpg"]
    assert f"{src}: not read as references (format not supported): 03.HEIC; convert" in caplog.text


def test_text_file_with_image_suffix(src: Path, out: Path) -> None:
    solid(src / "a.png")
    (src / "b.jpg").write_text("this is not a JPEG")
    with pytest.raises(SidpipeError, match=r"b\.jpg: not a readable image"):
        run(src, out)
    assert_clean(out)


def test_truncated_jpeg(src: Path, out: Path, monkeypatch) -> None:
    # Even if another library switched truncated loading on, a cut file must be refused.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    solid(src / "a.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "b.jpg", quality=95)
    data = (src / "b.jpg").read_bytes()
    (src / "b.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(SidpipeError, match=r"b\.jpg: truncated or corrupt"):
        run(src, out)
    assert_clean(out)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_truncated_png(src: Path, out: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "b.png")
    data = (src / "b.png").read_bytes()
    (src / "b.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SidpipeError, match=r"b\.png: truncated or corrupt"):
        run(src, out)
    assert_clean(out)


@pytest.mark.parametrize("max_pixels", [100, 399])
def test_decompression_bomb(src: Path, out: Path, max_pixels: int) -> None:
    solid(src / "a.png", size=(10, 10))
    solid(src / "big.png", size=(20, 20))  # 400 pixels
    with pytest.raises(SidpipeError, match=r"big\.png: .*400 pixels.*references\.max_pixels"):
        run(src, out, max_pixels=max_pixels)
    assert_clean(out)


def test_own_size_check_without_pillows(src: Path, out: Path, monkeypatch) -> None:
    # Our header-size check must hold on its own, e.g. if Pillow's check is ever bypassed.
    monkeypatch.setattr(Image, "_decompression_bomb_check", lambda *args, **kwargs: None)
    solid(src / "big.png", size=(20, 20))
    with pytest.raises(SidpipeError, match=r"20x20 = 400 pixels.*references\.max_pixels"):
        run(src, out, max_pixels=100)
    assert_clean(out)


def test_image_at_exactly_max_pixels_is_accepted(src: Path, out: Path) -> None:
    solid(src / "edge.png", size=(20, 20))
    assert len(run(src, out, max_pixels=400)) == 1


def test_load_rgb_bomb_check_happens_before_decoding(src: Path) -> None:
    # A 20x20 PNG whose pixel data is cut off: decoding it would fail, so getting the size
    # error proves the size was checked from the header alone.
    noise = np.random.default_rng(2).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "h.png")
    data = (src / "h.png").read_bytes()
    (src / "h.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SidpipeError, match="400 pixels"):
        load_rgb(src / "h.png", max_pixels=100)
    with pytest.raises(SidpipeError, match="truncated or corrupt"):
        load_rgb(src / "h.png", max_pixels=1000)


def _animated(path: Path, **kw) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, **kw)


@pytest.mark.parametrize(
    ("name", "kw"),
    [("anim.gif", {"loop": 0}), ("anim.webp", {"lossless": True}), ("anim.png", {})],
)
def test_animated_images(src: Path, out: Path, name: str, kw: dict) -> None:
    solid(src / "a.bmp")
    _animated(src / name, **kw)
    with pytest.raises(SidpipeError, match="animated images are not supported; export one frame"):
        run(src, out)
    assert_clean(out)


def test_single_frame_gif_is_fine(src: Path, out: Path) -> None:
    solid(src / "still.gif")
    rows = run(src, out)
    assert rows[0]["source_mode"] == "P"
    assert tuple(pixels(out / "still.png")[0, 0]) == RED


@pytest.mark.parametrize(("first", "second"), [("a.jpg", "a.png"), ("a b.png", "a_b.png")])
def test_duplicate_image_ids(src: Path, out: Path, first: str, second: str) -> None:
    solid(src / first)
    solid(src / second)
    with pytest.raises(SidpipeError, match="both give image id") as e:
        run(src, out)
    assert first in str(e.value) and second in str(e.value)
    assert_clean(out)


def test_image_ids_differing_only_in_case(src: Path, out: Path) -> None:
    solid(src / "Dog.png")
    if (src / "dog.png").exists():
        pytest.skip("case-insensitive filesystem")
    solid(src / "dog.png")
    with pytest.raises(SidpipeError, match="differ only in case"):
        run(src, out)
    assert_clean(out)


def test_bad_arguments(src: Path, out: Path) -> None:
    solid(src / "a.png")
    with pytest.raises(SidpipeError, match="resolution"):
        run(src, out, resolution=0)
    with pytest.raises(SidpipeError, match=r"references\.max_pixels"):
        run(src, out, max_pixels=0)
    assert_clean(out)


# --- hostile folders -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mask_name", "fix"),
    [
        ("04.mask.jpg", "save it as a black-and-white PNG named 04.mask.png"),
        ("04.MASK.PNG", "rename it to 04.mask.png"),
        ("04.Mask.webp", "save it as a black-and-white PNG named 04.mask.png"),
    ],
)
def test_anything_named_like_a_mask_is_never_a_reference(
    src: Path, out: Path, mask_name: str, fix: str
) -> None:
    solid(src / "04.png")
    solid(src / "05.png", BLUE)
    solid(src / mask_name, WHITE)
    assert [p.name for p in list_reference_images(src)] == ["04.png", "05.png"]
    assert mask_name in [p.name for p in reference_inputs(src)]  # renaming it reruns the job
    with pytest.raises(SidpipeError) as info:
        run(src, out)
    message = str(info.value)
    assert f"{src / mask_name}: named like a mask" in message and fix in message
    assert_clean(out)


def test_non_ascii_names_get_distinct_ascii_ids(src: Path, out: Path) -> None:
    names = ["犬.png", "猫.png", "café.png", "cafe\u0301 2.png", "cafe.png", "my photo.png"]
    for n, name in enumerate(names):
        solid(src / name, (n * 40, 0, 0))
    rows = run(src, out)
    ids = {Path(r["source_path"]).name: r["image_id"] for r in rows}
    assert len(set(ids.values())) == len(names), ids
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids.values()), ids
    assert ids["cafe.png"] == "cafe" and ids["my photo.png"] == "my_photo"  # ASCII: as before
    assert ids["café.png"].startswith("cafe-") and ids["犬.png"].startswith("img-")
    # The same name spelt decomposed (as macOS stores it) gets the same id as composed.
    assert image_id_for(Path("cafe\u0301.png")) == ids["café.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{i}.png" for i in ids.values()] + ["manifest.csv"]
    )


def test_broken_links_are_named(
    src: Path, out: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    solid(src / "a.png")
    solid(src / "b.png", BLUE)
    (src / "c.jpg").symlink_to(tmp_path / "gone" / "c.jpg")
    with pytest.raises(SidpipeError) as info:
        run(src, out, min_images=3)
    message = str(info.value)
    assert "found 2 reference image(s)" in message
    assert f"{src / 'c.jpg'} -> {tmp_path / 'gone' / 'c.jpg'}" in message
    assert_clean(out)
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        rows = run(src, out, min_images=2)
    assert len(rows) == 2 and "broken link" in caplog.text and str(src / "c.jpg") in caplog.text


def test_duplicate_pixels_under_two_names_are_refused(src: Path, out: Path) -> None:
    bands(20, 20, [RED, BLUE]).save(src / "a.png")
    bands(20, 20, [RED, BLUE]).save(src / "copy of a.bmp")
    solid(src / "b.png", GREEN)
    with pytest.raises(SidpipeError) as info:
        run(src, out)
    message = str(info.value)
    assert "a.png" in message and "copy of a.bmp" in message and "same pixels" in message
    assert "delete one" in message
    assert_clean(out)


@pytest.mark.parametrize("size", [(1, 1), (7, 3000)])
def test_images_under_min_side_are_refused(src: Path, out: Path, size) -> None:
    solid(src / "a.png", size=(80, 80))
    solid(src / "tiny.png", BLUE, size=size)
    with pytest.raises(SidpipeError) as info:
        prepare_references(src, out, subject="dog", resolution=64, min_images=1)  # default
    message = str(info.value)
    assert f"tiny.png: {size[0]}x{size[1]} pixels" in message
    assert "references.min_side" in message and "64 px" in message
    assert_clean(out)


def test_small_and_elongated_images_are_flagged(
    src: Path, out: Path, caplog: pytest.LogCaptureFixture
) -> None:
    solid(src / "fine.png", size=(64, 80))
    solid(src / "small.png", BLUE, size=(20, 20))
    solid(src / "long.png", GREEN, size=(300, 100))
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        rows = run(src, out, resolution=64, min_side=16)
    flags = {r["image_id"]: r["warnings"] for r in rows}
    assert flags["fine"] == ""
    assert "small" in flags["small"] and "upscaled 3.2x" in flags["small"]
    assert "elongated" in flags["long"] and "300:100" in flags["long"] and "33 %" in flags["long"]
    assert read_csv(out / "manifest.csv")[1]["warnings"] == flags["long"]
    assert "small.png: small" in caplog.text and "long.png: elongated" in caplog.text
