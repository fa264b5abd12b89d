"""The arms without training as the sample stage runs them: the encoders (BLIP-Diffusion, ELITE)
on one reference (the subset's first), and the base model on the prompts without [V]; the same
prompts and seeds as the trained arms, sample_arm's manifest."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sidpipe.encoders.sampling import sample_encoder_arm
from sidpipe.encoders.tiny import build_tiny_blip_diffusion, build_tiny_elite
from sidpipe.io import SidpipeError, read_csv
from sidpipe.masks import segment_references
from sidpipe.references import prepare_references
from sidpipe.sampling import MANIFEST_FIELDS, sample_arm
from sidpipe.tiny_models import build_tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")

MUG = Path(__file__).resolve().parent / "data/tiny_demo/subjects/red_mug"
TEMPLATES = ["a {token} {class}", "a {token} {class} on the beach"]
SIZE = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("encoders")
    sd = build_tiny_models(root / "tiny", ["a photo of a mug on the beach", "a s mug"])["sd"]
    refs, masks = root / "refs", root / "masks"
    prepare_references(MUG, refs, "red_mug", SIZE)
    segment_references(refs, masks, "red_mug", "mug", backend="provided")
    return SimpleNamespace(
        sd=sd,
        refs=refs,
        masks=masks,
        blip={"model": build_tiny_blip_diffusion(root / "blip")},
        elite={
            "base_model": sd,
            **{k: v for k, v in build_tiny_elite(root / "elite", sd).items() if k != "sd"},
        },
    )


def run(world: SimpleNamespace, algorithm: str, out: Path, **kwargs) -> list[dict]:
    settings = world.blip if algorithm == "blip_diffusion" else world.elite
    args = dict(templates=TEMPLATES, class_name="mug", seeds=[0, 1], references_dir=world.refs)
    args |= dict(masks_dir=world.masks, steps=2, resolution=SIZE, dtype="float32", device="cpu")
    return sample_encoder_arm(algorithm, settings, out, **(args | kwargs))


def pixels(folder: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(folder / row["path"]), dtype=np.int16)


@pytest.mark.parametrize("algorithm", ["blip_diffusion", "elite"])
def test_an_encoder_arm_samples_the_grid_from_one_reference(world, tmp_path, algorithm) -> None:
    rows = run(world, algorithm, tmp_path / "a")
    on_disk = read_csv(tmp_path / "a/manifest.csv")
    assert list(on_disk[0]) == MANIFEST_FIELDS and len(on_disk) == len(rows) == 4
    assert [(r["prompt_id"], r["seed"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["prompt_plain"] for r in rows[::2]] == ["a mug", "a mug on the beach"]
    # what the model saw: BLIP-Diffusion the plain prompt ("a {target} {context}"), ELITE
    # its word S for the subject
    seen = [r["prompt"] for r in rows[::2]]
    if algorithm == "elite":
        assert seen == ["a S", "a S on the beach"]
    else:
        assert seen == ["a mug", "a mug on the beach"]
    images = [pixels(tmp_path / "a", r) for r in rows]
    assert all(image.shape == (SIZE, SIZE, 3) for image in images)
    assert np.abs(images[0] - images[1]).max() > 0  # seeds differ
    # reproducible per (prompt, seed), and the reference reaches the images
    again = run(world, algorithm, tmp_path / "b")
    assert all(
        np.array_equal(pixels(tmp_path / "a", r), pixels(tmp_path / "b", s))
        for r, s in zip(rows, again, strict=True)
    )
    other = run(world, algorithm, tmp_path / "c", reference_subset="02")
    assert np.abs(images[0] - pixels(tmp_path / "c", other[0])).max() > 0


def test_blip_diffusion_gets_its_target_subject_and_context_apart(
    world, tmp_path, monkeypatch
) -> None:
    """BLIP-Diffusion writes "a {target} {context}" itself: the arm hands it "red mug" and
    "on the beach" apart, not the plain prompt, which would read "a mug a mug on the beach"."""
    import sidpipe.encoders.blip_diffusion as blip

    calls, real = [], blip.generate

    def spy(pipe, reference, class_name, prompts, seeds, *args, **kwargs):
        calls.append(list(zip(prompts, kwargs["targets"], strict=True)))
        return real(pipe, reference, class_name, prompts, seeds, *args, **kwargs)

    monkeypatch.setattr(blip, "generate", spy)
    templates = ["a {token} {class} on the beach", "a red {token} {class}"]
    rows = run(world, "blip_diffusion", tmp_path / "a", templates=templates)
    assert [pair for call in calls for pair in call] == [
        ("on the beach", "mug"),
        ("on the beach", "mug"),
        ("", "red mug"),
        ("", "red mug"),
    ]
    assert [r["prompt"] for r in rows[::2]] == ["a mug on the beach", "a red mug"]


def test_an_unknown_algorithm_or_reference_is_refused(world, tmp_path) -> None:
    with pytest.raises(SidpipeError, match="not an algorithm without training"):
        sample_encoder_arm("dreambooth", {}, tmp_path, TEMPLATES, "mug", [0], world.refs)
    with pytest.raises(SidpipeError, match="'09' is not one of its images"):
        run(world, "blip_diffusion", tmp_path / "x", reference_subset="09")


def test_the_base_model_arm_samples_the_plain_prompts_with_the_trained_arms_seeds(
    world, tmp_path
) -> None:
    """No reference, no identifier: the base model gets each prompt's plain form and the seeds
    of the trained arms, so its images are what sample_arm makes of those prompts untrained."""
    args = dict(templates=TEMPLATES, class_name="mug", seeds=[0, 1], steps=2, resolution=SIZE)
    args |= dict(dtype="float32", device="cpu")
    rows = sample_encoder_arm("base_model", {"model": world.sd}, tmp_path / "base", **args)
    assert [(r["prompt_id"], r["seed"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["prompt"] for r in rows[::2]] == ["a mug", "a mug on the beach"]
    assert all(r["prompt"] == r["prompt_plain"] for r in rows)
    plain = [
        {"prompt_id": i, "prompt": p, "prompt_plain": p}
        for i, p in enumerate(["a mug", "a mug on the beach"])
    ]
    direct = sample_arm(
        world.sd,
        tmp_path / "direct",
        plain,
        [0, 1],
        None,
        None,
        "",
        steps=2,
        resolution=SIZE,
        dtype="float32",
        device="cpu",
    )
    assert all(
        np.array_equal(pixels(tmp_path / "base", r), pixels(tmp_path / "direct", s))
        for r, s in zip(rows, direct, strict=True)
    )
    assert np.abs(pixels(tmp_path / "base", rows[0]) - pixels(tmp_path / "base", rows[2])).max() > 0
    # a concept subject's prompts carry the concept's words
    concept = sample_encoder_arm(
        "base_model",
        {"model": world.sd},
        tmp_path / "concept",
        **(args | {"seeds": [0]}),
        concept="upside down",
    )
    assert [r["prompt"] for r in concept] == [
        "an upside down mug",
        "an upside down mug on the beach",
    ]
