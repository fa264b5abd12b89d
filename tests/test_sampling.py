"""Tests for sidpipe.sampling: prompts, negative prompts, batched resumable sampling, grids."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from sidpipe.io import SidpipeError, read_csv, write_csv
from sidpipe.sample_grids import write_grids, write_side_by_side
from sidpipe.sampling import (
    MANIFEST_FIELDS,
    arm_prompts,
    expand_prompts,
    load_arm_pipeline,
    negative_prompt_from_descriptions,
    sample_arm,
)
from sidpipe.tiny_models import build_tiny_models

REPO = Path(__file__).resolve().parents[1]
CORPUS = ["a photo of sks dog", "a sks dog in the jungle", "a red sks dog on the beach"]
RES, STEPS = 64, 2
TEMPLATES = ["a {token} {class} in the jungle", "a red {token} {class}", "a wet {token} {class}"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_tiny_models(tmp_path_factory.mktemp("models") / "tiny", CORPUS, seed=0)


@pytest.fixture(scope="module")
def pipe(models: dict[str, str]) -> Any:
    return load_arm_pipeline(models["sd"], None, None, "float32", "cpu")


class Spy:
    """Counts pipeline calls and images while delegating everything to the real pipeline."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.calls, self.images = pipe, 0, 0

    def __call__(self, **kwargs: Any) -> Any:
        self.calls += 1
        self.images += kwargs["latents"].shape[0]
        return self.pipe(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)


TINY_DEMO_MUG = REPO / "tests/data/tiny_demo/subjects/red_mug/descriptions.yaml"


def sample(pipe: Any, out: Path, seeds: list[int], templates=TEMPLATES, **kwargs) -> list[dict]:
    prompts = expand_prompts(templates, "dog", "sks")
    kwargs = {"steps": STEPS, "resolution": RES, "batch_size": 4, "dtype": "float32"} | kwargs
    return sample_arm("tiny", out, prompts, seeds, None, None, "sks", pipe=pipe, **kwargs)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as handle:
        return np.asarray(handle.convert("RGB"), np.int16)


# --- prompts -------------------------------------------------------------------------------


def test_expand_prompts_has_25_per_kind_and_plain_prompts_lack_the_identifier() -> None:
    templates = yaml.safe_load((REPO / "prompts/dreambooth.yaml").read_text())
    for kind in ("object", "live"):
        rows = expand_prompts(templates[kind], "dog", "sks")
        assert len(rows) == 25
        assert [row["prompt_id"] for row in rows] == list(range(25))
        for row in rows:
            assert "sks" in row["prompt"].split()
            assert "sks" not in row["prompt_plain"].split()
            assert "  " not in row["prompt_plain"] and "dog" in row["prompt_plain"]
    rows = expand_prompts(
        ["a {token} {class} in the jungle", "a red {token} {class}"], "dog", "sks"
    )
    assert [r["prompt"] for r in rows] == ["a sks dog in the jungle", "a red sks dog"]
    assert [r["prompt_plain"] for r in rows] == ["a dog in the jungle", "a red dog"]
    with pytest.raises(SidpipeError, match="token"):
        expand_prompts(["a {class}"], "dog", "sks")
    # a concept subject: its words stand in for the tokens in what TA and the judge read
    rows = expand_prompts(
        ["a {token} {class}", "a {token} teapot in the snow"], "mug", "<c_1> <c_2>", "upside down"
    )
    assert [r["prompt"] for r in rows] == ["a <c_1> <c_2> mug", "a <c_1> <c_2> teapot in the snow"]
    assert [r["prompt_plain"] for r in rows] == [
        "an upside down mug",
        "an upside down teapot in the snow",
    ]
    assert expand_prompts(["A {token} {class}"], "cat", "<c>", "frozen")[0]["prompt_plain"] == (
        "A frozen cat"
    )


def test_negative_prompt_keeps_the_context_and_drops_the_subject(pipe: Any) -> None:
    entries = yaml.safe_load(TINY_DEMO_MUG.read_text())
    descriptions = [entry["case3"] for entry in entries.values()]
    negative = negative_prompt_from_descriptions(descriptions, "mug")
    parts = negative.split(", ")
    assert "[V]" not in negative and "mug" not in negative
    assert parts[0] == "on a blue and white checkered tablecloth"  # the joiner "on" is kept
    assert "in front of a plain cream wall" in parts
    assert any("terracotta pot" in part and "plant" in part for part in parts)
    assert not any(part.startswith(("with ", ",")) for part in parts)  # pure joiners dropped
    assert len(parts) == len(set(parts))  # the shared tablecloth / wall parts appear once
    # With a tokenizer, whole parts are kept while they fit the window.
    two = ", ".join(parts[:2])
    window = len(pipe.tokenizer(two).input_ids)  # the tiny tokenizer splits words finely
    short = negative_prompt_from_descriptions(descriptions, "mug", pipe.tokenizer, window + 1)
    assert short == two
    everything = negative_prompt_from_descriptions(descriptions, "mug", pipe.tokenizer, 10_000)
    assert everything == negative


