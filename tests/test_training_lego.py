"""Lego (concept tokens + subject separation + context loss) on tiny random models (CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_training_methods import make_subject

from sidpipe.io import SidpipeError, read_csv
from sidpipe.models import load_sd_components, load_sd_pipeline
from sidpipe.training import trainer_class
from sidpipe.training.base import Batch
from sidpipe.training.data import LatentSource, read_training_set, tokenize
from sidpipe.training.lego import (
    LegoTrainer,
    concept_tokens,
    context_infonce,
    strip_tokens,
    subject_consistency,
)
from sidpipe.training.loop import train_subject

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
TOKENS = "<sks_1> <sks_2> <sks_3>"
WORDS = {"positive_words": ["red", "glossy"], "negative_words": ["green", "wall"]}


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Tiny models, the demo mug's references (64 px), masks, case-3 descriptions, two class
    images."""
    return make_subject(tmp_path_factory.mktemp("lego_subject"))


def make_trainer(subject: SimpleNamespace, **settings) -> tuple[SimpleNamespace, LegoTrainer, list]:
    torch.manual_seed(0)
    c = load_sd_components(subject.sd, device="cpu")
    trainer = LegoTrainer(c, {"steps": 1, **settings}, "sks", "mug")
    return c, trainer, trainer.prepare()


def fixed_batch(subject: SimpleNamespace, c: SimpleNamespace, trainer: LegoTrainer, prior: bool):
    """Every reference (+ class image) with its mask, fixed latents, noise and timesteps."""
    data = read_training_set(
        subject.refs,
        subject.csv,
        masks_dir=subject.masks,
        class_images_dir=subject.class_dir if prior else None,
    )
    captions = [trainer.caption(d) for d in data.descriptions] + data.class_prompts
    pixels = data.pixels if not prior else torch.cat([data.pixels, data.class_pixels])
    n, n_inst = len(pixels), len(data.pixels)
    generator = torch.Generator().manual_seed(0)
    source = LatentSource(c.vae, pixels, flip=False)
    latents = source.sample(torch.arange(n), torch.zeros(n, dtype=torch.bool), generator)
    masks = torch.cat([data.masks, torch.ones(n - n_inst, *data.masks.shape[1:])])
    batch = Batch(
        latents=latents,
        input_ids=tokenize(c.tokenizer, captions),
        is_prior=torch.arange(n) >= n_inst,
        masks=masks,
    )
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(100, 900, (n,), generator=generator)
    return batch, noise, timesteps


def step_loss(trainer: LegoTrainer, batch: Batch, noise, timesteps):
    hidden = trainer.encode_text(batch.input_ids)
    return trainer.compute_loss(batch, hidden, noise, timesteps, 1.0)


# --- pure functions -------------------------------------------------------------------------


def test_tokens_and_caption(subject: SimpleNamespace) -> None:
    assert concept_tokens("sks", 3) == ["<sks_1>", "<sks_2>", "<sks_3>"]
    assert concept_tokens("<ktn>", 1) == ["<ktn_1>"]
    c = load_sd_components(subject.sd, device="cpu")
    trainer = LegoTrainer(c, {"steps": 1, "num_tokens": 2}, "sks", "cat")
    assert trainer.caption("a [V] cat on grass") == "a <sks_1> <sks_2> cat on grass"
    assert trainer.weight_files == ("sks_1.safetensors", "sks_2.safetensors", "lego.json")
    assert trainer.needs_masks and trainer.trains_text_encoder


def test_strip_tokens_drops_shifts_and_pads() -> None:
    bos, eos = 90, 99
    ids = torch.tensor(
        [
            [bos, 5, 40, 41, 42, 7, 8, eos, eos, eos],  # "a <t1> <t2> <t3> cat on" + pads
            [bos, 5, 7, 40, eos, eos, eos, eos, eos, eos],  # a concept token last
            [bos, 5, 7, eos, eos, eos, eos, eos, eos, eos],  # no concept token: unchanged
        ]
    )
    out = strip_tokens(ids, [40, 41, 42], pad_id=0)
    assert out.tolist() == [
        [bos, 5, 7, 8, eos, eos, eos, 0, 0, 0],
        [bos, 5, 7, eos, eos, eos, eos, eos, eos, 0],
        ids[2].tolist(),
    ]


