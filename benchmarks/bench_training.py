"""Training speed on tiny models (CPU): steps/s and peak memory per method (Custom Diffusion
also on whole images, without its resize augmentation), and the speed-up
that latent caching gives on the tiny DreamBooth step, measured in the same run, for the
paper's DreamBooth (text encoder trained: only the latents can be cached) and with a frozen text
encoder (latents and text embeddings cached). Beside the timings, the share of a DreamBooth
step's floating-point work that caching removes, counted for the tiny models at 64 px and for
SD-2.1-base's architecture at 512 px (on the meta device: no weights, no time), i.e. the
speed-up a compute-bound GPU step would approach.

    python benchmarks/bench_training.py [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests/data/tiny_demo"  # tiny random models at 64 px: the wave-1 demo
METHODS = {
    "dreambooth": {"prior_preservation": True, "train_text_encoder": True},
    "dreambooth_lora": {"rank": 4, "prior_preservation": True},
    "custom_diffusion": {"prior_preservation": True, "batch_size": 2, "flip": True},
    "svdiff": {"prior_preservation": True, "learning_rate_1d": 1e-6},
    "textual_inversion": {},
    "sefi_ide": {"stages": 5, "attention_weight": 0.003},
    "lego": {
        "masked": True,
        "positive_words": ["frozen", "icy"],
        "negative_words": ["hot", "green"],
    },
}


def demo_subject(
    root: Path,
    model_dir: str | None = None,
    resolution: int = 64,
    class_images: int = 2,
    device: str = "cpu",
) -> dict:
    """The demo mug at `resolution` px, its Case-3 descriptions and `class_images` class
    images from `model_dir` (default: tiny models built here)."""
    from sidpipe.class_images import generate_class_images
    from sidpipe.config import tokenizer_corpus
    from sidpipe.io import write_csv
    from sidpipe.masks import segment_references
    from sidpipe.models import build_tiny_models
    from sidpipe.references import prepare_references

    mug = DEMO / "subjects/red_mug"
    if model_dir is None:
        corpus = tokenizer_corpus(
            [DEMO / "prompts.yaml", mug / "descriptions.yaml"], ["mug"], "sks"
        )
        model_dir = build_tiny_models(root / "tiny", corpus)["sd"]
    prepare_references(mug, root / "refs", "red_mug", resolution)
    segment_references(root / "refs", root / "masks", "red_mug", "mug", backend="provided")
    table = yaml.safe_load((mug / "descriptions.yaml").read_text())
    rows = [{"image_id": k, "description": v["case3"]} for k, v in table.items()]
    write_csv(root / "descriptions.csv", rows, ["image_id", "description"])
    generate_class_images(
        model_dir,
        "mug",
        root / "class",
        count=class_images,
        steps=2,
        resolution=resolution,
        device=device,
    )
    return {
        "sd": model_dir,
        "refs": root / "refs",
        "csv": root / "descriptions.csv",
        "class": root / "class",
        "masks": root / "masks",
    }


def _train(
    subject: dict, root: Path, algorithm: str, steps: int, cache: bool, **overrides: object
) -> dict:
    from sidpipe.training.loop import train_subject

    settings = {"steps": steps, "learning_rate": 1e-5, **METHODS[algorithm], **overrides}
    name = f"{algorithm}-{cache}-{len(list(root.glob('*')))}"
    return train_subject(
        algorithm,
        settings,
        subject["sd"],
        subject["refs"],
        subject["csv"],
        root / name,
        root / f"{name}.ckpt",
        "sks",
        "mug",
        class_images_dir=subject["class"],
        masks_dir=subject["masks"],
        device="cpu",
        checkpoint_every=10_000,
        cache_latents=cache,
    )


def bench_training(steps: int = 40, repeats: int = 3) -> dict:
    import torch

    torch.set_num_threads(1)  # steadier timings on a shared 2-core machine
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subject = demo_subject(root)
        methods, speeds = {}, {}
        for algorithm in METHODS:
            runs = [_train(subject, root, algorithm, steps, True) for _ in range(repeats)]
            speeds[algorithm] = statistics.median(r["steps_per_second"] for r in runs)
            methods[algorithm] = {
                "steps_per_second": round(speeds[algorithm], 2),
                "peak_memory_mib": round(max(r["peak_memory_bytes"] for r in runs) / 2**20, 1),
            }
        # Custom Diffusion's resize augmentation encodes its references at every step: its cost
        # against whole, cached images, in the same run.
        whole = [
            _train(subject, root, "custom_diffusion", steps, True, resize_augmentation=False)
            for _ in range(repeats)
        ]
        speed = statistics.median(r["steps_per_second"] for r in whole)
        methods["custom_diffusion"]["whole_images_steps_per_second"] = round(speed, 2)
        methods["custom_diffusion"]["resize_augmentation_slowdown"] = round(
            speed / speeds["custom_diffusion"], 3
        )
        caching = {
            name: _caching_speedup(subject, root, steps, repeats, train_text_encoder=trains)
            for name, trains in CACHING_VARIANTS.items()
        }
        compute = {
            "tiny_64px": _compute_share(_tiny_components(subject["sd"]), 64),
            "sd21_base_512px": _compute_share(_real_size_components(root), 512),
        }
    return {
        "name": "training_tiny_cpu",
        "steps": steps,
        "repeats": repeats,
        "methods": methods,
        "latent_caching": {"target": 1.3, **caching},
        "caching_compute_share": compute,
        "note": "peak memory is the process's max RSS on CPU (CUDA max_memory_allocated on GPU)",
    }


# DreamBooth as in the paper (text encoder trained: the latents are cached, the text is not)
# and with a frozen text encoder (latents and text embeddings cached).
CACHING_VARIANTS = {
    "dreambooth_text_encoder_trained": True,
    "dreambooth_text_encoder_frozen": False,
}


def _caching_speedup(
    subject: dict, root: Path, steps: int, repeats: int, train_text_encoder: bool
) -> dict:
    cached, uncached = [], []
    for _ in range(repeats):  # interleaved, so both variants see the same machine load
        for cache, runs in ((True, cached), (False, uncached)):
            result = _train(
                subject, root, "dreambooth", steps, cache, train_text_encoder=train_text_encoder
            )
            runs.append(result["steps_per_second"])
    return {
        "steps_per_second_cached": round(statistics.median(cached), 2),
        "steps_per_second_uncached": round(statistics.median(uncached), 2),
        "speedup": round(statistics.median(cached) / statistics.median(uncached), 2),
    }


def _tiny_components(sd_dir: str) -> tuple:
    from sidpipe.models import load_sd_components

    c = load_sd_components(sd_dir, device="cpu")
    return c.vae, c.text_encoder, c.unet


def _real_size_components(root: Path) -> tuple:
    """SD-2.1-base's VAE, text encoder and UNet on the meta device (shapes only)."""
    import torch
    from bench_sampling import real_size_modules

    with torch.device("meta"):  # built there: no 5 GB of random weights first
        modules = real_size_modules(root / "real_size")
    return modules["vae"], modules["text_encoder"], modules["unet"]


def _compute_share(components: tuple, resolution: int) -> dict:
    """FLOPs of one DreamBooth step (1 instance + 1 class image, text encoder trained) with and
    without the VAE encode that caching removes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    vae, text_encoder, unet = components
    device = next(unet.parameters()).device
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pixels = torch.zeros(2, 3, resolution, resolution, device=device)
    latents = torch.zeros(2, 4, resolution // factor, resolution // factor, device=device)
    ids = torch.zeros(2, 77, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(pixels)
    encode = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        hidden = text_encoder(ids).last_hidden_state
        unet(latents, torch.tensor([1, 2], device=device), hidden).sample.sum().backward()
    step = counter.get_total_flops()
    return {
        "vae_encode_gflop": round(encode / 1e9, 2),
        "unet_text_encoder_forward_backward_gflop": round(step / 1e9, 2),
        "compute_bound_speedup": round((encode + step) / step, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(bench_training(args.steps, args.repeats), indent=2))


if __name__ == "__main__":
    main()