def test_arm_negative_prompt_fits_the_base_models_text_window(
    models: dict[str, str], tmp_path: Path
) -> None:
    """Six long SID descriptions make a negative prompt far over 77 tokens: the arm keeps the
    whole parts that fit, so what the manifest records is what the text encoder sees."""
    entries = yaml.safe_load(TINY_DEMO_MUG.read_text())
    texts = [entry["case3"] for entry in entries.values()]
    texts += [t.replace("tablecloth", "wooden desk").replace("wall", "curtain") for t in texts]
    write_csv(
        tmp_path / "sid.csv",
        [{"image_id": str(i), "description": t} for i, t in enumerate(texts)],
        ["image_id", "description"],
    )
    (tmp_path / "train_info.json").write_text('{"token": "sks"}')
    args = (["a {token} {class}"], "mug", tmp_path / "train_info.json", tmp_path / "sid.csv")
    _, _, unbounded = arm_prompts(*args)
    _, _, fitted = arm_prompts(*args, models["sd"])
    tokenizer = load_arm_pipeline(models["sd"], None, None, "float32", "cpu").tokenizer
    assert len(tokenizer(unbounded).input_ids) > tokenizer.model_max_length
    assert len(tokenizer(fitted).input_ids) <= tokenizer.model_max_length
    assert unbounded.startswith(fitted + ", ")  # whole parts, in order


