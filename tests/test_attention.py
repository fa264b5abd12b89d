"""Tests for sidpipe.attention: the identifier's cross-attention maps and their mask mass."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from sidpipe.attention import (
    CSV_FIELDS,
    AttentionStore,
    IdentifierAttnProcessor,
    attention_for_arm,
    attention_maps,
    attention_mass_in_mask,
    finish_map,
    identifier_positions,
    overlay_attention,
    record_cross_attention,
    token_attention,
)
from sidpipe.grounded_sam import generated_subject_mask
from sidpipe.io import SidpipeError, read_csv
from sidpipe.sampling import LazyPipeline, expand_prompts, load_arm_pipeline, sample_arm
from sidpipe.tiny_models import build_tiny_models

CORPUS = ["a photo of sks dog", "a sks dog in the jungle", "a red sks dog on the beach"]
RES, STEPS = 64, 2
GEN = {"steps": STEPS, "resolution": RES}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_tiny_models(tmp_path_factory.mktemp("models") / "tiny", CORPUS, seed=0)


@pytest.fixture(scope="module")
def pipe(models: dict[str, str]) -> Any:
    return load_arm_pipeline(models["sd"], None, None, "float32", "cpu")


def cross_attention(pipe: Any) -> Any:
    return next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))


def test_wrapped_processor_returns_the_default_output_and_records_the_cond_half(pipe: Any) -> None:
    attn = cross_attention(pipe)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, attn.to_q.in_features, generator=gen)  # 8x8 latents
    context = torch.randn(2, 77, attn.to_k.in_features, generator=gen)
    store = AttentionStore([2, 5], (8, 8), cfg=True)
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden, context)
        got = IdentifierAttnProcessor(AttnProcessor2_0(), store)(attn, hidden, context)
        assert torch.equal(got, expected)
        # By hand: the conditional (second) sample's softmax(q k^T / sqrt(d)), mean over heads.
        q = attn.to_q(hidden[1:]).view(64, attn.heads, -1).transpose(0, 1)
        k = attn.to_k(context[1:]).view(77, attn.heads, -1).transpose(0, 1)
        probs = (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1).mean(0)
    want = probs[:, [2, 5]].T.reshape(2, 8, 8)
    assert store.mean().shape == (1, 2, 8, 8)
    torch.testing.assert_close(store.mean()[0], want, rtol=1e-5, atol=1e-6)


def test_recording_does_not_change_the_image(pipe: Any, tmp_path: Path) -> None:
    before = dict(pipe.unet.attn_processors)
    image, attention = attention_maps(pipe, "a sks dog in the jungle", 3, "sks", **GEN)
    assert dict(pipe.unet.attn_processors) == before  # the original processors are back
    # The same prompt and seed through sample_arm (batch of one, no recorder): same pixels.
    prompts = expand_prompts(["a {token} {class} in the jungle"], "dog", "sks")
    sample_arm("tiny", tmp_path, prompts, [3], None, None, "sks", pipe=pipe, batch_size=1, **GEN)
    with Image.open(tmp_path / "00_03.png") as sampled:
        assert np.array_equal(np.asarray(sampled.convert("RGB")), np.asarray(image))


def test_map_is_a_normalised_image_sized_distribution(pipe: Any) -> None:
    image, attention = attention_maps(pipe, "a red sks dog on the beach", 0, "sks", **GEN)
    assert attention.shape == (RES, RES) == (image.height, image.width)
    assert attention.min() >= 0 and attention.sum() == pytest.approx(1.0, abs=1e-5)
    full, empty = np.ones((RES, RES), bool), np.zeros((RES, RES), bool)
    assert attention_mass_in_mask(attention, full) == pytest.approx(1.0)
    assert attention_mass_in_mask(attention, empty) == 0.0
    left = np.zeros((RES, RES), bool)
    left[:, : RES // 2] = True
    share = attention_mass_in_mask(attention, left)
    assert 0.0 < share < 1.0
    assert share + attention_mass_in_mask(attention, ~left) == pytest.approx(1.0)
    with pytest.raises(SidpipeError, match="shape"):
        attention_mass_in_mask(attention, left[:10])


def test_an_identifier_split_into_sub_tokens_sums_them(pipe: Any) -> None:
    prompt, word = "a zq dog in the jungle", "zq"
    sub_tokens = pipe.tokenizer.tokenize(word)
    assert len(sub_tokens) >= 2  # the tiny tokenizer has never seen "zq"
    positions = identifier_positions(pipe, prompt, word)
    assert positions == list(range(2, 2 + len(sub_tokens)))  # after <bos> and "a"
    image, token_maps = token_attention(pipe, prompt, 1, positions, **GEN)
    assert token_maps.shape == (len(sub_tokens), RES // 8, RES // 8)
    _, attention = attention_maps(pipe, prompt, 1, word, **GEN)
    np.testing.assert_allclose(attention, finish_map(token_maps, (RES, RES)), atol=1e-7)
    # Each sub-token recorded on its own, then summed: the same map.
    alone = np.stack([token_attention(pipe, prompt, 1, [p], **GEN)[1][0] for p in positions])
    np.testing.assert_allclose(alone, token_maps, rtol=1e-5, atol=1e-7)
    assert not np.allclose(alone[0], alone[1])  # really different tokens


def test_added_tokens_and_missing_identifiers(pipe: Any) -> None:
    tokenizer = copy.deepcopy(pipe.tokenizer)
    tokenizer.add_tokens(["<sks>"])  # textual inversion's new token: one id, not "<", "sks", ">"
    fake = SimpleNamespace(tokenizer=tokenizer)
    assert identifier_positions(fake, "a <sks> dog, the <sks> dog", "<sks>") == [2, 6]
    with pytest.raises(SidpipeError, match="does not occur"):
        identifier_positions(fake, "a dog", "<sks>")


def test_overlay_blends_a_colormap() -> None:
    image = Image.new("RGB", (16, 16), (10, 200, 30))
    attention = np.zeros((8, 8), np.float32)
    attention[:4] = 1.0
    out = overlay_attention(image, attention)
    assert out.size == image.size and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    assert (arr[0] != arr[-1]).any()  # hot and cold halves differ
    assert np.array_equal(np.asarray(overlay_attention(image, attention, alpha=0.0)), image)


def test_recorder_is_removed_after_an_error(pipe: Any) -> None:
    before = dict(pipe.unet.attn_processors)
    store = AttentionStore([1], (8, 8), cfg=True)
    with pytest.raises(RuntimeError, match="boom"), record_cross_attention(pipe, store):
        assert any(
            isinstance(p, IdentifierAttnProcessor) for p in pipe.unet.attn_processors.values()
        )
        raise RuntimeError("boom")
    assert dict(pipe.unet.attn_processors) == before


def test_attention_for_arm_writes_maps_overlays_and_csv(
    models: dict[str, str], pipe: Any, tmp_path: Path
) -> None:
    prompts = expand_prompts(
        ["a {token} {class} in the jungle", "a red {token} {class}"], "dog", "sks"
    )
    rows = attention_for_arm(
        models["sd"],
        tmp_path / "att",
        prompts,
        [0, 1],
        None,
        None,
        "sks",
        "dog",
        models["grounding_dino"],
        models["sam"],
        prompt_ids=[1],
        segmentation={"box_threshold": 0.0, "text_threshold": 0.0},
        device="cpu",
        pipe=pipe,
        **GEN,
    )
    assert [(r["prompt_id"], r["seed"]) for r in rows] == [(1, 0), (1, 1)]
    saved = read_csv(tmp_path / "att" / "attention.csv")
    assert list(saved[0]) == CSV_FIELDS and len(saved) == 2
    for row in rows:
        assert row["flag"] == "" and 0.0 <= row["attention_mass_in_mask"] <= 1.0
        assert 0.0 < row["mask_fraction"] <= 1.0
        for key in ("image_path", "map_path", "overlay_path", "mask_path"):
            with Image.open(tmp_path / "att" / row[key]) as image:
                assert image.size == (RES, RES)
    maps = np.load(tmp_path / "att" / "maps.npz")
    assert sorted(maps.files) == ["01_00", "01_01"]
    assert maps["01_00"].sum() == pytest.approx(1.0, abs=1e-5)


def test_generated_mask_is_none_without_a_box(models: dict[str, str]) -> None:
    image = Image.new("RGB", (RES, RES), (128, 128, 128))
    masks = generated_subject_mask(
        [image], "dog", models["grounding_dino"], models["sam"], box_threshold=1.1, device="cpu"
    )
    assert masks == [None]


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".npz"  # zip entries carry their write time
    }


def test_a_job_samples_and_maps_with_one_pipeline_load(
    models: dict[str, str], tmp_path: Path
) -> None:
    """Rule sample_and_attention: sample_arm and attention_for_arm share a LazyPipeline, so the
    model is loaded once; the maps are those of a job that loads its own pipeline."""
    prompts = expand_prompts(
        ["a {token} {class} in the jungle", "a red {token} {class}"], "dog", "sks"
    )
    arm = {"base_model": models["sd"], "algorithm": None, "weights_dir": None, "token": "sks"}
    shared = {"dtype": "float32", "device": "cpu", **GEN}
    maps = {
        "class_name": "dog",
        "detector": models["grounding_dino"],
        "segmenter": models["sam"],
        "prompt_ids": [1],
        "seeds": [0],
        "segmentation": {"box_threshold": 0.0, "text_threshold": 0.0},
    }

    def job(out: Path) -> tuple[int, int]:
        """Pipeline loads after sampling and after mapping."""
        loader = LazyPipeline(models["sd"], None, None, "float32", "cpu")
        sample_arm(
            out_dir=out / "samples", prompts=prompts, seeds=[0, 1], loader=loader, **arm, **shared
        )
        sampled = loader.loads
        attention_for_arm(
            out_dir=out / "att", prompts=prompts, loader=loader, **arm, **shared, **maps
        )
        assert loader._pipe is None  # released before GroundingDINO and SAM
        return sampled, loader.loads

    assert job(tmp_path / "first") == (1, 1)
    assert job(tmp_path / "first") == (0, 1)  # a rerun keeps the samples; the maps load it
    alone = tmp_path / "alone"
    attention_for_arm(out_dir=alone, prompts=prompts, **arm, **shared, **maps)
    assert _files(tmp_path / "first/att") == _files(alone)
    first, again = np.load(tmp_path / "first/att/maps.npz"), np.load(alone / "maps.npz")
    assert sorted(first.files) == sorted(again.files) == ["01_00"]
    np.testing.assert_array_equal(first["01_00"], again["01_00"])
