"""BLIP-Diffusion (sidpipe.encoders.blip_diffusion) on a tiny random checkpoint, real layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sidpipe.encoders.blip_diffusion import (
    PatchedBlip2QFormerModel,
    fit_negative_prompt,
    generate,
    load_blip_diffusion,
    subject_and_context,
)
from sidpipe.encoders.tiny import build_tiny_blip_diffusion
from sidpipe.io import SidpipeError

pytestmark = pytest.mark.usefixtures("one_thread")

RES, STEPS = 64, 3
PROMPTS = ["on the beach", "in the snow"]

# Salesforce/blipdiffusion's model_index.json (682 bytes on the hub): components as
# (library, class), and the pipeline's own settings. Written out here, not imported, so that the
# test states the real checkpoint independently of the code under test.
REAL_INDEX = {
    "_class_name": "BlipDiffusionPipeline",
    "ctx_begin_pos": 2,
    "image_processor": ["blip_diffusion", "BlipImageProcessor"],
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "qformer": ["blip_diffusion", "Blip2QFormerModel"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
REAL_FOLDERS = {
    "image_processor",
    "qformer",
    "scheduler",
    "text_encoder",
    "tokenizer",
    "unet",
    "vae",
}


def _reference(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))


def _pixels(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image).astype(np.int16) for image in images]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(build_tiny_blip_diffusion(tmp_path_factory.mktemp("blip") / "tiny", seed=0))


@pytest.fixture(scope="module")
def pipe(tiny: Path) -> Any:
    return load_blip_diffusion(str(tiny), dtype="float32", device="cpu")


def run(pipe: Any, prompts: list[str], seeds: list[int], **kwargs: Any) -> list[np.ndarray]:
    settings = {"steps": STEPS, "resolution": RES, "reference": _reference(0)} | kwargs
    return _pixels(generate(pipe, class_name="dog", prompts=prompts, seeds=seeds, **settings))


def test_tiny_checkpoint_has_the_real_layout(tiny: Path) -> None:
    folders = {p.name for p in tiny.iterdir() if p.is_dir()}
    assert folders == REAL_FOLDERS
    index = json.loads((tiny / "model_index.json").read_text())
    assert {k: v for k, v in index.items() if k != "_diffusers_version"} == REAL_INDEX
    assert json.loads((tiny / "qformer/config.json").read_text())["architectures"] == [
        "Blip2QFormerModel"
    ]
    assert "tokenizer" not in json.loads((tiny / "qformer/config.json").read_text())
    text_config = json.loads((tiny / "text_encoder/config.json").read_text())
    assert text_config["architectures"] == ["ContextCLIPTextModel"]
    assert json.loads((tiny / "scheduler/scheduler_config.json").read_text())["_class_name"] == (
        "PNDMScheduler"
    )


def test_loads_with_ddim_and_shims(pipe: Any) -> None:
    from diffusers import DDIMScheduler

    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_end == 0.012  # from the checkpoint's scheduler config
    assert pipe.scheduler.config.clip_sample is False
    assert pipe._progress_bar_config == {"disable": True}
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    assert isinstance(pipe.qformer, PatchedBlip2QFormerModel)
    assert not pipe.qformer.training and not pipe.text_encoder.training


def test_generate_is_per_seed_and_batch_independent(pipe: Any) -> None:
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    seeds = [0, 1, 0, 1]
    images = generate(pipe, _reference(0), "dog", prompts, seeds, steps=STEPS, resolution=RES)
    assert [(im.size, im.mode) for im in images] == [((RES, RES), "RGB")] * 4
    batch = _pixels(images)
    assert all(np.array_equal(a, b) for a, b in zip(batch, run(pipe, prompts, seeds), strict=True))
    assert np.abs(batch[0] - batch[1]).mean() > 10  # another seed: another image
    assert np.abs(batch[0] - batch[2]).mean() > 1  # another prompt, same seed
    # (prompt 1, seed 0) alone, in a batch of two and next to other pairs: the same image
    alone = run(pipe, [PROMPTS[1]], [0])[0]
    mates = run(pipe, [PROMPTS[1], "in the jungle", PROMPTS[0]], [0, 7, 1], batch_size=2)
    for other in (alone, mates[0]):
        assert np.abs(other - batch[2]).max() <= 2  # float32 batching noise, after rounding
    assert np.abs(mates[2] - batch[1]).max() <= 2  # second batch of that call


class Spy:
    """Records the pipeline's calls while delegating everything to the real pipeline."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)