def test_subject_consistency_is_zero_only_when_the_prompts_agree(
    subject: SimpleNamespace,
) -> None:
    c = load_sd_components(subject.sd, device="cpu")
    torch.manual_seed(1)
    noisy = torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([300, 700])
    hidden = torch.randn(2, 77, c.text_encoder.config.hidden_size, requires_grad=True)
    other = torch.randn(2, 77, c.text_encoder.config.hidden_size)
    masks = (torch.rand(2, 1, 8, 8) > 0.5).float()
    pred = c.unet(noisy, timesteps, hidden).sample
    same = subject_consistency(c.unet, noisy, timesteps, pred, hidden.detach(), masks)
    assert float(same) == 0.0
    differ = subject_consistency(c.unet, noisy, timesteps, pred, other, masks)
    assert float(differ) > 1e-6
    differ.backward()  # the gradient reaches the concept prompt's states, not the reference
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    # Only the subject region counts: an empty mask gives zero.
    assert float(subject_consistency(c.unet, noisy, timesteps, pred, other, 0 * masks)) == 0.0


def test_context_infonce_prefers_the_positive_words() -> None:
    torch.manual_seed(0)
    positives, negatives = torch.randn(2, 16), torch.randn(3, 16)
    at_positive = context_infonce(positives[0], positives, negatives, 0.07)
    at_negative = context_infonce(negatives[0], positives, negatives, 0.07)
    assert float(at_positive) < 0.1 < float(at_negative)
    # Hand-written formula.
    z = torch.randn(16)
    cos = torch.nn.functional.cosine_similarity
    pos = torch.exp(cos(z[None], positives) / 0.5).sum()
    neg = torch.exp(cos(z[None], negatives) / 0.5).sum()
    expected = -torch.log(pos / (pos + neg))
    torch.testing.assert_close(context_infonce(z, positives, negatives, 0.5), expected)


# --- the trainer ----------------------------------------------------------------------------


