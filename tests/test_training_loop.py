"""The training loop on tiny random models (CPU): exact resume, caching, captions, v-prediction
and the errors a user can hit."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from sidpipe.class_images import generate_class_images
from sidpipe.io import SidpipeError, read_csv, write_csv
from sidpipe.masks import segment_references
from sidpipe.models import load_sd_components
from sidpipe.references import prepare_references
from sidpipe.tiny_models import build_tiny_models
from sidpipe.training import base, loop, trainer_class
from sidpipe.training import step as training_step
from sidpipe.training.augment import PREFIXES
from sidpipe.training.base import diffusion_loss
from sidpipe.training.data import LatentSource, read_training_set, tokenize
from sidpipe.training.loop import TrainingInterrupted, train_subject
from sidpipe.training.step import stream_indices

DEMO = Path(__file__).resolve().parents[1] / "tests/data/tiny_demo/subjects/red_mug"
SIZE = 64
LORA = {"learning_rate": 1e-3, "rank": 2, "batch_size": 1}


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Tiny models, the demo mug's references (64 px), masks, case-3 descriptions and two
    class images."""
    root = tmp_path_factory.mktemp("subject")
    table = yaml.safe_load((DEMO / "descriptions.yaml").read_text())
    corpus = [text for row in table.values() for text in row.values()] + ["a photo of a mug"]
    tiny = build_tiny_models(root / "tiny", corpus, seed=0)
    prepare_references(DEMO, root / "references", "red_mug", SIZE)
    segment_references(root / "references", root / "masks", "red_mug", "mug", backend="provided")
    descriptions = {image_id: row["case3"] for image_id, row in table.items()}
    rows = [{"image_id": k, "description": v} for k, v in descriptions.items()]
    write_csv(root / "descriptions.csv", rows, ["image_id", "description"])
    generate_class_images(tiny["sd"], "mug", root / "class", count=2, steps=2, resolution=SIZE)
    return SimpleNamespace(
        sd=tiny["sd"],
        refs=root / "references",
        masks=root / "masks",
        csv=root / "descriptions.csv",
        descriptions=descriptions,
        class_dir=root / "class",
    )


def run(subject: SimpleNamespace, tmp: Path, algorithm: str, settings: dict, **kwargs) -> dict:
    args = {
        "base_model": subject.sd,
        "references_dir": subject.refs,
        "descriptions_csv": subject.csv,
        "out_dir": tmp / "run",
        "checkpoint_dir": tmp / "checkpoints",
        "identifier": "sks",
        "class_name": "mug",
        "class_images_dir": subject.class_dir,
        "masks_dir": subject.masks,
        "device": "cpu",
        **kwargs,
    }
    return train_subject(algorithm, settings, **args)


def lora_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "weights" / "pytorch_lora_weights.safetensors")


