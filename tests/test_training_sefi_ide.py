"""SeFi-IDE on tiny random models (CPU): per-stage K/V tokens, the attention loss, the loader."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_training_methods import make_subject

from sidpipe.attention import attention_maps
from sidpipe.io import SidpipeError, read_csv
from sidpipe.models import load_sd_components, load_sd_pipeline
from sidpipe.training.base import Batch, diffusion_loss
from sidpipe.training.loop import train_subject
from sidpipe.training.sefi_ide import (
    WEIGHT_NAME,
    SeFiIdeTrainer,
    attention_alignment_loss,
    normalised_map,
    stage_of,
    variant_tokens,
)

SIZE = 64


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory):
    return make_subject(tmp_path_factory.mktemp("sefi"))


def make_trainer(sd: str, **settings) -> SeFiIdeTrainer:
    torch.manual_seed(0)
    trainer = SeFiIdeTrainer(
        load_sd_components(sd, device="cpu"),
        {"steps": 1, "learning_rate": 5e-2, **settings},
        "sks",
        "mug",
    )
    trainer.groups = trainer.prepare()
    return trainer


def fixed_batch(
    trainer: SeFiIdeTrainer, masks: bool = False
) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = trainer.c.tokenizer(
        [trainer.caption("a [V] mug on a table"), trainer.caption("a photo of [V] mug")],
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1.0
    batch = Batch(
        latents=torch.randn(2, 4, 8, 8, generator=gen),
        input_ids=ids,
        is_prior=torch.tensor([False, False]),
        masks=mask if masks else None,
    )
    return batch, torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([150, 850])


def train(subject, out: Path, checkpoints: Path, settings: dict, **kwargs) -> dict:
    """train_subject: sefi_ide on the module's subject."""
    return train_subject(
        "sefi_ide",
        settings,
        subject.sd,
        subject.refs,
        subject.csv,
        out,
        checkpoints,
        identifier="sks",
        class_name="mug",
        device="cpu",
        **kwargs,
    )


def step_loss(trainer: SeFiIdeTrainer, inputs) -> tuple[torch.Tensor, dict]:
    batch, noise, timesteps = inputs
    return trainer.compute_loss(batch, trainer.encode_text(batch.input_ids), noise, timesteps, 1.0)


def test_stages_split_the_schedule_evenly() -> None:
    t = torch.tensor([0, 199, 200, 599, 600, 999])
    assert stage_of(t, 5, 1000).tolist() == [0, 0, 1, 2, 3, 4]
    assert stage_of(t, 1, 1000).tolist() == [0] * 6
    assert variant_tokens("<sks>", 2) == ["<sks_k0>", "<sks_v0>", "<sks_k1>", "<sks_v1>"]


def test_processor_feeds_the_stages_k_to_to_k_and_v_to_to_v(subject) -> None:
    trainer = make_trainer(subject.sd, stages=4)
    c = trainer.c
    weight = c.text_encoder.get_input_embeddings().weight
    with torch.no_grad():  # every K/V row distinct
        weight[trainer.variant_ids] = torch.randn(len(trainer.variant_ids), weight.shape[1])
    batch, noise, _ = fixed_batch(trainer)
    timesteps = torch.tensor([900, 300])  # stages 3 and 1
    seen: dict[str, torch.Tensor] = {}
    layer = next(m for n, m in c.unet.named_modules() if n.endswith("attn2"))
    hooks = [
        getattr(layer, name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, args[0].detach())
        )
        for name in ("to_k", "to_v")
    ]
    with torch.no_grad():
        c.unet(batch.latents, timesteps, trainer.encode_text(batch.input_ids))
    for hook in hooks:
        hook.remove()

    def encoded_with(row: int, sample: int) -> torch.Tensor:
        ids = batch.input_ids[sample : sample + 1].clone()
        ids[ids == trainer.placeholder_id] = trainer.variant_ids[row]
        with torch.no_grad():
            return c.text_encoder(ids).last_hidden_state[0]

    for sample, stage in enumerate([3, 1]):
        torch.testing.assert_close(seen["to_k"][sample], encoded_with(2 * stage, sample))
        torch.testing.assert_close(seen["to_v"][sample], encoded_with(2 * stage + 1, sample))
        # and not another stage's, nor K for V
        assert not torch.allclose(seen["to_k"][sample], encoded_with(2 * stage + 1, sample))
        assert not torch.allclose(seen["to_k"][sample], encoded_with(2 * ((stage + 1) % 4), sample))


def test_attention_loss_is_the_hand_computation() -> None:
    layers = [torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([[0.3, 0.2, 0.1, 0.0]])]
    identifier = normalised_map(layers)  # mean 0.2 everywhere -> 1 everywhere
    torch.testing.assert_close(identifier, torch.ones(1, 4))
    target = normalised_map([torch.tensor([[0.0, 0.25, 0.5, 0.25]])])  # [0, .5, 1, .5]
    loss = attention_alignment_loss(identifier, target)
    assert float(loss) == pytest.approx((1.0 + 0.25 + 0.0 + 0.25) / 4)


