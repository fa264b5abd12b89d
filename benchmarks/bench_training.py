"""Training speed on tiny models (CPU): steps/s and peak memory per method, and the speed-up
that latent caching gives on the tiny DreamBooth step, measured in the same run.

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
DEMO = REPO / "demo"
METHODS = {
    "dreambooth": {"prior_preservation": True, "train_text_encoder": True},
    "dreambooth_lora": {"rank": 4, "prior_preservation": True},
    "custom_diffusion": {"prior_preservation": True, "batch_size": 2, "flip": True},
    "svdiff": {"prior_preservation": True, "learning_rate_1d": 1e-6},
    "textual_inversion": {},
}


def _subject(root: Path) -> dict:
    """Tiny models, the demo mug at 64 px, its Case-3 descriptions and two class images."""
    from sidpipe.class_images import generate_class_images
    from sidpipe.config import tokenizer_corpus
    from sidpipe.io import write_csv
    from sidpipe.models import build_tiny_models
    from sidpipe.references import prepare_references

    mug = DEMO / "subjects/red_mug"
    corpus = tokenizer_corpus([DEMO / "prompts.yaml", mug / "descriptions.yaml"], ["mug"], "sks")
    tiny = build_tiny_models(root / "tiny", corpus)
    prepare_references(mug, root / "refs", "red_mug", 64)
    table = yaml.safe_load((mug / "descriptions.yaml").read_text())
    rows = [{"image_id": k, "description": v["case3"]} for k, v in table.items()]
    write_csv(root / "descriptions.csv", rows, ["image_id", "description"])
    generate_class_images(tiny["sd"], "mug", root / "class", count=2, steps=2, resolution=64)
    return {"sd": tiny["sd"], "refs": root / "refs", "csv": root / "descriptions.csv"}


def _train(subject: dict, root: Path, algorithm: str, steps: int, cache: bool) -> dict:
    from sidpipe.training.loop import train_subject

    settings = {"steps": steps, "learning_rate": 1e-5, **METHODS[algorithm]}
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
        class_images_dir=root / "class",
        device="cpu",
        checkpoint_every=10_000,
        cache_latents=cache,
    )


def bench_training(steps: int = 40, repeats: int = 3) -> dict:
    import torch

    torch.set_num_threads(1)  # steadier timings on a shared 2-core machine
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subject = _subject(root)
        methods = {}
        for algorithm in METHODS:
            runs = [_train(subject, root, algorithm, steps, True) for _ in range(repeats)]
            methods[algorithm] = {
                "steps_per_second": round(
                    statistics.median(r["steps_per_second"] for r in runs), 2
                ),
                "peak_memory_mib": round(max(r["peak_memory_bytes"] for r in runs) / 2**20, 1),
            }
        # interleaved, so both variants see the same machine load
        cached, uncached = [], []
        for _ in range(repeats):
            cached.append(_train(subject, root, "dreambooth", steps, True)["steps_per_second"])
            uncached.append(_train(subject, root, "dreambooth", steps, False)["steps_per_second"])
    speedup = statistics.median(cached) / statistics.median(uncached)
    return {
        "name": "training_tiny_cpu",
        "steps": steps,
        "repeats": repeats,
        "methods": methods,
        "latent_caching": {
            "dreambooth_steps_per_second_cached": round(statistics.median(cached), 2),
            "dreambooth_steps_per_second_uncached": round(statistics.median(uncached), 2),
            "speedup": round(speedup, 2),
            "target": 1.3,
        },
        "note": "peak memory is the process's max RSS on CPU (CUDA max_memory_allocated on GPU)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(bench_training(args.steps, args.repeats), indent=2))


if __name__ == "__main__":
    main()