def test_stream_visits_every_image_once_per_epoch() -> None:
    stream = [i for step in range(6) for i in stream_indices(5, 7, step, 5, salt=0)]
    epochs = [stream[k : k + 5] for k in range(0, 30, 5)]
    assert all(sorted(epoch) == list(range(5)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled each epoch
    # a pure function of (seed, step): batch size only regroups the same stream
    assert [i for s in range(15) for i in stream_indices(5, 7, s, 2, 0)] == stream


def test_killed_run_resumes_to_identical_weights(subject: SimpleNamespace, tmp_path: Path) -> None:
    settings = {
        **LORA,
        "steps": 60,
        "batch_size": 2,
        "train_text_encoder": True,
        "prior_preservation": True,
        "masked": True,
        "flip": True,
    }
    full = run(subject, tmp_path / "full", "dreambooth_lora", settings, checkpoint_every=10)
    assert full["finished"]

    killed = tmp_path / "killed"
    stopped = run(subject, killed, "dreambooth_lora", settings, checkpoint_every=10, stop_after=30)
    assert stopped == {"finished": False, "steps": 30, "final_loss": stopped["final_loss"]}
    assert not (killed / "run").exists()
    names = [p.name for p in (killed / "checkpoints").iterdir()]
    assert names == ["checkpoint-0000030.pt"]  # older ones pruned, no temp files left
    resumed = run(subject, killed, "dreambooth_lora", settings, checkpoint_every=10)
    assert resumed["finished"]

    info = json.loads((killed / "run" / "train_info.json").read_text())
    assert info["resumed_from_step"] == 30
    a, b = lora_weights(tmp_path / "full" / "run"), lora_weights(killed / "run")
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert read_csv(tmp_path / "full" / "run" / "training_log.csv") == read_csv(
        killed / "run" / "training_log.csv"
    )


def test_dreambooth_resume_restores_the_full_model(
    subject: SimpleNamespace, tmp_path: Path
) -> None:
    settings = {"steps": 4, "learning_rate": 1e-3, "train_text_encoder": True}
    run(subject, tmp_path / "full", "dreambooth", settings, checkpoint_every=1)
    run(subject, tmp_path / "killed", "dreambooth", settings, checkpoint_every=3, stop_after=2)
    run(subject, tmp_path / "killed", "dreambooth", settings, checkpoint_every=3)
    info = json.loads((tmp_path / "killed" / "run" / "train_info.json").read_text())
    assert info["resumed_from_step"] == 2
    for part, name in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        a = load_file(tmp_path / "full" / "run" / "weights" / part / f"{name}.safetensors")
        b = load_file(tmp_path / "killed" / "run" / "weights" / part / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_gradient_checkpointing_trains_the_same(subject: SimpleNamespace, tmp_path: Path) -> None:
    settings = {"steps": 2, "learning_rate": 1e-3, "train_text_encoder": True}
    run(subject, tmp_path / "a", "dreambooth", settings)
    run(subject, tmp_path / "b", "dreambooth", settings, gradient_checkpointing=True)
    for part, name in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        a = load_file(tmp_path / "a" / "run" / "weights" / part / f"{name}.safetensors")
        b = load_file(tmp_path / "b" / "run" / "weights" / part / f"{name}.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_checkpoint_of_other_settings_is_not_resumed(
    subject: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run(subject, tmp_path, "dreambooth_lora", {**LORA, "steps": 3}, stop_after=2)
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        run(subject, tmp_path, "dreambooth_lora", {**LORA, "steps": 3, "rank": 3})
    assert "other settings" in caplog.text
    info = json.loads((tmp_path / "run" / "train_info.json").read_text())
    assert info["resumed_from_step"] is None


def test_cached_latents_train_like_reencoding(subject: SimpleNamespace, tmp_path: Path) -> None:
    settings = {**LORA, "steps": 3, "flip": True, "prior_preservation": True}
    run(subject, tmp_path / "a", "dreambooth_lora", settings, cache_latents=True)
    run(subject, tmp_path / "b", "dreambooth_lora", settings, cache_latents=False)
    a, b = lora_weights(tmp_path / "a" / "run"), lora_weights(tmp_path / "b" / "run")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_v_prediction_config_trains_on_the_velocity(
    subject: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "sd_v"
    shutil.copytree(subject.sd, model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    calls = []
    real = base.prediction_target

    def spy(scheduler, latents, noise, timesteps):
        target = real(scheduler, latents, noise, timesteps)
        calls.append((scheduler, latents, noise, timesteps, target))
        return target

    monkeypatch.setattr(base, "prediction_target", spy)
    run(subject, tmp_path, "dreambooth_lora", {**LORA, "steps": 2}, base_model=str(model))
    assert len(calls) == 2
    for scheduler, latents, noise, timesteps, target in calls:
        assert scheduler.config.prediction_type == "v_prediction"
        alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
        torch.testing.assert_close(target, velocity)
        assert not torch.allclose(target, noise)


@pytest.mark.parametrize("algorithm", ["dreambooth_lora", "textual_inversion"])
def test_each_image_caption_reaches_the_text_encoder(
    subject: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    seen = []

    def spy(unet, scheduler, batch, hidden, noise, timesteps, weight):
        seen.append((batch.input_ids.clone(), hidden.detach().clone(), batch.is_prior.clone()))
        return diffusion_loss(unet, scheduler, batch, hidden, noise, timesteps, weight)

    monkeypatch.setattr(base, "diffusion_loss", spy)
    # One epoch of the 4 references: each description is used exactly once.
    settings = {**LORA, "steps": 2, "batch_size": 2, "prior_preservation": True}
    run(subject, tmp_path, algorithm, settings)

    c = load_sd_components(subject.sd, device="cpu")
    token = "sks"
    if algorithm == "textual_inversion":
        token = "<sks>"
        c.tokenizer.add_tokens([token])
    captions = [d.replace("[V]", token) for d in subject.descriptions.values()]
    expected = tokenize(c.tokenizer, captions)
    used = torch.cat([ids[~prior] for ids, _, prior in seen])
    order = sorted(range(4), key=lambda i: used[i].tolist())
    assert torch.equal(used[order], expected[sorted(range(4), key=lambda i: expected[i].tolist())])
    class_ids = torch.cat([ids[prior] for ids, _, prior in seen])
    assert torch.equal(class_ids, tokenize(c.tokenizer, ["a photo of a mug"] * 4))
    if algorithm == "textual_inversion":
        token_id = c.tokenizer.convert_tokens_to_ids(token)
        assert (used == token_id).sum(dim=1).tolist() == [1, 1, 1, 1]
    else:  # frozen text encoder: cached outputs equal a fresh encoding of the same ids
        with torch.no_grad():
            for ids, hidden, _ in seen:
                torch.testing.assert_close(hidden, c.text_encoder(ids).last_hidden_state)


def test_diverging_loss_stops_with_the_step(subject: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(SidpipeError, match=r"loss is (nan|inf) at step 2 of 5"):
        run(subject, tmp_path, "dreambooth_lora", {**LORA, "steps": 5, "learning_rate": 1e30})
    assert not (tmp_path / "run").exists()


def test_masked_without_masks_is_an_error(subject: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(SidpipeError, match="masked is on but no masks"):
        run(subject, tmp_path, "dreambooth", {"steps": 1, "masked": True}, masks_dir=None)


def test_prior_without_class_images_is_an_error(subject: SimpleNamespace, tmp_path: Path) -> None:
    settings = {"steps": 1, "prior_preservation": True}
    with pytest.raises(SidpipeError, match="prior_preservation is on but no class images"):
        run(subject, tmp_path, "dreambooth", settings, class_images_dir=None)


def test_reference_without_description_is_an_error(
    subject: SimpleNamespace, tmp_path: Path
) -> None:
    csv = tmp_path / "descriptions.csv"
    rows = [{"image_id": k, "description": v} for k, v in subject.descriptions.items()]
    write_csv(csv, rows[:2] + rows[3:], ["image_id", "description"])
    missing = rows[2]["image_id"]
    with pytest.raises(SidpipeError, match=rf"{csv}: reference image '{missing}' has 0 desc"):
        run(subject, tmp_path, "dreambooth_lora", {**LORA, "steps": 1}, descriptions_csv=csv)
    write_csv(csv, [*rows, rows[0]], ["image_id", "description"])
    with pytest.raises(SidpipeError, match=rf"image '{rows[0]['image_id']}' has 2 desc"):
        run(subject, tmp_path, "dreambooth_lora", {**LORA, "steps": 1}, descriptions_csv=csv)


def test_8bit_adam_needs_bitsandbytes(
    subject: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(SidpipeError, match="use_8bit_adam is true but bitsandbytes is not inst"):
        run(subject, tmp_path, "dreambooth_lora", {**LORA, "steps": 1}, use_8bit_adam=True)


def test_8bit_adam_trains_and_resumes_exactly(
    subject: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bitsandbytes' AdamW8bit (it has CPU kernels too) is the optimizer, its quantized state
    survives a checkpoint, and it takes the weights where 32-bit AdamW nearly does."""
    import bitsandbytes as bnb

    made = []
    make = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda *a: made.append(make(*a)) or made[-1])
    settings = {"steps": 8, "learning_rate": 1e-4, "train_text_encoder": True}
    full = run(subject, tmp_path / "full", "dreambooth", settings, use_8bit_adam=True)
    assert isinstance(made[0], bnb.optim.AdamW8bit)
    quantized = [s for s in made[0].state.values() if s["state1"].dtype == torch.uint8]
    assert quantized  # the big tensors' moments are 8-bit, not float32
    assert full["finished"]

    killed = tmp_path / "killed"
    run(subject, killed, "dreambooth", settings, use_8bit_adam=True, stop_after=4)
    run(subject, killed, "dreambooth", settings, use_8bit_adam=True)
    fp32 = tmp_path / "fp32"
    run(subject, fp32, "dreambooth", settings)
    base = load_file(Path(subject.sd) / "unet" / "diffusion_pytorch_model.safetensors")
    weights = {
        name: load_file(root / "run/weights/unet/diffusion_pytorch_model.safetensors")
        for name, root in (("full", tmp_path / "full"), ("resumed", killed), ("fp32", fp32))
    }
    for key in base:
        assert torch.equal(weights["full"][key], weights["resumed"][key]), key
    moved = {n: sum((w[k] - base[k]).abs().sum() for k in base) for n, w in weights.items()}
    change = sum((weights["full"][k] - weights["fp32"][k]).abs().sum() for k in base)
    assert moved["full"] > 0 and change < 0.1 * moved["fp32"]


def test_sigterm_checkpoints_the_step_in_flight_and_resumes(
    subject: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLURM's time limit and scancel send SIGTERM: the loop finishes the step, checkpoints it
    (not the last periodic checkpoint) and stops; the rerun ends where an unkilled run does."""
    settings = {**LORA, "steps": 12, "prior_preservation": True}
    run(subject, tmp_path / "full", "dreambooth_lora", settings, checkpoint_every=100)

    steps_done = []

    def signal_at_step_5(self: object) -> None:
        steps_done.append(1)
        if len(steps_done) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_class("dreambooth_lora"), "after_step", signal_at_step_5)
    killed = tmp_path / "killed"
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM received; stopped after step 5 of 12"):
        run(subject, killed, "dreambooth_lora", settings, checkpoint_every=100)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["checkpoint-0000005.pt"]
    assert not (killed / "run").exists()
    monkeypatch.undo()

    run(subject, killed, "dreambooth_lora", settings, checkpoint_every=100)
    info = json.loads((killed / "run" / "train_info.json").read_text())
    assert info["resumed_from_step"] == 5
    a, b = lora_weights(tmp_path / "full" / "run"), lora_weights(killed / "run")
    assert all(torch.equal(a[key], b[key]) for key in a)


CHILD = """
import json, logging, signal, sys
from sidpipe.training.loop import train_subject
# as from a terminal: a test run in the background inherits an ignored SIGINT
signal.signal(signal.SIGINT, signal.default_int_handler)
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
train_subject(**json.loads(sys.argv[1]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_to_a_training_process(
    subject: SimpleNamespace, tmp_path: Path, signum: signal.Signals
) -> None:
    """A real process killed the way SLURM does it (or by a terminal's Ctrl-C) exits non-zero
    with a checkpoint of the step it was on and says how to resume."""
    args = {
        "algorithm": "dreambooth_lora",
        "settings": {**LORA, "steps": 10**6},
        "base_model": subject.sd,
        "references_dir": str(subject.refs),
        "descriptions_csv": str(subject.csv),
        "out_dir": str(tmp_path / "run"),
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "identifier": "sks",
        "class_name": "mug",
        "device": "cpu",
        "checkpoint_every": 10**6,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        seen = []
        for line in child.stderr:  # the loop starts right after this line
            seen.append(line)
            if "trainable parameters" in line:
                break
        time.sleep(1.0)
        child.send_signal(signum)
        _, rest = child.communicate(timeout=120)
    finally:
        child.kill()
    stderr = "".join(seen) + rest
    assert child.returncode == 1, stderr
    match = re.search(rf"{signum.name} received; stopped after step (\d+) of 1000000", stderr)
    assert match, stderr
    step = int(match.group(1))
    assert step > 0
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [f"checkpoint-{step:07d}.pt"]
    assert "rerun the job to resume" in stderr
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_optimizer_or_other_images_is_not_resumed(
    subject: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """AdamW's state does not load into AdamW8bit (the job would fail on every rerun), and a
    class image replaced under the same name is new data: both start from scratch."""
    settings = {**LORA, "steps": 3, "prior_preservation": True}
    run(subject, tmp_path / "a", "dreambooth_lora", settings, stop_after=2)
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        run(subject, tmp_path / "a", "dreambooth_lora", settings, use_8bit_adam=True)
    info = json.loads((tmp_path / "a/run/train_info.json").read_text())
    assert info["resumed_from_step"] is None and info["use_8bit_adam"]

    classes = tmp_path / "class"
    shutil.copytree(subject.class_dir, classes)
    first = sorted(classes.glob("*.png"))[0]
    Image.open(first).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(first)
    run(subject, tmp_path / "b", "dreambooth_lora", settings, stop_after=2)
    run(subject, tmp_path / "b", "dreambooth_lora", settings, class_images_dir=classes)
    info = json.loads((tmp_path / "b/run/train_info.json").read_text())
    assert info["resumed_from_step"] is None
    assert caplog.text.count("other settings or data") >= 1


def test_no_periodic_checkpoint_at_the_last_step(
    subject: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights are written right after it; a full fine-tune's checkpoint is GBs."""
    saved = []
    save = loop.save_checkpoint
    monkeypatch.setattr(
        loop, "save_checkpoint", lambda d, step, state: saved.append(step) or save(d, step, state)
    )
    run(subject, tmp_path, "dreambooth_lora", {**LORA, "steps": 4}, checkpoint_every=2)
    assert saved == [2]
    info = json.loads((tmp_path / "run/train_info.json").read_text())
    assert info["checkpoint_every"] == 2


def test_masks_follow_their_images_through_flips_and_batches(
    subject: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each instance row's mask is its own image's mask, mirrored exactly when the image's
    latents are; class rows get the plain loss."""
    drawn = []
    sample = LatentSource.sample

    def spy_sample(self, indices, flipped, generator):
        drawn.append((indices.clone(), flipped.clone()))
        return sample(self, indices, flipped, generator)

    seen = []

    def spy_loss(unet, scheduler, batch, hidden, noise, timesteps, weight):
        seen.append(batch.masks.clone())
        return diffusion_loss(unet, scheduler, batch, hidden, noise, timesteps, weight)

    monkeypatch.setattr(LatentSource, "sample", spy_sample)
    monkeypatch.setattr(base, "diffusion_loss", spy_loss)
    settings = {"steps": 6, "learning_rate": 1e-5, "batch_size": 2, "flip": True}
    settings |= {"masked": True, "prior_preservation": True}
    run(subject, tmp_path, "dreambooth", settings)

    masks = read_training_set(subject.refs, subject.csv, masks_dir=subject.masks).masks
    assert not torch.equal(masks, masks.flip(-1))  # the demo's masks are not symmetric
    flips = 0
    for (indices, flipped), batch_masks in zip(drawn, seen, strict=True):
        for row in range(2):
            own = masks[indices[row]]
            assert torch.equal(batch_masks[row], own.flip(-1) if flipped[row] else own)
            flips += int(flipped[row])
        assert torch.equal(batch_masks[2:], torch.ones_like(batch_masks[2:]))
    assert 0 < flips < 12  # both cases were seen


@pytest.mark.parametrize(
    ("algorithm", "settings"),
    [
        ("custom_diffusion", {"batch_size": 2, "prior_preservation": True, "flip": True}),
        ("svdiff", {"learning_rate_1d": 1e-4, "train_text_encoder": True}),
        ("textual_inversion", {}),
    ],
)
def test_killed_run_of_each_adapter_method_resumes_to_identical_weights(
    subject: SimpleNamespace, tmp_path: Path, algorithm: str, settings: dict
) -> None:
    settings = {"steps": 6, "learning_rate": 1e-3, **settings}
    run(subject, tmp_path / "full", algorithm, settings, checkpoint_every=2)
    run(subject, tmp_path / "killed", algorithm, settings, checkpoint_every=2, stop_after=3)
    run(subject, tmp_path / "killed", algorithm, settings, checkpoint_every=2)
    info = json.loads((tmp_path / "killed/run/train_info.json").read_text())
    assert info["resumed_from_step"] == 3
    files = sorted(p.name for p in (tmp_path / "full/run/weights").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "killed/run/weights").iterdir())
    base_model = load_sd_components(subject.sd, device="cpu")
    for name in files:
        a = load_file(tmp_path / "full/run/weights" / name)
        b = load_file(tmp_path / "killed/run/weights" / name)
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    if algorithm == "textual_inversion":  # one embedding row trains
        hidden = base_model.text_encoder.config.hidden_size
        assert info["trainable_parameters"] == hidden


@pytest.mark.parametrize("algorithm", ["custom_diffusion", "textual_inversion"])
def test_only_the_new_token_row_gets_a_gradient(subject: SimpleNamespace, algorithm: str) -> None:
    """As the references: the caption's other tokens' rows get no gradient, so they stay out of
    the optimizer's moments and the gradient clipping."""
    c = load_sd_components(subject.sd, device="cpu")
    trainer = trainer_class(algorithm)(c, {"learning_rate": 1e-3}, "sks", "mug")
    trainer.prepare()
    ids = tokenize(c.tokenizer, [trainer.caption("a [V] mug on a table")])
    c.text_encoder(ids).last_hidden_state.square().sum().backward()
    grad = c.text_encoder.get_input_embeddings().weight.grad
    others = torch.ones(len(grad), dtype=torch.bool)
    others[trainer.token_id] = False
    assert grad[trainer.token_id].abs().sum() > 0
    assert grad[others].abs().sum() == 0


@pytest.mark.parametrize(
    ("algorithm", "settings"),
    [
        ("svdiff", {"train_text_encoder": True}),
        ("custom_diffusion", {}),
        ("textual_inversion", {}),
        ("dreambooth", {"train_text_encoder": True}),
    ],
)
def test_a_trained_text_encoder_is_in_train_mode(
    subject: SimpleNamespace, algorithm: str, settings: dict
) -> None:
    """transformers checkpoints a layer only in train mode: without it the
    gradient_checkpointing option would silently do nothing for the text encoder."""
    c = load_sd_components(subject.sd, device="cpu")
    c.text_encoder.eval()
    trainer = trainer_class(algorithm)(c, {"learning_rate": 1e-3, **settings}, "sks", "mug")
    trainer.prepare()
    assert trainer.trains_text_encoder and c.text_encoder.training


def test_masked_loss_counts_only_the_subject() -> None:
    """Break-a-Scene style: an error off the subject costs nothing, one on it costs its mean;
    class rows keep the plain loss."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=10)
    noise = torch.randn(3, 4, 4, 4)
    masks = torch.zeros(3, 1, 4, 4)
    masks[:, :, :2] = 1.0  # the subject is the top half of each latent
    latents, timesteps = torch.zeros_like(noise), torch.tensor([1, 5, 9])
    batch = base.Batch(latents, torch.zeros(3, 77, dtype=torch.long), torch.tensor([0, 0, 1]) > 0)

    def loss_for(pred: torch.Tensor, masked: bool) -> tuple[float, dict]:
        def unet(*args: object) -> SimpleNamespace:
            return SimpleNamespace(sample=pred)

        b = base.Batch(batch.latents, batch.input_ids, batch.is_prior, masks if masked else None)
        loss, parts = diffusion_loss(unet, scheduler, b, None, noise, timesteps, 1.0)
        return float(loss), parts

    off = noise.clone()
    off[:2, :, 2:] += 3.0  # wrong only off the subject, in the instance rows
    assert loss_for(off, masked=True)[1]["instance_loss"] == 0.0
    assert loss_for(off, masked=False)[1]["instance_loss"] == pytest.approx(4.5)  # 9 on half
    on = noise.clone()
    on[:, :, :2] += 2.0  # wrong on the subject, in every row
    loss, parts = loss_for(on, masked=True)
    assert parts["instance_loss"] == pytest.approx(4.0)
    assert parts["prior_loss"] == pytest.approx(2.0)  # the class row is not masked: 4 on half
    assert loss == pytest.approx(6.0)


CUSTOM_DIFFUSION = {"steps": 12, "learning_rate": 1e-5, "batch_size": 2, "flip": True}


@pytest.mark.parametrize("resize", [True, False])
def test_custom_diffusion_rescales_its_references_as_the_reference_script(
    subject: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resize: bool
) -> None:
    """On (its default): every reference drawn comes rescaled, its caption with the prefix its
    side calls for and its loss on its region (the whole image only when zoomed in); class
    images stay whole. Off: the captions and the plain loss of every other method."""
    seen = []

    def spy(unet, scheduler, batch, hidden, noise, timesteps, weight):
        seen.append(batch)
        return diffusion_loss(unet, scheduler, batch, hidden, noise, timesteps, weight)

    monkeypatch.setattr(base, "diffusion_loss", spy)
    settings = {**CUSTOM_DIFFUSION, "prior_preservation": True}
    if not resize:
        settings["resize_augmentation"] = False
    run(subject, tmp_path, "custom_diffusion", settings)
    info = json.loads((tmp_path / "run/train_info.json").read_text())
    assert info["resize_augmentation"] is resize

    c = load_sd_components(subject.sd, device="cpu")
    c.tokenizer.add_tokens(["<new1>"])
    captions = [d.replace("[V]", "<new1>") for d in subject.descriptions.values()]
    prefix_of = {
        tuple(ids.tolist()): prefix
        for prefix in PREFIXES
        for ids in tokenize(c.tokenizer, [prefix + caption for caption in captions])
    }
    class_ids = tokenize(c.tokenizer, ["a photo of a mug"])[0]
    drawn = Counter()
    assert len(seen) == CUSTOM_DIFFUSION["steps"]
    for batch in seen:
        assert torch.equal(batch.input_ids[batch.is_prior], class_ids.expand(2, -1))
        if not resize:
            assert batch.masks is None
            assert {prefix_of[tuple(ids.tolist())] for ids in batch.input_ids[:2]} == {""}
            continue
        assert batch.masks_per_image and torch.all(batch.masks[batch.is_prior] == 1)
        for ids, mask in zip(batch.input_ids[:2], batch.masks[:2], strict=True):
            prefix = prefix_of[tuple(ids.tolist())]
            drawn[prefix] += 1
            assert bool(mask.all()) == (prefix in ("zoomed in ", "close up "))
    if resize:  # 24 draws: shrunk far away, shrunk a little and zoomed in all occur
        assert drawn["zoomed in "] + drawn["close up "] > 0
        assert drawn["a far away "] + drawn["very small "] > 0
        assert drawn[""] > 0


def test_each_rescaled_reference_is_encoded_and_captioned_as_itself(
    subject: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the UNet learns from: the latents of the very images the augmentation drew, each
    with its own reference's description behind the prefix its draw called for."""
    calls = {"resized": [], "encoded": [], "batches": []}
    real_resize, real_encode = training_step.resize_batch, LatentSource.sample_images

    def resize_spy(pixels, flipped, latent_size, generator):
        out = real_resize(pixels, flipped, latent_size, generator)
        calls["resized"].append((pixels.clone(), flipped.clone(), *out))
        return out

    def encode_spy(self, images, generator):
        out = real_encode(self, images, generator)
        calls["encoded"].append((images.clone(), out.clone()))
        return out

    def loss_spy(unet, scheduler, batch, hidden, noise, timesteps, weight):
        calls["batches"].append(batch)
        return diffusion_loss(unet, scheduler, batch, hidden, noise, timesteps, weight)

    monkeypatch.setattr(training_step, "resize_batch", resize_spy)
    monkeypatch.setattr(LatentSource, "sample_images", encode_spy)
    monkeypatch.setattr(base, "diffusion_loss", loss_spy)
    run(subject, tmp_path, "custom_diffusion", {**CUSTOM_DIFFUSION, "prior_preservation": True})

    data = read_training_set(subject.refs, subject.csv, resolution=SIZE)
    c = load_sd_components(subject.sd, device="cpu")
    c.tokenizer.add_tokens(["<new1>"])
    flips = []
    assert len(calls["resized"]) == len(calls["encoded"]) == len(calls["batches"]) == 12
    for resized, encoded, batch in zip(*calls.values(), strict=True):
        pixels, flipped, images, _, prefixes = resized
        assert torch.equal(encoded[0], images)  # the rescaled images are what is encoded
        assert torch.equal(batch.latents[:2], encoded[1])  # ... and what the UNet sees
        flips += flipped.tolist()
        for i, image in enumerate(pixels):
            (which,) = [k for k, ref in enumerate(data.pixels) if torch.equal(ref, image)]
            caption = data.descriptions[which].replace("[V]", "<new1>")
            own = tokenize(c.tokenizer, [PREFIXES[prefixes[i]] + caption])[0]
            assert torch.equal(batch.input_ids[i], own)
    assert set(flips) == {True, False}  # the draws' flips reach the augmentation


def test_custom_diffusions_rescaling_and_a_subject_mask_are_refused(
    subject: SimpleNamespace, tmp_path: Path
) -> None:
    with pytest.raises(SidpipeError, match="resize augmentation and masked: true"):
        run(subject, tmp_path, "custom_diffusion", {**CUSTOM_DIFFUSION, "masked": True})


@pytest.mark.parametrize("resize", [True, False])
def test_a_caption_the_rescaling_prefix_pushes_past_77_tokens_is_named(
    subject: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture, resize: bool
) -> None:
    """A description that fits CLIP's 77 tokens alone but not behind "a far away " loses its
    end only when the augmentation prefixes it: the warning must name that caption then."""
    tokenizer = load_sd_components(subject.sd, device="cpu").tokenizer
    tokenizer.add_tokens(["<new1>"])
    description = "a [V] mug"
    while len(tokenizer(description.replace("[V]", "<new1>")).input_ids) < 77:
        description += " on a table"
    while len(tokenizer(description.replace("[V]", "<new1>")).input_ids) > 77:
        description = description.rsplit(" ", 1)[0]
    rows = [{"image_id": i, "description": description} for i in subject.descriptions]
    write_csv(tmp_path / "long.csv", rows, ["image_id", "description"])
    settings = {**CUSTOM_DIFFUSION, "steps": 1, "resize_augmentation": resize}
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        run(subject, tmp_path, "custom_diffusion", settings, descriptions_csv=tmp_path / "long.csv")
    named = [r.getMessage() for r in caplog.records if "over the text encoder" in r.getMessage()]
    if resize:
        assert any("a far away a <new1> mug" in message for message in named), named
    else:
        assert named == []