def test_attention_weight_zero_is_the_plain_loss(subject) -> None:
    plain = make_trainer(subject.sd, attention_weight=0.0)
    inputs = fixed_batch(plain)
    batch, noise, timesteps = inputs
    hidden = plain.encode_text(batch.input_ids)
    expected, _ = diffusion_loss(
        plain.c.unet, plain.c.noise_scheduler, batch, hidden, noise, timesteps
    )
    loss, parts = step_loss(plain, inputs)
    assert float(loss.detach()) == float(expected.detach()) and "attention_loss" not in parts

    weighted = make_trainer(subject.sd, attention_weight=0.5)
    loss_w, parts_w = step_loss(weighted, fixed_batch(weighted))
    assert parts_w["attention_loss"] > 0
    assert float(loss_w) == pytest.approx(
        float(expected) + 0.5 * parts_w["attention_loss"], rel=1e-5
    )


@pytest.mark.parametrize("target", ["class_word", "mask"])
def test_the_mask_target_fits_the_whole_image(subject, target: str) -> None:
    """The masks are the face-wise attention term's target; the reconstruction stays the whole
    image's. With class_word, `masked: true` keeps the loop's masked reconstruction."""
    trainer = make_trainer(subject.sd, attention_weight=0.5, attention_target=target)
    batch, noise, timesteps = fixed_batch(trainer, masks=True)
    hidden = trainer.encode_text(batch.input_ids)
    args = (trainer.c.unet, trainer.c.noise_scheduler)
    whole, _ = diffusion_loss(*args, replace(batch, masks=None), hidden, noise, timesteps)
    masked, _ = diffusion_loss(*args, batch, hidden, noise, timesteps)
    _, parts = step_loss(trainer, (batch, noise, timesteps))
    expected = whole if target == "mask" else masked
    assert parts["instance_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert abs(float(whole) - float(masked)) > 1e-3  # the two readings differ on this batch


def test_gradient_checkpointing_trains_the_same(subject, tmp_path: Path) -> None:
    """The attention term's recorded pass under checkpointing (its recompute in backward once
    took the other attention branch and failed)."""
    weights = []
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        settings = {"steps": 2, "learning_rate": 1e-2, "attention_weight": 0.5}
        train(subject, out / "run", out / "ckpt", settings, gradient_checkpointing=checkpointing)
        weights.append(load_file(out / "run" / "weights" / "sefi_ide.safetensors"))
        assert float(read_csv(out / "run" / "training_log.csv")[-1]["attention_loss"]) > 0
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_with_class_images_gives_the_same_gradient(subject) -> None:
    """With prior preservation the attention pass covers the instance rows only; the main
    pass's recompute in backward must still read the whole batch's stages."""
    grads = []
    for checkpointing in (False, True):
        trainer = make_trainer(subject.sd, attention_weight=0.5)
        if checkpointing:
            trainer.c.unet.enable_gradient_checkpointing()
        trainer.c.unet.train()
        batch, noise, timesteps = fixed_batch(trainer)
        batch = replace(batch, is_prior=torch.tensor([False, True]))
        loss, _ = step_loss(trainer, (batch, noise, timesteps))
        loss.backward()
        grads.append(trainer.c.text_encoder.get_input_embeddings().weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("target", ["class_word", "mask"])
def test_loss_falls_and_only_the_stage_rows_train(subject, target: str) -> None:
    trainer = make_trainer(subject.sd, attention_weight=0.5, attention_target=target)
    inputs = fixed_batch(trainer, masks=target == "mask")
    embeddings = trainer.c.text_encoder.get_input_embeddings().weight
    before = embeddings.detach().clone()
    unet_before = [p.detach().clone() for p in trainer.c.unet.parameters()]
    optimizer = torch.optim.AdamW(trainer.groups)
    losses, attention = [], []
    for _ in range(6):
        loss, parts = step_loss(trainer, inputs)
        losses.append(float(loss))
        attention.append(parts["attention_loss"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.after_step()
    final, _ = step_loss(trainer, inputs)
    # Strictly falling (tokens move a tiny random model least), the attention term with it.
    falling = [b < a for a, b in zip(losses, [*losses[1:], float(final)], strict=True)]
    assert all(falling) and float(final) < 0.995 * losses[0], losses
    changed = (embeddings.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(trainer.variant_ids)
    assert all(
        torch.equal(a, b) for a, b in zip(unet_before, trainer.c.unet.parameters(), strict=True)
    )


@pytest.mark.parametrize("target", ["class_word", "mask"])
def test_the_attention_term_pulls_the_identifier_map_to_its_target(subject, target: str) -> None:
    """Rows started away from the class word: a dominant attention term brings the map back."""
    trainer = make_trainer(subject.sd, attention_weight=100.0, attention_target=target)
    weight = trainer.c.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[trainer.variant_ids] = 3 * torch.randn(len(trainer.variant_ids), weight.shape[1])
    inputs = fixed_batch(trainer, masks=target == "mask")
    optimizer = torch.optim.AdamW(trainer.groups)
    attention = []
    for _ in range(8):
        loss, parts = step_loss(trainer, inputs)
        attention.append(parts["attention_loss"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.after_step()
    attention.append(step_loss(trainer, inputs)[1]["attention_loss"])
    assert all(b < a for a, b in zip(attention, attention[1:], strict=False)), attention
    assert attention[-1] < 0.95 * attention[0], attention


def test_mask_target_needs_masks(subject, tmp_path: Path) -> None:
    with pytest.raises(SidpipeError, match="masked: true"):
        settings = {"steps": 1, "learning_rate": 1e-2, "attention_target": "mask"}
        train(subject, tmp_path / "run", tmp_path / "ckpt", settings)


def _image(pipe, prompt: str) -> np.ndarray:
    return pipe(
        prompt,
        num_inference_steps=3,
        guidance_scale=3.0,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def test_trained_result_loads_back_samples_and_draws_maps(subject, tmp_path: Path) -> None:
    out = tmp_path / "run"
    settings = {"steps": 4, "learning_rate": 5e-2, "stages": 3, "attention_weight": 0.1}
    summary = train(subject, out, tmp_path / "ckpt", settings)
    assert summary["finished"]
    log_rows = read_csv(out / "training_log.csv")
    assert len(log_rows) == 4 and all(float(r["attention_loss"]) > 0 for r in log_rows)
    weights = out / "weights"
    with safe_open(str(weights / WEIGHT_NAME), "pt") as handle:
        assert handle.metadata()["token"] == "<sks>" and handle.metadata()["stages"] == "3"
    rows = load_file(str(weights / WEIGHT_NAME))
    assert rows["k"].shape == rows["v"].shape and rows["k"].shape[0] == 3

    prompt = "a photo of <sks> mug"
    trained = SeFiIdeTrainer.load_into(load_sd_pipeline(subject.sd, "float32", "cpu"), weights)
    image = _image(trained, prompt)
    # The same file with every row put back to its start (the class word's embedding):
    untrained_dir = tmp_path / "untrained"
    untrained_dir.mkdir()
    pipe = load_sd_pipeline(subject.sd, "float32", "cpu")
    class_ids = pipe.tokenizer("mug", add_special_tokens=False).input_ids
    start = pipe.text_encoder.get_input_embeddings().weight[class_ids].mean(0).detach()
    with safe_open(str(weights / WEIGHT_NAME), "pt") as handle:
        meta = handle.metadata()
    save_file(
        {k: start.expand_as(v).contiguous() for k, v in rows.items()},
        untrained_dir / WEIGHT_NAME,
        metadata=meta,
    )
    untrained = SeFiIdeTrainer.load_into(pipe, untrained_dir)
    assert np.abs(image - _image(untrained, prompt)).max() > 1e-4
    # the loaded stages: the token's map under the trained K features is a distribution
    _, attention = attention_maps(
        trained, prompt, 0, "<sks>", steps=3, guidance_scale=3.0, resolution=SIZE
    )
    assert attention.shape == (SIZE, SIZE) and attention.sum() == pytest.approx(1.0, abs=1e-4)
    # a plain pipeline's prompt embeddings do not fit the SeFi processors: a clear error
    with pytest.raises(SidpipeError, match="SeFiTextEncoder"):
        trained.unet(
            torch.zeros(1, 4, 8, 8),
            torch.tensor([10]),
            torch.zeros(1, 77, trained.unet.config.cross_attention_dim),  # 77 % 6 != 0
        )
    shutil.rmtree(untrained_dir)


def test_the_sample_stage_loads_and_samples_an_arm_with_a_negative_prompt(
    subject, tmp_path: Path
) -> None:
    """`sample_arm` as the workflow calls it: the pipeline from the weights folder, prompt
    embeddings through the pipeline's encode_prompt (the negative one too)."""
    from sidpipe.sampling import expand_prompts, sample_arm

    out = tmp_path / "run"
    train(subject, out, tmp_path / "ckpt", {"steps": 2, "learning_rate": 5e-2, "stages": 2})
    prompts = expand_prompts(
        ["a {token} {class}", "a {token} {class} on the beach"], "mug", "<sks>"
    )
    rows = sample_arm(
        subject.sd,
        tmp_path / "images",
        prompts,
        [0, 1],
        "sefi_ide",
        out / "weights",
        "<sks>",
        steps=2,
        guidance_scale=3.0,
        resolution=SIZE,
        dtype="float32",
        device="cpu",
        negative_prompt="a plant, a checkered tablecloth",
    )
    images = [np.asarray(Image.open(tmp_path / "images" / row["path"])) for row in rows]
    assert len(images) == 4 and all(image.shape == (SIZE, SIZE, 3) for image in images)
    assert np.abs(images[0].astype(int) - images[2].astype(int)).max() > 0  # prompts differ
