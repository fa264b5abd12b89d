"""The tiny demo's subjects (tests/data/tiny_demo): reproducible, masked, correctly described."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests/data/tiny_demo"  # the tiny-model demo of wave 1, kept for tests
SCRIPT = DEMO / "make_demo_subjects.py"
SUBJECTS_DIR = DEMO / "subjects"
CASES = ("case1", "case2", "case3", "case4")


def _subjects() -> list[dict[str, str]]:
    with open(DEMO / "subjects.tsv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


SUBJECTS = _subjects()
IDS = [row["subject"] for row in SUBJECTS]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): _sha256(path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.png") if not p.name.endswith(".mask.png"))


def test_subjects_tsv_layout():
    with open(DEMO / "subjects.tsv", newline="") as handle:
        header = handle.readline().rstrip("\n").split("\t")
    assert header == ["subject", "class", "kind", "images", "source", "mask_backend"]
    assert IDS == ["red_mug", "toy_robot", "spotted_dog"]
    for row in SUBJECTS:
        assert row["kind"] in {"object", "live"}
        assert row["images"] == f"subjects/{row['subject']}"
        assert (DEMO / row["images"]).is_dir()  # relative to demo/, the working directory
        assert row["source"] == "local"
    assert sorted(p.name for p in SUBJECTS_DIR.iterdir()) == sorted(IDS)


def test_script_reproduces_committed_files(tmp_path):
    out = tmp_path / "subjects"
    for _ in range(2):  # second run replaces the first run's folders: still identical
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True)
        generated = _tree(out)
        assert generated == _tree(SUBJECTS_DIR)
    assert sorted(p.name for p in out.iterdir()) == sorted(IDS)  # no temporary leftovers


@pytest.mark.parametrize("subject", IDS)
def test_images_have_binary_subject_masks(subject):
    folder = SUBJECTS_DIR / subject
    images = _images(folder)
    assert [p.stem for p in images] == ["01", "02", "03", "04"]
    sizes = set()
    for path in images:
        with Image.open(path) as image, Image.open(path.with_suffix(".mask.png")) as mask:
            assert image.mode == "RGB"
            assert mask.mode == "L"
            assert mask.size == image.size
            sizes.add(image.size)
            values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        fraction = float((values == 255).mean())
        assert 0.05 <= fraction <= 0.70, (path, fraction)
    assert len(sizes) == 1


def test_one_subject_is_not_square():
    sizes = set()
    for subject in IDS:
        with Image.open(_images(SUBJECTS_DIR / subject)[0]) as image:
            sizes.add(image.size)
    assert any(w != h for w, h in sizes)


@pytest.mark.parametrize("row", SUBJECTS, ids=IDS)
def test_descriptions_cover_every_image_and_case(row):
    folder = SUBJECTS_DIR / row["subject"]
    cls = row["class"]
    data = yaml.safe_load((folder / "descriptions.yaml").read_text(encoding="utf-8"))
    assert set(data) == {p.stem for p in _images(folder)}
    for stem, entry in data.items():
        assert set(entry) == set(CASES), stem
        assert entry["case1"] == f"a [V] {cls}"
        for case in CASES:
            text = entry[case]
            assert text.count("[V]") == 1, (stem, case)
            after = text.split("[V]", 1)[1]
            assert after.split()[0].strip(",.") == cls and after.startswith(" "), (stem, case)
            assert len(text.split()) <= 50, (stem, case)
