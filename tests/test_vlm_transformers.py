"""The `transformers` backend on tiny random LLaVA and BLIP-2 models: the real load and generate
path. Their text is gibberish, so these tests pin the validation and caption paths."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest

from sidpipe.descriptions.instructions import fill_instruction
from sidpipe.descriptions.stage import describe_references
from sidpipe.descriptions.text import caption_to_description
from sidpipe.io import SidpipeError, sha256_file, sha256_text
from sidpipe.models import train_clip_tokenizer
from sidpipe.tiny_vlms import build_tiny_blip2, build_tiny_llava
from sidpipe.vlm import VLMRequest
from sidpipe.vlm.local import TransformersBackend

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests/data/tiny_demo/subjects"
CORPUS = [
    "a mug on a blue and white checkered tablecloth next to a small green plant",
    "USER: describe the image ASSISTANT: a photo of a dog on the grass",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vlms")
    train_clip_tokenizer(CORPUS, root / "base" / "tokenizer")
    return {
        "base": str(root / "base"),
        "llava": build_tiny_llava(root / "llava", CORPUS, seed=0),
        "blip2": build_tiny_blip2(root / "blip2", CORPUS, seed=0),
    }


def make_references(root: Path, count: int = 2) -> Path:
    refs = root / "references" / "red_mug"
    refs.mkdir(parents=True)
    with open(refs / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "image_id", "path", "sha256", "source_path"])
        for n in range(1, count + 1):
            shutil.copyfile(DEMO / "red_mug" / f"{n:02d}.png", refs / f"{n:02d}.png")
            digest = sha256_file(refs / f"{n:02d}.png")
            writer.writerow(["red_mug", f"{n:02d}", f"{n:02d}.png", digest, f"x/{n:02d}.png"])
    return refs


def llava(models: dict[str, str], **settings) -> dict:
    return {
        "name": "llava",
        "backend": "transformers",
        "model": models["llava"],
        "max_new_tokens": 8,
        "batch_size": 2,
        "device": "cpu",
        **settings,
    }


def blip2(models: dict[str, str], **settings) -> dict:
    return {
        "name": "blip2",
        "backend": "transformers",
        "model": models["blip2"],
        "mode": "blip2_caption",
        "max_new_tokens": 8,
        "device": "cpu",
        **settings,
    }


def describe(tmp_path: Path, models: dict[str, str], vlm: dict, **kwargs) -> list[dict]:
    refs = tmp_path / "references" / "red_mug"
    if not refs.exists():
        make_references(tmp_path)
    args = {
        "references_dir": refs,
        "out_csv": tmp_path / "out" / "descriptions.csv",
        "cache_dir": tmp_path / "cache",
        "subject": "red_mug",
        "class_name": "mug",
        "kind": "object",
        "description_set": "sid_tiny",
        "case": 3,
        "vlm": vlm,
        "tokenizer": models["base"],
        "max_attempts": 2,
    }
    return describe_references(**{**args, **kwargs})


def cache_entries(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "cache").glob("*.json"))]


def test_llava_gibberish_is_retried_then_reported(
    tmp_path: Path, models: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        with pytest.raises(SidpipeError) as err:
            describe(tmp_path, models, llava(models))
    message = str(err.value)
    assert "after 2 attempt(s)" in message and "image 01" in message and "image 02" in message
    assert "4 request(s) sent in this run" in message
    assert not (tmp_path / "out" / "descriptions.csv").exists()
    # Rejected answers are logged (2 images x 2 attempts), never cached.
    rejected = [r.getMessage() for r in caplog.records if "answer rejected" in r.getMessage()]
    assert len(rejected) == 4 and not cache_entries(tmp_path)
    assert sum("attempt 2" in line for line in rejected) == 2


def test_llava_token_accounting(models: dict[str, str]) -> None:
    backend = TransformersBackend(llava(models))
    requests = [VLMRequest("01", DEMO / "red_mug" / "01.png", fill_instruction(3, "mug"))]
    (response,) = backend.generate(requests)
    assert 0 < response.completion_tokens <= 8
    assert response.prompt_tokens > 16  # image tokens + text
    assert response.finish_reason in ("stop", "length")


def test_batched_generation_matches_single(models: dict[str, str]) -> None:
    requests = [
        VLMRequest(f"{n:02d}", DEMO / "red_mug" / f"{n:02d}.png", "Describe the mug" + "!" * n)
        for n in (1, 2, 3)
    ]
    backend = TransformersBackend(llava(models))
    batched = backend.generate(requests)
    single = [backend.generate([request])[0] for request in requests]
    assert batched == single  # left padding keeps each row's greedy continuation
    assert backend.requests_sent == 6


def test_blip2_captions_get_the_placeholder(tmp_path: Path, models: dict[str, str]) -> None:
    rows = describe(tmp_path, models, blip2(models))
    entries = {e["image_sha256"]: e for e in cache_entries(tmp_path)}
    assert len(entries) == 2
    for row in rows:
        entry = entries[row["image_sha256"]]
        assert entry["instruction"] == ""  # conditioned on the image only
        assert row["description"] == caption_to_description(entry["response"]["text"], "mug")
        assert row["description"].startswith("a [V] mug") or " [V] mug" in row["description"]
        assert row["description"].count("[V]") == 1
        assert row["instruction_sha256"] == sha256_text("")
        assert row["attempts"] == 1 and row["source"] == "vlm" and row["backend"] == "transformers"
        assert row["token_count"] <= 77


def test_blip2_style_prefix(tmp_path: Path, models: dict[str, str]) -> None:
    rows = describe(tmp_path, models, blip2(models), kind="style", class_name="painting")
    assert all(r["description"].startswith("A painting in the style of [V] art") for r in rows)


def test_chat_mode_needs_a_chat_template(tmp_path: Path, models: dict[str, str]) -> None:
    with pytest.raises(SidpipeError, match="mode: blip2_caption"):
        describe(tmp_path, models, blip2(models, mode="chat"))


def test_missing_model_folder_names_the_key(tmp_path: Path, models: dict[str, str]) -> None:
    with pytest.raises(SidpipeError, match=r"vlms\.llava\.model"):
        describe(tmp_path, models, llava(models, model=str(tmp_path / "no_such_model")))


def test_unknown_setting_is_refused(tmp_path: Path, models: dict[str, str]) -> None:
    with pytest.raises(SidpipeError, match="unknown key"):
        describe(tmp_path, models, llava(models, temprature=0))


def test_tiny_builders_are_deterministic_and_small(tmp_path: Path) -> None:
    for build in (build_tiny_llava, build_tiny_blip2):
        a, b = Path(build(tmp_path / "a", CORPUS, 0)), Path(build(tmp_path / "b", CORPUS, 0))
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        assert all(sha256_file(a / f) == sha256_file(b / f) for f in files)
        assert sum((a / f).stat().st_size for f in files) < 2_000_000
        shutil.rmtree(a)
        shutil.rmtree(b)