def test_loss_falls_on_a_fixed_batch(subject: SimpleNamespace) -> None:
    settings = {"learning_rate": 5e-2, "context_classes": ["mug"], **WORDS}
    c, trainer, groups = make_trainer(subject, **settings)
    # No class images: their loss does not depend on the concept tokens, so it cannot fall.
    batch, noise, timesteps = fixed_batch(subject, c, trainer, prior=False)
    optimizer = torch.optim.AdamW(groups)
    losses, concept = [], []
    for _ in range(6):
        loss, parts = step_loss(trainer, batch, noise, timesteps)
        assert set(parts) == {"concept_loss", "subject_loss", "context_loss", "instance_loss"}
        losses.append(float(loss.detach()))
        concept.append(parts["concept_loss"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.after_step()
    with torch.no_grad():
        final = float(step_loss(trainer, batch, noise, timesteps)[0])
    # Strictly falling at every step (k tokens move a tiny random model little).
    falling = [b < a for a, b in zip(losses, [*losses[1:], final], strict=True)]
    assert all(falling) and final < 0.995 * losses[0], (losses, final)
    assert concept[-1] < concept[0]  # the masked reconstruction itself improves


def test_prior_images_keep_the_plain_weighted_loss(subject: SimpleNamespace) -> None:
    c, trainer, _ = make_trainer(subject)
    batch, noise, timesteps = fixed_batch(subject, c, trainer, prior=True)
    hidden = trainer.encode_text(batch.input_ids)
    _, parts = trainer.compute_loss(batch, hidden, noise, timesteps, 1.0)
    loss, halved = trainer.compute_loss(batch, hidden, noise, timesteps, 0.5)
    assert parts["prior_loss"] == halved["prior_loss"] > 0
    expected = halved["instance_loss"] + 0.5 * halved["prior_loss"]
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert halved["instance_loss"] == pytest.approx(
        halved["concept_loss"] + halved["subject_loss"], rel=1e-6
    )


def test_concept_and_subject_terms_by_hand(subject: SimpleNamespace) -> None:
    c, trainer, _ = make_trainer(subject, subject_weight=2.0)
    batch, noise, timesteps = fixed_batch(subject, c, trainer, prior=False)
    loss, parts = step_loss(trainer, batch, noise, timesteps)
    with torch.no_grad():
        noisy = c.noise_scheduler.add_noise(batch.latents, noise, timesteps)
        pred = c.unet(noisy, timesteps, c.text_encoder(batch.input_ids).last_hidden_state).sample
        plain = [d.replace("[V] ", "") for d in subject.descriptions.values()]
        subject_hidden = c.text_encoder(tokenize(c.tokenizer, plain)).last_hidden_state
        reference = c.unet(noisy, timesteps, subject_hidden).sample
    m = batch.masks.expand_as(pred)
    concept = (((pred - noise) ** 2) * (1 - m)).sum() / (1 - m).sum()  # epsilon prediction
    subject_term = (((pred - reference) ** 2) * m).sum() / m.sum()
    assert 0 < (1 - m).mean() < 1  # the masks split each image
    assert parts["concept_loss"] == pytest.approx(float(concept), rel=1e-5)
    assert parts["subject_loss"] == pytest.approx(float(subject_term), rel=1e-4)
    assert float(loss) == pytest.approx(float(concept + 2.0 * subject_term), rel=1e-5)


def test_only_the_concept_rows_train(subject: SimpleNamespace) -> None:
    c, trainer, groups = make_trainer(subject, learning_rate=5e-2, **WORDS)
    assert (
        trainer.trained_parameter_count(groups[0]["params"])
        == 3 * c.text_encoder.config.hidden_size
    )
    modules = {"unet": c.unet, "vae": c.vae, "text_encoder": c.text_encoder}
    before = {
        f"{m}.{k}": p.detach().clone()
        for m, mod in modules.items()
        for k, p in mod.named_parameters()
    }
    embedding = c.text_encoder.get_input_embeddings().weight
    emb_name = next(
        f"text_encoder.{k}" for k, p in c.text_encoder.named_parameters() if p is embedding
    )
    batch, noise, timesteps = fixed_batch(subject, c, trainer, prior=True)
    optimizer = torch.optim.AdamW(groups)
    for step in range(2):
        loss, _ = step_loss(trainer, batch, noise, timesteps)
        loss.backward()
        if step == 0:
            for m, mod in modules.items():
                for k, p in mod.named_parameters():
                    if p is embedding:
                        rows = (p.grad != 0).any(dim=1).nonzero().flatten().tolist()
                        assert rows == sorted(trainer.token_ids)
                    else:
                        assert p.grad is None or not p.grad.any(), f"{m}.{k}"
        optimizer.step()
        optimizer.zero_grad()
        trainer.after_step()
    for m, mod in modules.items():
        for k, p in mod.named_parameters():
            name = f"{m}.{k}"
            if name == emb_name:
                changed = (p != before[name]).any(dim=1).nonzero().flatten().tolist()
                assert changed == sorted(trainer.token_ids)
            else:
                assert torch.equal(p, before[name]), name


def test_context_term_is_skipped_without_words(subject: SimpleNamespace) -> None:
    c, trainer, _ = make_trainer(subject, positive_words=["red"], negative_words=[])
    batch, noise, timesteps = fixed_batch(subject, c, trainer, prior=False)
    loss, parts = step_loss(trainer, batch, noise, timesteps)
    assert "context_loss" not in parts
    assert float(loss) == pytest.approx(parts["concept_loss"] + parts["subject_loss"], rel=1e-6)
    # With words, the weighted term adds to the same reconstruction terms.
    c, trainer, _ = make_trainer(subject, context_weight=0.5, context_classes=["mug"], **WORDS)
    loss, parts = step_loss(trainer, batch, noise, timesteps)
    total = parts["concept_loss"] + parts["subject_loss"] + 0.5 * parts["context_loss"]
    assert parts["context_loss"] > 0 and float(loss) == pytest.approx(total, rel=1e-5)


def test_context_term_grows_when_the_concept_moves_to_a_negative_word(
    subject: SimpleNamespace,
) -> None:
    settings = {"num_tokens": 1, "positive_words": ["red"], "negative_words": ["green"]}
    _, at_red, _ = make_trainer(subject, initializer_words=["red"], **settings)
    _, at_green, _ = make_trainer(subject, initializer_words=["green"], **settings)
    red, green = at_red.context_loss("mug"), at_green.context_loss("mug")
    assert float(red) < float(green)
    # A token initialised from a one-token word encodes exactly like the word: z = p, so the
    # term is log(1 + exp((cos(p, n) - 1) / T)).
    positives, negatives = at_red._word_cache["mug"]
    cos = torch.nn.functional.cosine_similarity(positives, negatives)
    torch.testing.assert_close(red.detach(), torch.log1p(torch.exp((cos[0] - 1) / 0.07)))


def test_subject_term_vanishes_for_a_caption_without_concept_tokens(
    subject: SimpleNamespace,
) -> None:
    c, trainer, _ = make_trainer(subject)
    batch, noise, timesteps = fixed_batch(subject, c, trainer, prior=False)
    _, parts = step_loss(trainer, batch, noise, timesteps)
    assert parts["subject_loss"] > 0
    plain = strip_tokens(batch.input_ids, trainer.token_ids, c.tokenizer.pad_token_id)
    _, parts = step_loss(
        trainer, Batch(batch.latents, plain, batch.is_prior, batch.masks), noise, timesteps
    )
    assert parts["subject_loss"] == 0.0


def test_no_separation_needs_no_masks(subject: SimpleNamespace) -> None:
    c, trainer, _ = make_trainer(subject, subject_separation="none")
    assert not trainer.needs_masks
    batch, noise, timesteps = fixed_batch(subject, c, trainer, prior=False)
    batch.masks = None
    loss, parts = step_loss(trainer, batch, noise, timesteps)
    assert set(parts) == {"concept_loss", "instance_loss"} and float(loss) > 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_tokens": 0}, "num_tokens"),
        ({"initializer_words": ["  "]}, "initializer_words"),
        ({"initializer_words": "red"}, "initializer_words"),
        ({"subject_separation": "subject_token"}, "subject_steps"),  # steps 1: no room
        ({"subject_separation": "subject_token", "steps": 4, "subject_steps": 4}, "subject_steps"),
        ({"subject_separation": "subject_token", "steps": 4, "subject_steps": 0}, "subject_steps"),
        ({"subject_separation": "bbox"}, "subject_separation"),
        ({"context_temperature": 0}, "context_temperature"),
    ],
)
def test_bad_settings(subject: SimpleNamespace, settings: dict, message: str) -> None:
    with pytest.raises(SidpipeError, match=message):
        make_trainer(subject, **settings)


