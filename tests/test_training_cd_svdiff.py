"""Custom Diffusion and SVDiff trainers on the tiny random models, with a minimal own loop."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file
from torch.nn.utils import parametrize

from sidpipe.models import load_sd_components, load_sd_pipeline
from sidpipe.tiny_models import build_tiny_models
from sidpipe.training import trainer_class
from sidpipe.training.base import Batch, Trainer, diffusion_loss
from sidpipe.training.custom_diffusion import (
    MODIFIER_TOKEN,
    TOKEN_WEIGHT_NAME,
    WEIGHT_NAME,
    CustomDiffusionTrainer,
    effective_learning_rate,
)
from sidpipe.training.svdiff import (
    TEXT_ENCODER_WEIGHTS,
    UNET_WEIGHTS,
    SVDiffTrainer,
    shifted_weight,
)

CORPUS = [
    "a sks mug on a table",
    "a photo of a mug",
    "a red mug on a wooden table",
    "ktn",
    "<new1>",
]
DESCRIPTION = "a [V] mug on a table"
STEPS = 6
# Test-sized learning rates: a few steps on a fixed batch must move the loss.
CD_SETTINGS = {"learning_rate": 2.5e-3, "batch_size": 2, "prior_preservation": True, "flip": True}
SVDIFF_SETTINGS = {
    "learning_rate": 5e-2,
    "learning_rate_1d": 1e-3,
    "batch_size": 1,
    "train_text_encoder": True,
    "prior_preservation": True,
    "prior_loss_weight": 1.0,
}


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_models(tmp_path_factory.mktemp("models") / "tiny", CORPUS)["sd"]


def make_trainer(cls: type[Trainer], sd: str, settings: dict) -> Trainer:
    return cls(load_sd_components(sd, device="cpu"), dict(settings), "sks", "mug")


def fixed_inputs(trainer: Trainer) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """One instance and one class image (8x8 latents of the 64 px model), fixed noise."""
    gen = torch.Generator().manual_seed(0)
    captions = [trainer.caption(DESCRIPTION), "a mug on a table"]
    ids = trainer.c.tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    batch = Batch(
        latents=torch.randn(2, 4, 8, 8, generator=gen),
        input_ids=ids,
        is_prior=torch.tensor([False, True]),
    )
    return batch, torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([100, 600])


def loss_of(trainer: Trainer, inputs: tuple[Batch, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    batch, noise, timesteps = inputs
    hidden = trainer.c.text_encoder(batch.input_ids)[0]
    loss, _ = diffusion_loss(
        trainer.c.unet, trainer.c.noise_scheduler, batch, hidden, noise, timesteps
    )
    return loss


def train(trainer: Trainer, groups: list[dict], steps: int = STEPS) -> list[float]:
    """AdamW over `prepare()`'s groups; returns the loss before every step and at the end."""
    inputs = fixed_inputs(trainer)  # after prepare: CD's caption needs the new token
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)
    losses = []
    for _ in range(steps):
        loss = loss_of(trainer, inputs)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trainer.after_step()
    with torch.no_grad():
        losses.append(float(loss_of(trainer, inputs)))
    return losses


def snapshot(*models: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]


