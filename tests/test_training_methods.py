"""DreamBooth, DreamBooth-LoRA and Textual Inversion on tiny random models (CPU).

Each method must lower the loss on a fixed batch, save a result that loads back through the
standard diffusers API and changes the pipeline's output; one DreamBooth step must equal a
hand-written computation of noise, target, prior term and AdamW update.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel

from sidpipe.class_images import generate_class_images
from sidpipe.io import read_csv, write_csv
from sidpipe.masks import segment_references
from sidpipe.models import load_sd_components, load_sd_pipeline
from sidpipe.references import prepare_references
from sidpipe.tiny_models import build_tiny_models
from sidpipe.training import base, trainer_class
from sidpipe.training.base import Batch, diffusion_loss
from sidpipe.training.data import LatentSource, read_training_set, tokenize
from sidpipe.training.loop import train_subject
from sidpipe.training.step import stream_indices

DEMO = Path(__file__).resolve().parents[1] / "tests/data/tiny_demo/subjects/red_mug"
SIZE = 64


def make_subject(root: Path) -> SimpleNamespace:
    """Tiny models, the demo mug's references (64 px), masks, case-3 descriptions and two
    class images."""
    table = yaml.safe_load((DEMO / "descriptions.yaml").read_text())
    corpus = [text for row in table.values() for text in row.values()] + ["a photo of a mug"]
    tiny = build_tiny_models(root / "tiny", corpus, seed=0)
    refs = root / "references"
    prepare_references(DEMO, refs, "red_mug", SIZE)
    masks = root / "masks"
    segment_references(refs, masks, "red_mug", "mug", backend="provided")
    descriptions = {image_id: row["case3"] for image_id, row in table.items()}
    csv = root / "descriptions.csv"
    rows = [{"image_id": k, "description": v} for k, v in descriptions.items()]
    write_csv(csv, rows, ["image_id", "description"])
    class_dir = root / "class_images"
    generate_class_images(tiny["sd"], "mug", class_dir, count=2, steps=2, resolution=SIZE)
    return SimpleNamespace(
        sd=tiny["sd"],
        refs=refs,
        masks=masks,
        csv=csv,
        descriptions=descriptions,
        class_dir=class_dir,
    )


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return make_subject(tmp_path_factory.mktemp("subject"))


# name -> (algorithm, settings); learning rates are large so a few steps show.
METHODS = {
    "dreambooth": (
        "dreambooth",
        {"learning_rate": 1e-3, "train_text_encoder": True, "prior_preservation": True},
    ),
    "dreambooth_masked": (
        "dreambooth",
        {"learning_rate": 1e-3, "prior_preservation": True, "masked": True},
    ),
    "dreambooth_lora": (
        "dreambooth_lora",
        {"learning_rate": 1e-2, "rank": 4, "train_text_encoder": True, "prior_preservation": True},
    ),
    "textual_inversion": ("textual_inversion", {"learning_rate": 5e-2}),
}


def fixed_batch(subject: SimpleNamespace, c: SimpleNamespace, trainer, settings: dict):
    """Every reference (+ class image) with fixed latents, noise and timesteps."""
    prior, masked = settings.get("prior_preservation"), settings.get("masked")
    data = read_training_set(
        subject.refs,
        subject.csv,
        masks_dir=subject.masks if masked else None,
        class_images_dir=subject.class_dir if prior else None,
    )
    captions = [trainer.caption(d) for d in data.descriptions] + data.class_prompts
    pixels = data.pixels if not prior else torch.cat([data.pixels, data.class_pixels])
    n, n_inst = len(pixels), len(data.pixels)
    generator = torch.Generator().manual_seed(0)
    source = LatentSource(c.vae, pixels, flip=False)
    latents = source.sample(torch.arange(n), torch.zeros(n, dtype=torch.bool), generator)
    masks = None
    if masked:
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


def batch_loss(c: SimpleNamespace, batch: Batch, noise, timesteps) -> torch.Tensor:
    hidden = c.text_encoder(batch.input_ids).last_hidden_state
    return diffusion_loss(c.unet, c.noise_scheduler, batch, hidden, noise, timesteps)[0]


@pytest.mark.parametrize("name", list(METHODS))
def test_loss_falls_on_a_fixed_batch(subject: SimpleNamespace, name: str) -> None:
    algorithm, settings = METHODS[name]
    torch.manual_seed(0)
    c = load_sd_components(subject.sd, device="cpu")
    trainer = trainer_class(algorithm)(c, {"steps": 1, **settings}, "sks", "mug")
    groups = trainer.prepare()
    batch, noise, timesteps = fixed_batch(subject, c, trainer, settings)
    embeddings = c.text_encoder.get_input_embeddings().weight.detach().clone()
    optimizer = torch.optim.AdamW(groups)
    losses = []
    for _ in range(6):
        loss = batch_loss(c, batch, noise, timesteps)
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.after_step()
    with torch.no_grad():
        final = float(batch_loss(c, batch, noise, timesteps))
    # Strictly falling at every step (a single token moves a tiny random model least).
    falling = [b < a for a, b in zip(losses, [*losses[1:], final], strict=True)]
    assert all(falling) and final < 0.995 * losses[0], (name, losses, final)
    if algorithm == "textual_inversion":
        changed = (c.text_encoder.get_input_embeddings().weight != embeddings).any(dim=1)
        assert changed.nonzero().flatten().tolist() == [trainer.token_id]


def _generate(pipe, prompt: str) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt,
        num_inference_steps=2,
        height=SIZE,
        width=SIZE,
        generator=generator,
        output_type="np",
    ).images[0]


def _record_loads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders UNet2DConditionModel and CLIPTextModel load from, pipelines' loads included."""
    loads: list[Path] = []
    for cls in (UNet2DConditionModel, CLIPTextModel):
        original = cls.from_pretrained.__func__

        def spy(klass, path, *args, _original=original, **kwargs):
            loads.append(Path(path) / kwargs.get("subfolder", ""))
            return _original(klass, path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return loads


@pytest.mark.parametrize("name", list(METHODS))
def test_trained_result_loads_back_and_changes_the_output(
    subject: SimpleNamespace, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    algorithm, settings = METHODS[name]
    out = tmp_path / "run"
    summary = train_subject(
        algorithm,
        {"steps": 3, "batch_size": 1, **settings},
        subject.sd,
        subject.refs,
        subject.csv,
        out,
        tmp_path / "checkpoints",
        identifier="sks",
        class_name="mug",
        class_images_dir=subject.class_dir,
        masks_dir=subject.masks,
        device="cpu",
    )
    assert summary["finished"] and summary["steps"] == 3 and summary["steps_per_second"] > 0
    assert {p.name for p in out.iterdir()} == {
        "weights",
        "training_log.csv",
        "loss_curve.png",
        "train_info.json",
    }
    assert not (tmp_path / "checkpoints").exists()  # removed once the outputs are written
    log_rows = read_csv(out / "training_log.csv")
    assert [int(r["step"]) for r in log_rows] == [1, 2, 3]
    assert (log_rows[0]["prior_loss"] != "") == bool(settings.get("prior_preservation"))
    info = yaml.safe_load((out / "train_info.json").read_text())  # JSON is YAML
    token = "<sks>" if algorithm == "textual_inversion" else "sks"
    assert info["token"] == token
    assert [img["caption"] for img in info["images"]] == [
        d.replace("[V]", token) for d in subject.descriptions.values()
    ]

    prompt = f"a photo of {token} mug on a table"
    base = load_sd_pipeline(subject.sd, device="cpu")
    base.set_progress_bar_config(disable=True)
    before = _generate(base, prompt)
    tuned = trainer_class(algorithm).load_into(base, out / "weights")
    after = _generate(tuned, prompt)
    assert np.abs(after - before).max() > 1e-3
    if algorithm == "textual_inversion":
        assert token in tuned.tokenizer.get_vocab()

    # What sampling loads (Trainer.load_pipeline) is the same pipeline; a full fine-tune's
    # never loads the base model's UNet and text encoder, which its own replace.
    loads = _record_loads(monkeypatch)
    direct = trainer_class(algorithm).load_pipeline(subject.sd, out / "weights", "float32", "cpu")
    direct.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_generate(direct, prompt), after)
    base, weights = Path(subject.sd), out / "weights"
    if algorithm == "dreambooth":
        assert weights / "unet" in loads and base / "unet" not in loads
        trained_text = (weights / "text_encoder").is_dir()
        assert (weights / "text_encoder" in loads) == trained_text
        assert (base / "text_encoder" in loads) != trained_text
    else:
        assert {base / "unet", base / "text_encoder"} <= set(loads)  # the spy sees them


def test_dreambooth_step_matches_a_hand_written_step(
    subject: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lr, weight_decay, prior_weight, seed = 1e-4, 1e-2, 0.5, 3
    settings = {
        "steps": 1,
        "learning_rate": lr,
        "batch_size": 1,
        "train_text_encoder": True,
        "prior_preservation": True,
        "prior_loss_weight": prior_weight,
    }
    seen: dict = {}

    def spy(unet, scheduler, batch, hidden, noise, timesteps, weight):
        seen.update(latents=batch.latents, input_ids=batch.input_ids, noise=noise, t=timesteps)
        return diffusion_loss(unet, scheduler, batch, hidden, noise, timesteps, weight)

    # the loop's step goes through Trainer.compute_loss, which calls base.diffusion_loss
    monkeypatch.setattr(base, "diffusion_loss", spy)
    out = tmp_path / "run"
    train_subject(
        "dreambooth",
        settings,
        subject.sd,
        subject.refs,
        subject.csv,
        out,
        tmp_path / "ck",
        identifier="sks",
        class_name="mug",
        class_images_dir=subject.class_dir,
        seed=seed,
        device="cpu",
    )

    # --- the same step by hand ---------------------------------------------------------
    c = load_sd_components(subject.sd, device="cpu")
    refs = read_csv(subject.refs / "manifest.csv")
    classes = read_csv(subject.class_dir / "manifest.csv")
    ref = refs[stream_indices(len(refs), seed, 0, 1, salt=0)[0]]
    cls = classes[stream_indices(len(classes), seed, 0, 1, salt=1)[0]]

    def pixels(path: Path) -> torch.Tensor:
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1)

    images = torch.stack(
        [pixels(subject.refs / ref["path"]), pixels(subject.class_dir / cls["path"])]
    )
    with torch.no_grad():
        posterior = c.vae.encode(images).latent_dist
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(posterior.mean.shape, generator=generator)
    latents = (posterior.mean + posterior.std * z) * 0.18215
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, 1000, (2,), generator=generator)
    captions = [subject.descriptions[ref["image_id"]].replace("[V]", "sks"), "a photo of a mug"]
    ids = c.tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    torch.testing.assert_close(seen["latents"], latents, rtol=1e-5, atol=1e-6)
    assert torch.equal(seen["noise"], noise) and torch.equal(seen["t"], t)
    assert torch.equal(seen["input_ids"], ids)

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)[t].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    hidden = c.text_encoder(ids).last_hidden_state
    pred = c.unet(noisy, t, hidden).sample
    # epsilon prediction: the target is the noise; the class image is the prior term
    loss = ((pred[0] - noise[0]) ** 2).mean() + prior_weight * ((pred[1] - noise[1]) ** 2).mean()
    loss.backward()
    logged = float(read_csv(out / "training_log.csv")[0]["loss"])
    assert logged == pytest.approx(float(loss.detach()), rel=1e-5)

    modules = {"unet": c.unet, "text_encoder": c.text_encoder}
    params = [p for m in modules.values() for p in m.parameters()]
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
    clip = min(1.0, 1.0 / (float(norm) + 1e-6))  # clip the global gradient norm to 1
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    expected = {}
    for name, module in modules.items():
        for key, p in module.named_parameters():
            g = p.grad * clip
            m, v = (1 - beta1) * g, (1 - beta2) * g * g  # first AdamW step from zero moments
            m_hat, v_hat = m / (1 - beta1), v / (1 - beta2)
            expected[f"{name}.{key}"] = p.detach() * (1 - lr * weight_decay) - lr * m_hat / (
                v_hat.sqrt() + eps
            )
    trained = {
        "unet": UNet2DConditionModel.from_pretrained(out / "weights", subfolder="unet"),
        "text_encoder": CLIPTextModel.from_pretrained(out / "weights", subfolder="text_encoder"),
    }
    moved = 0.0
    for name, module in trained.items():
        before = dict(modules[name].named_parameters())
        for key, p in module.named_parameters():
            want = expected[f"{name}.{key}"]
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=lr * 1e-2, msg=key)
            moved = max(moved, float((p - before[key]).detach().abs().max()))
    assert moved > lr / 2  # the step really changed the weights