def test_a_token_already_in_the_vocabulary(subject: SimpleNamespace) -> None:
    c = load_sd_components(subject.sd, device="cpu")
    c.tokenizer.add_tokens(["<sks_2>"])
    trainer = LegoTrainer(c, {"steps": 1}, "sks", "mug")
    with pytest.raises(SidpipeError, match="<sks_2>.*already in the tokenizer's vocabulary"):
        trainer.prepare()


def test_checkpoint_state_round_trip(subject: SimpleNamespace) -> None:
    c, trainer, _ = make_trainer(subject)
    state = {"token_embeddings": torch.randn(3, c.text_encoder.config.hidden_size)}
    trainer.load_trainable_state(state)
    assert torch.equal(trainer.trainable_state()["token_embeddings"], state["token_embeddings"])


# --- through the loop -----------------------------------------------------------------------


def _generate(pipe, prompt: str) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        prompt,
        num_inference_steps=2,
        height=SIZE,
        width=SIZE,
        generator=generator,
        output_type="np",
    )
    return out.images[0]


def _train(subject: SimpleNamespace, tmp_path: Path, **kwargs):
    settings = {
        "steps": 3,
        "batch_size": 1,
        "learning_rate": 5e-2,
        "masked": True,
        "prior_preservation": True,
        **WORDS,
    }
    return train_subject(
        "lego",
        {**settings, **kwargs.pop("settings", {})},
        subject.sd,
        subject.refs,
        subject.csv,
        tmp_path / "run",
        tmp_path / "checkpoints",
        identifier="sks",
        class_name="mug",
        class_images_dir=subject.class_dir,
        masks_dir=subject.masks,
        device="cpu",
        **kwargs,
    )