def sample(pipe: StableDiffusionPipeline, prompt: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return out.images


def pipeline_of(components: SimpleNamespace, sd: str) -> StableDiffusionPipeline:
    """The trained modules themselves as a pipeline (same sampler as load_sd_pipeline)."""
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=DDIMScheduler.from_pretrained(sd, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ---------------------------------------------------------------- Custom Diffusion


def test_registry_and_effective_learning_rate() -> None:
    assert trainer_class("custom_diffusion") is CustomDiffusionTrainer
    assert trainer_class("svdiff") is SVDiffTrainer
    base = {"learning_rate": 1e-5, "batch_size": 2}
    assert effective_learning_rate({**base, "prior_preservation": True}) == pytest.approx(4e-5)
    assert effective_learning_rate(base) == pytest.approx(2e-5)
    assert effective_learning_rate({**base, "batch_size": 3}) == pytest.approx(3e-5)
    assert effective_learning_rate({**base, "scale_lr": False}) == pytest.approx(1e-5)


@pytest.fixture(scope="module")
def cd_trained(sd: str) -> tuple[CustomDiffusionTrainer, list[float], list, int]:
    trainer = make_trainer(CustomDiffusionTrainer, sd, CD_SETTINGS)
    before = snapshot(trainer.c.unet, trainer.c.text_encoder, trainer.c.vae)
    vocab = len(trainer.c.tokenizer)
    groups = trainer.prepare()
    assert [g["lr"] for g in groups] == [pytest.approx(1e-2)] * 2  # 2.5e-3 x 2 images x 2 (prior)
    return trainer, train(trainer, groups), before, vocab


def test_cd_caption_and_token(cd_trained: tuple) -> None:
    trainer, _, _, vocab = cd_trained
    assert trainer.caption(DESCRIPTION) == "a <new1> mug on a table"
    assert trainer.trains_text_encoder
    assert trainer.token_id == vocab  # appended
    ids = trainer.c.tokenizer(trainer.caption(DESCRIPTION), add_special_tokens=False).input_ids
    assert ids.count(trainer.token_id) == 1


def test_cd_loss_falls_and_only_kv_and_token_row_change(cd_trained: tuple) -> None:
    trainer, losses, (unet0, te0, vae0), vocab = cd_trained
    assert losses[-1] < losses[0], losses
    c = trainer.c
    unet1 = c.unet.state_dict()
    new_keys = set(unet1) - set(unet0)
    assert new_keys and all(".attn2.processor.to_" in k for k in new_keys), sorted(new_keys)
    assert {k.rsplit(".", 2)[-2] for k in new_keys} == {
        "to_k_custom_diffusion",
        "to_v_custom_diffusion",
    }
    for key in new_keys:  # initialised from to_k / to_v, then trained
        original = unet0[key.replace(".processor.", ".").replace("_custom_diffusion", "")]
        assert not torch.equal(unet1[key], original), key
    for key, value in unet0.items():  # every base UNet weight, attn2's to_k / to_v included
        assert torch.equal(unet1[key], value), key
    for key, value in vae0.items():
        assert torch.equal(c.vae.state_dict()[key], value), key

    trainable = [n for n, p in c.unet.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(new_keys)
    assert not any(p.requires_grad for p in c.vae.parameters())
    te1 = c.text_encoder.state_dict()
    embedding = c.text_encoder.get_input_embeddings().weight
    emb_key = next(k for k, p in c.text_encoder.named_parameters() if p is embedding)
    for key, value in te0.items():
        if key != emb_key:
            assert torch.equal(te1[key], value), key
    emb0, emb1 = te0[emb_key], te1[emb_key]
    assert emb1.shape[0] == vocab + 1
    assert torch.equal(emb1[:vocab], emb0)  # every old row restored after each step
    ktn = trainer.c.tokenizer.encode("ktn", add_special_tokens=False)
    assert len(ktn) == 1 and not torch.equal(emb1[vocab], emb0[ktn[0]])  # init "ktn", trained


def test_cd_trainable_state_round_trip(cd_trained: tuple, sd: str) -> None:
    trainer, *_ = cd_trained
    state = trainer.trainable_state()
    n_kv = sum(v.numel() for k, v in state.items() if k.startswith("unet."))
    assert n_kv == 2 * (32 * 32 + 64 * 32 + 32 * 32 + 32 * 32)  # 4 attn2 layers, K and V
    fresh = make_trainer(CustomDiffusionTrainer, sd, CD_SETTINGS)
    fresh.prepare()
    inputs = fixed_inputs(fresh)
    assert not torch.allclose(loss_of(fresh, inputs), loss_of(trainer, inputs))
    fresh.load_trainable_state(state)
    for key, value in fresh.trainable_state().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loss_of(fresh, inputs), loss_of(trainer, inputs))
    with pytest.raises(KeyError):
        fresh.load_trainable_state({k: v for k, v in state.items() if k.startswith("unet.")})
    loss_of(fresh, inputs).backward()  # only the new row gets a gradient (before clipping)
    grad = fresh.c.text_encoder.get_input_embeddings().weight.grad
    assert grad[fresh.token_id].abs().sum() > 0
    assert not grad[: fresh.token_id].any() and not grad[fresh.token_id + 1 :].any()


def test_cd_save_and_load_into(cd_trained: tuple, sd: str, tmp_path: Path) -> None:
    trainer, *_ = cd_trained
    trainer.save(tmp_path)
    assert all((tmp_path / name).is_file() for name in trainer.weight_files)
    # Same tensors as diffusers' own writer.
    trainer.c.unet.save_attn_procs(tmp_path / "diffusers", safe_serialization=True)
    ours, theirs = (
        load_file(tmp_path / WEIGHT_NAME),
        load_file(tmp_path / "diffusers" / WEIGHT_NAME),
    )
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert list(load_file(tmp_path / TOKEN_WEIGHT_NAME)) == [MODIFIER_TOKEN]

    prompt = trainer.caption(DESCRIPTION)
    base = sample(load_sd_pipeline(sd, device="cpu"), prompt)
    pipe = CustomDiffusionTrainer.load_into(load_sd_pipeline(sd, device="cpu"), tmp_path)
    loaded = sample(pipe, prompt)
    assert np.abs(loaded - base).max() > 1e-3
    with torch.no_grad():
        trained = sample(pipeline_of(trainer.c, sd), prompt)
    np.testing.assert_allclose(loaded, trained, atol=1e-5)


# ---------------------------------------------------------------- SVDiff


def test_shifted_weight_is_the_svdiff_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 3, 3, 3, generator=gen)
    torch.testing.assert_close(shifted_weight(weight, torch.zeros(6)), weight)
    delta = torch.randn(6, generator=gen)
    u, s, vh = torch.linalg.svd(weight.reshape(6, -1), full_matrices=False)
    expected = (u @ torch.diag(torch.relu(s + delta)) @ vh).reshape(weight.shape)
    torch.testing.assert_close(shifted_weight(weight, delta), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def svdiff_trained(sd: str) -> SimpleNamespace:
    """One SVDiff run; also records the model just before and just after `prepare()`."""
    trainer = make_trainer(SVDiffTrainer, sd, SVDIFF_SETTINGS)
    inputs = fixed_inputs(trainer)
    models = (trainer.c.unet, trainer.c.text_encoder, trainer.c.vae)
    run = SimpleNamespace(trainer=trainer, before=snapshot(*models))
    with torch.no_grad():
        run.loss_before = loss_of(trainer, inputs)
    run.groups = trainer.prepare()
    run.weights_prepared = {
        name: module.weight.detach().clone()
        for model in models
        for name, module in model.named_modules()
        if parametrize.is_parametrized(module, "weight")
    }
    with torch.no_grad():
        run.loss_prepared = loss_of(trainer, inputs)
    run.losses = train(trainer, run.groups)
    return run


def test_svdiff_prepare_keeps_the_base_model(svdiff_trained: SimpleNamespace) -> None:
    run = svdiff_trained
    assert [g["name"] for g in run.groups] == ["spectral_shifts", "spectral_shifts_1d"]
    assert [g["lr"] for g in run.groups] == [5e-2, 1e-3]
    unet0, te0, _ = run.before
    assert len(run.weights_prepared) == len(run.trainer.trainable_state())
    for name, weight in run.weights_prepared.items():  # delta = 0: bit-identical weights
        assert torch.equal(weight, {**unet0, **te0}[f"{name}.weight"]), name
    torch.testing.assert_close(run.loss_prepared, run.loss_before, rtol=0, atol=0)
    frozen_te = {**SVDIFF_SETTINGS, "train_text_encoder": False}
    assert not SVDiffTrainer(run.trainer.c, frozen_te, "sks", "mug").trains_text_encoder


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's own weights, parametrized ones under their original names."""
    state = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." in key:
            if not key.endswith(".original"):
                continue  # the shifts
            key = key.replace(".parametrizations.weight.original", ".weight")
        state[key] = value
    return state


def test_svdiff_loss_falls_and_only_shifts_change(svdiff_trained: SimpleNamespace) -> None:
    trainer, losses, (unet0, te0, vae0) = (
        svdiff_trained.trainer,
        svdiff_trained.losses,
        svdiff_trained.before,
    )
    assert losses[-1] < losses[0], losses
    c = trainer.c
    for model, before in ((c.unet, unet0), (c.text_encoder, te0), (c.vae, vae0)):
        after = _base_state(model)
        assert after.keys() == before.keys()
        for key, value in before.items():
            assert torch.equal(after[key], value), key
    assert parametrize.is_parametrized(c.unet.conv_in, "weight")
    assert parametrize.is_parametrized(c.text_encoder.get_input_embeddings())
    assert not any(parametrize.is_parametrized(m) for m in c.vae.modules())
    state = trainer.trainable_state()
    assert all(k.endswith(".delta") for k in state)
    moved = [k for k, v in state.items() if v.abs().max() > 0]
    assert any(k.startswith("unet.") for k in moved) and any(
        k.startswith("text_encoder.") for k in moved
    )
    for model in (c.unet, c.text_encoder, c.vae):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(n.endswith(".weight.0.delta") for n in trainable), trainable


def test_svdiff_trainable_state_round_trip(svdiff_trained: SimpleNamespace) -> None:
    trainer = svdiff_trained.trainer
    state = trainer.trainable_state()
    inputs = fixed_inputs(trainer)
    with torch.no_grad():
        trained_loss = loss_of(trainer, inputs)
        trainer.load_trainable_state({k: torch.zeros_like(v) for k, v in state.items()})
        torch.testing.assert_close(loss_of(trainer, inputs), svdiff_trained.loss_before)
        trainer.load_trainable_state(state)  # as resuming from a checkpoint
        torch.testing.assert_close(loss_of(trainer, inputs), trained_loss)
    for key, value in trainer.trainable_state().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(KeyError):
        trainer.load_trainable_state({})


def test_svdiff_save_and_load_into(
    svdiff_trained: SimpleNamespace, sd: str, tmp_path: Path
) -> None:
    trainer = svdiff_trained.trainer
    trainer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [UNET_WEIGHTS, TEXT_ENCODER_WEIGHTS]
    saved = load_file(tmp_path / UNET_WEIGHTS)
    assert "conv_in.delta" in saved and saved.keys() == {
        k.removeprefix("unet.") for k in trainer.trainable_state() if k.startswith("unet.")
    }

    prompt = trainer.caption(DESCRIPTION)
    base = sample(load_sd_pipeline(sd, device="cpu"), prompt)
    pipe = SVDiffTrainer.load_into(load_sd_pipeline(sd, device="cpu"), tmp_path)
    assert not any(parametrize.is_parametrized(m) for m in pipe.unet.modules())
    for name, module in trainer.c.unet.named_modules():  # the parametrized weights, written out
        if parametrize.is_parametrized(module, "weight"):
            torch.testing.assert_close(
                pipe.unet.get_submodule(name).weight, module.weight.detach(), atol=1e-5, rtol=1e-5
            )
    loaded = sample(pipe, prompt)
    assert np.abs(loaded - base).max() > 1e-3
    with torch.no_grad():
        trained = sample(pipeline_of(trainer.c, sd), prompt)
    np.testing.assert_allclose(loaded, trained, atol=1e-4)


def test_svdiff_norm_shifts_default_to_the_references_rate(sd: str) -> None:
    """svdiff-pytorch's --learning_rate_1d is 1e-6; without the setting the norms' shifts must
    not take the 2-D shifts' rate (1e-3 here: a thousand times the reference's)."""
    components = load_sd_components(sd, device="cpu")
    trainer = SVDiffTrainer(components, {"learning_rate": 1e-3}, "sks", "mug")
    rates = {group["name"]: group["lr"] for group in trainer.prepare()}
    assert rates == {"spectral_shifts": 1e-3, "spectral_shifts_1d": 1e-6}
