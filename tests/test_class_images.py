"""Class (prior-preservation) images: resumable, and independent of the batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sidpipe import class_images
from sidpipe.class_images import MANIFEST_FIELDS, generate_class_images, image_seed
from sidpipe.io import SidpipeError, read_csv
from sidpipe.models import load_sd_pipeline
from sidpipe.tiny_models import build_tiny_models

SIZE = 64


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_models(tmp_path_factory.mktemp("models") / "tiny", ["a photo of a mug"])["sd"]


class CountingPipeline:
    """Wraps the real pipeline and records the batch size of every call."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.calls: list[int] = []

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    def __call__(self, prompt: list[str], **kwargs):
        self.calls.append(len(prompt))
        return self.pipe(prompt, **kwargs)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[CountingPipeline]:
    made: list[CountingPipeline] = []

    def load(*args, **kwargs) -> CountingPipeline:
        made.append(CountingPipeline(load_sd_pipeline(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(class_images, "load_sd_pipeline", load)
    return made


def generate(sd: str, out: Path, **kwargs) -> list[dict]:
    args = {"count": 3, "steps": 2, "resolution": SIZE, "batch_size": 2, "device": "cpu"}
    return generate_class_images(sd, "mug", out, **{**args, **kwargs})


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_rerun_generates_only_missing_images(
    sd: str, tmp_path: Path, spy: list[CountingPipeline]
) -> None:
    rows = generate(sd, tmp_path)
    assert spy[-1].calls == [2, 1]
    manifest = read_csv(tmp_path / "manifest.csv")
    assert list(manifest[0]) == MANIFEST_FIELDS
    assert [r["path"] for r in manifest] == ["0000.png", "0001.png", "0002.png"]
    assert {r["prompt"] for r in manifest} == {"a photo of a mug"}
    assert [int(r["seed"]) for r in manifest] == [image_seed(0, i) for i in range(3)]
    assert [r["seed"] for r in rows] == [image_seed(0, i) for i in range(3)]
    before = {name: pixels(tmp_path / name) for name in ("0000.png", "0001.png", "0002.png")}

    (tmp_path / "0001.png").unlink()
    (tmp_path / "0002.png").write_bytes(b"truncated")  # a damaged file counts as missing
    generate(sd, tmp_path)
    assert spy[-1].calls == [2]
    for name, image in before.items():
        # 0002 was made in a batch of 1, now of 2: equal up to float rounding (1 level of 255)
        assert np.abs(pixels(tmp_path / name) - image).max() <= 1, name

    n_loads = len(spy)
    generate(sd, tmp_path)  # complete: the model is not even loaded
    assert len(spy) == n_loads
    assert not list(tmp_path.glob(".*tmp*"))

    generate(sd, tmp_path, prompt="a painting of a {class}")  # stale prompt: all redone
    assert spy[-1].calls == [2, 1]
    assert read_csv(tmp_path / "manifest.csv")[0]["prompt"] == "a painting of a mug"


def test_images_do_not_depend_on_the_batch_size(sd: str, tmp_path: Path) -> None:
    generate(sd, tmp_path / "one", batch_size=1)
    generate(sd, tmp_path / "two", batch_size=2)
    for name in ("0000.png", "0001.png", "0002.png"):
        a, b = pixels(tmp_path / "one" / name), pixels(tmp_path / "two" / name)
        assert np.abs(a - b).max() <= 1, name
    assert not np.array_equal(
        pixels(tmp_path / "one" / "0000.png"), pixels(tmp_path / "one" / "0001.png")
    )


def test_bad_count_is_an_error(sd: str, tmp_path: Path) -> None:
    with pytest.raises(SidpipeError, match="count must be at least 1"):
        generate(sd, tmp_path, count=0)