def test_train_subject_round_trip(subject: SimpleNamespace, tmp_path: Path) -> None:
    assert trainer_class("lego") is LegoTrainer
    summary = _train(subject, tmp_path)
    out, weights = tmp_path / "run", tmp_path / "run" / "weights"
    assert summary["finished"] and summary["steps"] == 3
    manifest = json.loads((weights / "lego.json").read_text())
    assert manifest["tokens"] == TOKENS.split()
    assert sorted(p.name for p in weights.iterdir()) == [
        "lego.json",
        "sks_1.safetensors",
        "sks_2.safetensors",
        "sks_3.safetensors",
    ]
    tensors = load_file(weights / "sks_2.safetensors")
    assert list(tensors) == ["<sks_2>"] and tensors["<sks_2>"].dtype == torch.float32
    assert tensors["<sks_2>"].shape[0] == 1
    rows = read_csv(out / "training_log.csv")
    assert len(rows) == 3
    for row in rows:
        for field in (
            "concept_loss",
            "subject_loss",
            "context_loss",
            "instance_loss",
            "prior_loss",
        ):
            assert float(row[field]) >= 0, field
    info = json.loads((out / "train_info.json").read_text())
    assert info["token"] == TOKENS
    assert info["trainable_parameters"] == 3 * tensors["<sks_2>"].shape[1]
    assert info["images"][0]["caption"] == next(iter(subject.descriptions.values())).replace(
        "[V]", TOKENS
    )

    prompt = f"a photo of a {TOKENS} mug"
    base = load_sd_pipeline(subject.sd, "float32", "cpu")
    base.set_progress_bar_config(disable=True)
    before = _generate(base, prompt)
    tuned = LegoTrainer.load_into(base, weights)
    assert all(token in tuned.tokenizer.get_vocab() for token in TOKENS.split())
    ids = tuned.tokenizer(prompt).input_ids
    assert [tuned.tokenizer.convert_ids_to_tokens(i) for i in ids[5:8]] == TOKENS.split()
    after = _generate(tuned, prompt)
    assert np.abs(after - before).max() > 1e-3
    direct = LegoTrainer.load_pipeline(subject.sd, weights, "float32", "cpu")
    direct.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_generate(direct, prompt), after)


def test_resumed_training_equals_uninterrupted(subject: SimpleNamespace, tmp_path: Path) -> None:
    # Context classes are drawn from the `random` module, whose state the loop checkpoints.
    _train(subject, tmp_path / "straight")
    stopped = _train(subject, tmp_path / "resumed", stop_after=1)
    assert not stopped["finished"]
    _train(subject, tmp_path / "resumed")
    a, b = (read_csv(tmp_path / d / "run/training_log.csv") for d in ("straight", "resumed"))
    assert a == b
    for name in ("sks_1", "sks_2", "sks_3"):
        x, y = (
            load_file(tmp_path / d / f"run/weights/{name}.safetensors")
            for d in ("straight", "resumed")
        )
        assert torch.equal(x[f"<{name}>"], y[f"<{name}>"])


