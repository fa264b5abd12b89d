"""The training-memory count (`sidpipe.training.memory`) on tiny models: live-storage
bookkeeping, fake tensors counting what real tensors use, and what each memory option saves."""

from __future__ import annotations

import pytest
import torch

from sidpipe.tiny_models import build_tiny_models
from sidpipe.training.memory import (
    LiveTensorBytes,
    components_from_configs,
    estimate_training_memory,
)

DREAMBOOTH = {"train_text_encoder": True, "prior_preservation": True, "batch_size": 1}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_models(root, ["a photo of a sks dog", "a dog on a sofa"])["sd"]


def estimate(sd: str, **kwargs) -> dict:
    options = {"n_references": 3, "n_class_images": 4, **kwargs}
    settings = options.pop("settings", DREAMBOOTH)
    return estimate_training_memory(
        lambda: components_from_configs(sd), "dreambooth", settings, 64, **options
    )


def test_live_bytes_count_each_storage_once_until_freed() -> None:
    tracker = LiveTensorBytes()
    with tracker:
        a = torch.zeros(1000)
        views = [a[10:20], a.view(10, 100), a[::2]]
        assert tracker.current == 4000  # views share the storage
        b = torch.ones(250, dtype=torch.float16)
        assert tracker.current == 4500
        del a, views
        assert tracker.current == 500
    outside = torch.zeros(100)  # e.g. pixels kept on the host
    tracker.exclude(outside)
    with tracker:
        outside[:10].add_(1)
    assert tracker.current == 500 and tracker.peak == 4500
    del b
    assert tracker.current == 0


def test_fake_tensors_count_what_real_tensors_use(tiny_sd: str) -> None:
    fake = estimate(tiny_sd)
    real = estimate(tiny_sd, fake=False)
    assert fake["weights_bytes"] == real["weights_bytes"]
    assert fake["optimizer_state_bytes"] == real["optimizer_state_bytes"]
    assert abs(fake["peak_bytes"] - real["peak_bytes"]) <= 0.01 * real["peak_bytes"]


def test_the_count_adds_up_weights_gradients_and_adam_states(tiny_sd: str) -> None:
    components = components_from_configs(tiny_sd)
    models = (components.unet, components.text_encoder, components.vae)
    tensors = [t for m in models for t in (*m.parameters(), *m.buffers())]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    trainable = [*components.unet.parameters(), *components.text_encoder.parameters()]
    n = sum(p.numel() for p in trainable)
    result = estimate(tiny_sd)
    assert result["weights_bytes"] == weights
    assert result["trainable_parameters"] == n
    # AdamW: two float32 moments per parameter and a float32 step counter per tensor
    assert result["optimizer_state_bytes"] == 8 * n + 4 * len(trainable)
    # the optimizer step holds the weights (the VAE has left), gradients and both moments
    vae = sum(t.numel() * t.element_size() for t in components.vae.parameters())
    assert result["peak_bytes"] >= weights - vae + 4 * n + result["optimizer_state_bytes"]
    # 3 references + 4 class images: the posterior's mean and std at 8x8x4, float32
    assert result["latent_cache_bytes"] == 7 * 2 * 4 * 8 * 8 * 4
    flipped = estimate(tiny_sd, settings={**DREAMBOOTH, "flip": True})
    assert flipped["latent_cache_bytes"] == 2 * result["latent_cache_bytes"]


def test_memory_options_lower_what_they_should(tiny_sd: str) -> None:
    plain = estimate(tiny_sd)
    adam8 = estimate(tiny_sd, use_8bit_adam=True)
    checkpointed = estimate(tiny_sd, gradient_checkpointing=True)
    assert adam8["optimizer_state_bytes"] < plain["optimizer_state_bytes"] / 2.5
    assert adam8["peak_bytes"] < plain["peak_bytes"]
    assert checkpointed["activation_bytes"] < plain["activation_bytes"] / 2
    assert checkpointed["optimizer_state_bytes"] == plain["optimizer_state_bytes"]


def test_custom_diffusions_rescaling_keeps_the_vae_on_the_device(tiny_sd: str) -> None:
    """The resize augmentation encodes the batch's rescaled references at every step, so the
    VAE cannot leave the device once the (class images') cache is full."""
    settings = {"learning_rate": 1e-5, "batch_size": 2, "prior_preservation": True}

    def count(**extra) -> dict:
        return estimate_training_memory(
            lambda: components_from_configs(tiny_sd),
            "custom_diffusion",
            {**settings, **extra},
            64,
            n_references=3,
            n_class_images=4,
        )

    resized, whole = count(), count(resize_augmentation=False)
    vae = components_from_configs(tiny_sd).vae
    vae_bytes = sum(t.numel() * t.element_size() for t in vae.parameters())
    assert resized["latent_cache_bytes"] == whole["latent_cache_bytes"]
    assert resized["peak_bytes"] >= whole["peak_bytes"] + vae_bytes
    real = estimate_training_memory(
        lambda: components_from_configs(tiny_sd),
        "custom_diffusion",
        settings,
        64,
        n_references=3,
        n_class_images=4,
        fake=False,
    )
    assert abs(resized["peak_bytes"] - real["peak_bytes"]) <= 0.01 * real["peak_bytes"]