def test_an_empty_negative_prompt_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Descriptions that name nothing beside the subject: the arm samples as the standard one."""
    write_csv(tmp_path / "d.csv", [{"description": "a [V] mug"}], ["description"])
    (tmp_path / "train_info.json").write_text('{"token": "sks"}')
    with caplog.at_level("WARNING", logger="sidpipe"):
        _, _, negative = arm_prompts(
            ["a {token} {class}"], "mug", tmp_path / "train_info.json", tmp_path / "d.csv"
        )
    assert negative == ""
    assert f"{tmp_path / 'd.csv'}: the descriptions name nothing beside the subject" in caplog.text


# --- sampling ------------------------------------------------------------------------------


def test_image_does_not_depend_on_batch_size_or_batch_mates(pipe: Any, tmp_path: Path) -> None:
    one = sample(pipe, tmp_path / "b1", [0, 1], batch_size=1)
    four = sample(pipe, tmp_path / "b4", [0, 1], batch_size=4)
    # Another batch composition: (prompt 1, seed 1) next to seeds and prompts not seen above.
    mixed = sample(pipe, tmp_path / "mixed", [7, 1, 9], templates=TEMPLATES[1:2], batch_size=3)
    assert [r["path"] for r in one] == [r["path"] for r in four]
    for row in one:
        a, b = pixels(tmp_path / "b1" / row["path"]), pixels(tmp_path / "b4" / row["path"])
        assert np.abs(a - b).max() <= 2, row["path"]  # float32 batching noise, after rounding
    a = pixels(tmp_path / "b1" / "01_01.png")
    assert np.abs(a - pixels(tmp_path / "mixed" / "00_01.png")).max() <= 2
    # ... while other seeds / prompts do give other images.
    assert np.abs(a - pixels(tmp_path / "b1" / "01_00.png")).max() > 10
    assert np.abs(a - pixels(tmp_path / "b1" / "00_01.png")).max() > 0
    assert mixed[0]["prompt"] == "a red sks dog"


def test_manifest_lists_every_image(pipe: Any, tmp_path: Path) -> None:
    rows = sample(pipe, tmp_path, [3, 4])
    assert read_csv(tmp_path / "manifest.csv") == [
        {k: str(v) for k, v in row.items()} for row in rows
    ]
    assert list(rows[0]) == MANIFEST_FIELDS and len(rows) == 6
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(r["path"] for r in rows)
    for row in rows:
        with Image.open(tmp_path / row["path"]) as image:
            assert image.size == (RES, RES)


def test_resume_regenerates_only_missing_and_corrupt_images(pipe: Any, tmp_path: Path) -> None:
    spy = Spy(pipe)
    rows = sample(spy, tmp_path, [0, 1])
    assert (spy.calls, spy.images) == (2, 6)
    paths = [tmp_path / row["path"] for row in rows]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}
    deleted, corrupt = paths[1], paths[4]
    deleted.unlink()
    corrupt.write_bytes(before[corrupt][1][: len(before[corrupt][1]) // 2])

    spy = Spy(pipe)
    sample(spy, tmp_path, [0, 1])
    assert (spy.calls, spy.images) == (1, 2)  # both fit one batch
    for path in paths:
        if path in (deleted, corrupt):
            with Image.open(path) as image:
                image.load()
            original = np.asarray(Image.open(io.BytesIO(before[path][1])).convert("RGB"))
            assert np.abs(pixels(path) - original.astype(np.int16)).max() <= 2
        else:
            assert (path.stat().st_mtime_ns, path.read_bytes()) == before[path]
    assert not list(tmp_path.glob(".*tmp-*"))

    # Nothing left to do: the pipeline is not called at all.
    spy = Spy(pipe)
    sample(spy, tmp_path, [0, 1])
    assert spy.calls == 0
    # Other settings: every image is stale and regenerated.
    spy = Spy(pipe)
    sample(spy, tmp_path, [0, 1], guidance_scale=3.0)
    assert spy.images == 6


def test_settings_record_the_precision_the_images_are_made_in(
    models: dict[str, str], tmp_path: Path
) -> None:
    """float16 asked for on a CPU runs in float32: the resume record says float32, so a later
    GPU run in float16 regenerates these images instead of mixing precisions."""
    prompts = expand_prompts(TEMPLATES[:1], "dog", "sks")
    kwargs = {"steps": STEPS, "resolution": RES, "device": "cpu"}
    sample_arm(models["sd"], tmp_path, prompts, [0], None, None, "sks", dtype="float16", **kwargs)
    recorded = json.loads((tmp_path / ".sampling.json").read_text())["global"]["dtype"]
    assert recorded == "float32"


def test_negative_prompt_changes_the_image(pipe: Any, tmp_path: Path) -> None:
    plain = sample(pipe, tmp_path / "plain", [0], templates=TEMPLATES[:1])
    negative = sample(
        pipe, tmp_path / "neg", [0], templates=TEMPLATES[:1], negative_prompt="a red dog"
    )
    assert negative[0]["negative_prompt"] == "a red dog" and plain[0]["negative_prompt"] == ""
    diff = pixels(tmp_path / "plain/00_00.png") - pixels(tmp_path / "neg/00_00.png")
    assert np.abs(diff).max() > 0


def test_loading_the_base_model_and_bad_arguments(models: dict[str, str], tmp_path: Path) -> None:
    prompts = expand_prompts(TEMPLATES[:1], "dog", "sks")
    kwargs = {"steps": STEPS, "resolution": RES, "dtype": "float16", "device": "cpu"}
    rows = sample_arm(models["sd"], tmp_path, prompts, [0], None, None, "sks", **kwargs)
    assert (tmp_path / rows[0]["path"]).is_file()
    recorded = json.loads((tmp_path / ".sampling.json").read_text())["global"]["dtype"]
    assert recorded == "float32"  # float16 on CPU fell back to float32
    with pytest.raises(SidpipeError, match="without an algorithm"):
        sample_arm(models["sd"], tmp_path / "x", prompts, [5], None, tmp_path, "sks", **kwargs)
    with pytest.raises(SidpipeError, match="seeds"):
        sample_arm(models["sd"], tmp_path / "x", prompts, [1, 1], None, None, "sks", **kwargs)


# --- figures -------------------------------------------------------------------------------


def test_grid_and_side_by_side_sizes(pipe: Any, tmp_path: Path) -> None:
    base = sample(pipe, tmp_path / "base", [0, 1, 2])
    sample(pipe, tmp_path / "sid", [0, 1, 2], guidance_scale=5.0)
    grid = write_grids(tmp_path / "base", base, tmp_path / "grid.png", seeds_shown=2, tile=32)
    with Image.open(tmp_path / "grid.png") as saved:
        assert saved.size == grid.size == (200 + 2 * 32, 16 + 3 * 32)
    side = write_side_by_side(
        tmp_path / "base", tmp_path / "sid", tmp_path / "s.png", [0, 2], 1, 32
    )
    assert side.size == (200 + 2 * 32, 16 + 2 * 32)
    with Image.open(tmp_path / "base/02_01.png") as image:  # row 2, left column: baseline
        expected = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(side)[16 + 32 : 16 + 64, 200 : 200 + 32], expected)
    with pytest.raises(SidpipeError, match="missing"):
        write_side_by_side(tmp_path / "base", tmp_path / "sid", tmp_path / "t.png", [0], 9)