def test_loop_asks_for_masks(subject: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(SidpipeError, match="needs the subject masks; set masked: true"):
        _train(subject, tmp_path, settings={"masked": False})


# --- subject_separation: subject_token (a subject token first, then the concept) -------------

SUB = {"subject_separation": "subject_token", "steps": 4, "subject_steps": 2}


def _grad_rows(trainer: LegoTrainer, batch: Batch, noise, timesteps) -> list[int]:
    loss, parts = step_loss(trainer, batch, noise, timesteps)
    loss.backward()
    grad = trainer._embeddings.weight.grad
    rows = (grad != 0).any(dim=1).nonzero().flatten().tolist()
    trainer._embeddings.weight.grad = None
    return rows


def test_subject_token_learns_the_subject_first_then_the_concept(
    subject: SimpleNamespace,
) -> None:
    c, trainer, groups = make_trainer(subject, learning_rate=5e-2, **SUB, **WORDS)
    assert trainer.caption("a [V] mug") == "a <sks_sub> <sks_1> <sks_2> <sks_3> mug"
    assert trainer.weight_files[0] == "sks_sub.safetensors" and trainer.needs_masks
    weight = trainer._embeddings.weight
    sub, concept = trainer.subject_id, trainer.token_ids
    torch.testing.assert_close(
        weight[sub], weight[c.tokenizer("mug", add_special_tokens=False).input_ids].mean(0)
    )
    batch, noise, timesteps = fixed_batch(subject, c, trainer, prior=True)
    optimizer = torch.optim.AdamW(groups)
    start = weight.detach().clone()

    # Phase 1: only the subject row, the subject-region MSE under the caption without concept
    # tokens (by hand), no context term.
    loss, parts = step_loss(trainer, batch, noise, timesteps)
    assert set(parts) == {"subject_loss", "instance_loss", "prior_loss"}
    plain = strip_tokens(batch.input_ids, concept, c.tokenizer.pad_token_id)
    with torch.no_grad():
        noisy = c.noise_scheduler.add_noise(batch.latents, noise, timesteps)
        pred = c.unet(noisy, timesteps, trainer.encode_text(plain)).sample
        error = (pred - noise) ** 2
        inst = ~batch.is_prior
        m = batch.masks[inst].expand_as(error[inst])
        by_hand = (error[inst] * m).sum() / m.sum() + error[batch.is_prior].mean()
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)
    assert _grad_rows(trainer, batch, noise, timesteps) == [sub]
    for _ in range(2):
        step_loss(trainer, batch, noise, timesteps)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.after_step()
    moved = (weight != start).any(dim=1).nonzero().flatten().tolist()
    assert moved == [sub] and not trainer.in_subject_phase
    learned = weight[sub].detach().clone()

    # Phase 2: only the concept rows; the learned subject row stays although AdamW still has
    # its moments; the full caption and the context term.
    loss, parts = step_loss(trainer, batch, noise, timesteps)
    assert {"concept_loss", "context_loss"} <= set(parts) and "subject_loss" not in parts
    assert _grad_rows(trainer, batch, noise, timesteps) == sorted(concept)
    for _ in range(2):
        step_loss(trainer, batch, noise, timesteps)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.after_step()
    assert torch.equal(weight[sub], learned)
    moved = (weight != start).any(dim=1).nonzero().flatten().tolist()
    assert moved == sorted([sub, *concept])


def test_subject_token_through_the_loop_resumes_in_either_phase(
    subject: SimpleNamespace, tmp_path: Path
) -> None:
    settings = {"settings": {**SUB}}
    summary = _train(subject, tmp_path / "straight", **settings)
    weights = tmp_path / "straight/run/weights"
    assert summary["finished"]
    manifest = json.loads((weights / "lego.json").read_text())
    assert manifest["tokens"] == ["<sks_sub>", *TOKENS.split()]
    assert manifest["subject_token"] == "<sks_sub>"
    rows = read_csv(tmp_path / "straight/run/training_log.csv")
    assert [bool(r["concept_loss"]) for r in rows] == [False, False, True, True]
    info = json.loads((tmp_path / "straight/run/train_info.json").read_text())
    # sampled with the concept tokens alone: "a <sks_sub> ..." would carry the carrier along
    assert info["token"] == TOKENS
    for stop in (1, 3):
        folder = tmp_path / f"resumed{stop}"
        assert not _train(subject, folder, stop_after=stop, **settings)["finished"]
        _train(subject, folder, **settings)
        assert read_csv(folder / "run/training_log.csv") == rows
        for name in ("sks_sub", "sks_1", "sks_3"):
            x, y = (
                load_file(d / f"run/weights/{name}.safetensors")
                for d in (tmp_path / "straight", folder)
            )
            assert torch.equal(x[f"<{name}>"], y[f"<{name}>"])
    base = load_sd_pipeline(subject.sd, "float32", "cpu")
    tuned = LegoTrainer.load_into(base, weights)
    assert "<sks_sub>" in tuned.tokenizer.get_vocab()