def test_pipeline_gets_class_reference_plain_prompts_and_seeded_latents(pipe: Any) -> None:
    spy, reference = Spy(pipe), _reference(0)
    prompts = ["on the beach", "in the snow", "in the jungle"]
    generate(spy, reference, "teapot", prompts, [5, 6, 7], steps=1, resolution=RES, batch_size=2)
    assert [call["prompt"] for call in spy.calls] == [prompts[:2], prompts[2:]]
    for call in spy.calls:
        n = len(call["prompt"])
        assert call["source_subject_category"] == call["target_subject_category"] == ["teapot"] * n
        assert call["reference_image"] is reference
        assert call["num_inference_steps"] == 1 and call["height"] == call["width"] == RES
    latents = torch.cat([call["latents"] for call in spy.calls])
    for row, seed in zip(latents, [5, 6, 7], strict=True):  # 8x downsampling VAE, 4 channels
        expected = torch.randn(
            (1, 4, RES // 8, RES // 8), generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(row[None], expected)


def test_reference_image_reaches_the_model(pipe: Any) -> None:
    first = run(pipe, [PROMPTS[0]], [3], reference=_reference(0))[0]
    again = run(pipe, [PROMPTS[0]], [3], reference=_reference(0))[0]
    other = run(pipe, [PROMPTS[0]], [3], reference=_reference(1))[0]
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 0.3  # batching noise is ~0.001 on average
    # and so does the class (source and target subject category)
    cat = _pixels(generate(pipe, _reference(0), "cat", [PROMPTS[0]], [3], STEPS, resolution=RES))
    assert np.abs(first - cat[0]).mean() > 0.3


def test_text_encoder_is_causal_like_clip(pipe: Any, tiny: Path) -> None:
    """Without context tokens, the patched ContextCLIPTextModel is CLIP's text model: upstream's
    causal mask no longer reaches transformers 5's CLIPEncoder (the module's workaround 3)."""
    from transformers import CLIPTextModel

    clip = CLIPTextModel.from_pretrained(tiny / "text_encoder").eval()
    ids = pipe.tokenizer(
        ["a dog on the beach", "blurry"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ours = pipe.text_encoder(input_ids=ids, ctx_embeddings=None)[0]
        reference = clip(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_qformer_masks_padding_and_keeps_upstream_parameters(pipe: Any, tiny: Path) -> None:
    """A class name's query embeddings do not depend on longer names padded next to it, and
    the patched Q-Former has exactly diffusers' parameter names (real checkpoints load)."""
    from diffusers.pipelines.deprecated.blip_diffusion import Blip2QFormerModel

    pixels = pipe.image_processor.preprocess(
        _reference(0), image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        alone = pipe.qformer(image_input=pixels, text_input=["dog"])
        padded = pipe.qformer(image_input=pixels, text_input=["dog", "red sneaker with laces"])
    assert alone.shape == (1, pipe.qformer.config.num_query_tokens, 32)
    torch.testing.assert_close(padded[:1], alone, rtol=1e-5, atol=1e-5)
    assert (padded[0] - padded[1]).abs().max() > 1e-3  # the text does reach the queries

    assert pipe.qformer.config.tokenizer == str(tiny / "qformer")  # the bundled BERT tokenizer
    upstream = Blip2QFormerModel(pipe.qformer.config)
    assert set(upstream.state_dict()) == set(pipe.qformer.state_dict())


def test_long_negative_prompt_is_cut_to_the_text_encoder(pipe: Any) -> None:
    negative = ", ".join(["blurry photo of a purple rug in a forest"] * 20)  # ~180 tokens
    kept = fit_negative_prompt(pipe, negative)
    assert len(pipe.tokenizer(kept).input_ids) <= 77 < len(pipe.tokenizer(negative).input_ids)
    assert negative.startswith(kept[:40])
    assert fit_negative_prompt(pipe, "blurry") == "blurry"
    cut = run(pipe, [PROMPTS[0]], [0], negative_prompt=negative)[0]  # upstream: RuntimeError
    assert np.array_equal(cut, run(pipe, [PROMPTS[0]], [0], negative_prompt=kept)[0])


def test_bad_arguments(pipe: Any, tmp_path: Path) -> None:
    with pytest.raises(SidpipeError, match="one seed per prompt"):
        generate(pipe, _reference(0), "dog", PROMPTS, [0], steps=1, resolution=RES)
    with pytest.raises(SidpipeError, match="multiple of 8"):
        generate(pipe, _reference(0), "dog", PROMPTS[:1], [0], steps=1, resolution=60)
    assert generate(pipe, _reference(0), "dog", [], [], steps=1, resolution=RES) == []
    with pytest.raises(SidpipeError, match="does not exist"):
        load_blip_diffusion(str(tmp_path / "missing"))


def test_a_plain_prompt_splits_into_the_target_subject_and_its_context() -> None:
    """The pipeline writes "a {target} {context}": the DreamBooth prompts' property words go with
    the subject, the rest is the context; a prompt without the class cannot be split."""
    assert subject_and_context("a teapot in the jungle", "teapot") == ("teapot", "in the jungle")
    assert subject_and_context("a red teapot", "teapot") == ("red teapot", "")
    assert subject_and_context("a cube shaped teapot", "teapot") == ("cube shaped teapot", "")
    assert subject_and_context("a dog wearing a red hat", "dog") == ("dog", "wearing a red hat")
    assert subject_and_context("an old teapot on a table", "teapot") == ("old teapot", "on a table")
    assert subject_and_context("the teapot at night", "teapot") == ("teapot", "at night")
    assert subject_and_context("two teapots on a shelf", "teapot") == ("two teapots", "on a shelf")
    with pytest.raises(SidpipeError, match="does not name the subject's class 'teapot'"):
        subject_and_context("a cup on the beach", "teapot")


def test_per_prompt_target_subjects_reach_the_pipeline(pipe: Any) -> None:
    spy = Spy(pipe)
    prompts, targets = ["on the beach", "", "in the snow"], ["teapot", "red teapot", "teapot"]
    generate(
        spy,
        _reference(0),
        "teapot",
        prompts,
        [1, 2, 3],
        steps=1,
        resolution=RES,
        batch_size=2,
        targets=targets,
    )
    assert [c["target_subject_category"] for c in spy.calls] == [targets[:2], targets[2:]]
    assert [c["source_subject_category"] for c in spy.calls] == [["teapot"] * 2, ["teapot"]]
    with pytest.raises(SidpipeError, match="3 prompts but 2 target subjects"):
        generate(spy, _reference(0), "teapot", prompts, [1, 2, 3], steps=1, targets=targets[:2])
