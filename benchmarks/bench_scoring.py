"""Images per second of `score_arm` (every image, segment and prompt encoded once, in batches)
against a naive scorer that re-encodes both images of every (generated, reference) pair, per
metric, and the prompt of every image. Same encoders, same files, same process. Prints JSON.

    python benchmarks/bench_scoring.py              # tiny random CLIP / DINO (CPU or GPU)
    python benchmarks/bench_scoring.py --real-size  # CLIP ViT-B/32 + DINO ViT-S/16 architectures,
                                                    # random weights, 224 px inputs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CORPUS = ["a photo of sks dog", "a sks dog in the jungle", "a dog in the jungle", "a red dog"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _tiny_encoders(tmp: Path, device: str, batch_size: int) -> Any:
    from sidpipe.metrics import Encoders
    from sidpipe.models import build_tiny_models

    models = build_tiny_models(tmp / "tiny", CORPUS)
    return Encoders.load(models["clip"], models["dino"], batch_size, device)


def _real_size_encoders(tmp: Path, device: str, batch_size: int) -> Any:
    """openai/clip-vit-base-patch32 and facebook/dino-vits16 architectures (their published
    configs; nothing can be downloaded) with random weights and 224 px processors. The
    tokenizer is a small CLIP-format BPE: only token ids < 49408 matter for speed."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessorPil,
        ViTModel,
    )
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from sidpipe.metrics import Encoders
    from sidpipe.models import train_clip_tokenizer

    tokenizer = train_clip_tokenizer(CORPUS, tmp / "tokenizer")
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    clip = CLIPModel(
        CLIPConfig(
            text_config={"vocab_size": 49408, **ids},  # defaults: ViT-B/32's 512-wide text tower
            vision_config={"image_size": 224, "patch_size": 32},  # defaults: ViT-B 768 x 12
            projection_dim=512,
        )
    )
    dino = ViTModel(
        ViTConfig(
            image_size=224,
            patch_size=16,
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=12,
            num_attention_heads=6,
        ),
        add_pooling_layer=False,
    )
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer)
    dino_processor = ViTImageProcessorPil(
        size={"height": 224, "width": 224},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )
    return Encoders(
        clip.eval().to(device), processor, dino.eval().to(device), dino_processor, batch_size
    )


def _noise(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def write_arm(root: Path, n_generated: int, n_references: int, size: int) -> tuple[Path, ...]:
    """Noise images laid out like sample_arm / prepare_references / segment_references."""
    from sidpipe.io import write_csv

    samples, masks, refs = root / "samples", root / "masks", root / "refs"
    for folder in (samples, masks / "subject", masks / "non_subject", refs / "images"):
        folder.mkdir(parents=True)
    ref_rows, mask_rows = [], []
    for i in range(n_references):
        image_id = f"ref{i}"
        _noise(1000 + i, size).save(refs / "images" / f"{image_id}.png")
        _noise(2000 + i, 224).save(masks / "subject" / f"{image_id}.png")
        _noise(3000 + i, size).save(masks / "non_subject" / f"{image_id}.png")
        ref_rows.append({"subject": "dog", "image_id": image_id, "path": f"images/{image_id}.png"})
        mask_rows.append(
            {"subject": "dog", "image_id": image_id}
            | {"subject_segment_path": f"subject/{image_id}.png"}
            | {"non_subject_segment_path": f"non_subject/{image_id}.png"}
        )
    write_csv(refs / "manifest.csv", ref_rows, ["subject", "image_id", "path"])
    fields = ["subject", "image_id", "subject_segment_path", "non_subject_segment_path"]
    write_csv(masks / "manifest.csv", mask_rows, fields)
    prompts = [("a sks dog in the jungle", "a dog in the jungle"), ("a red sks dog", "a red dog")]
    rows = []
    for i in range(n_generated):
        prompt_id, seed = i % len(prompts), i // len(prompts)
        name = f"{prompt_id:02d}_{seed:02d}.png"
        _noise(i, size).save(samples / name)
        rows.append(
            {"prompt_id": prompt_id, "prompt": prompts[prompt_id][0]}
            | {"prompt_plain": prompts[prompt_id][1], "seed": seed, "path": name}
        )
    write_csv(
        samples / "manifest.csv", rows, ["prompt_id", "prompt", "prompt_plain", "seed", "path"]
    )
    return samples, masks, refs


def _load(path: Path) -> Image.Image:
    with Image.open(path) as handle:
        return handle.convert("RGB")


def naive_scores(samples: Path, masks: Path, refs: Path, enc: Any) -> dict[str, list[float]]:
    """What a first script does: for each generated image and reference, open and encode both
    images per metric; encode each image's prompt on its own."""
    from sidpipe.io import read_csv

    rows = read_csv(samples / "manifest.csv")
    ref_rows = read_csv(refs / "manifest.csv")
    seg_rows = {r["image_id"]: r for r in read_csv(masks / "manifest.csv")}
    out: dict[str, list[float]] = {m: [] for m in ("SA", "NSD", "TA", "CLIP-I", "DINO")}

    def pair(encode: Any, a: Path, b: Path) -> float:
        emb = encode([_load(a), _load(b)])
        return float(emb[0] @ emb[1])

    for row in rows:
        gen = samples / row["path"]
        sums = dict.fromkeys(("SA", "NSD", "CLIP-I", "DINO"), 0.0)
        for ref in ref_rows:
            seg = seg_rows[ref["image_id"]]
            sums["SA"] += pair(enc.encode_images, gen, masks / seg["subject_segment_path"])
            sums["NSD"] += pair(enc.encode_images, gen, masks / seg["non_subject_segment_path"])
            sums["CLIP-I"] += pair(enc.encode_images, gen, refs / ref["path"])
            sums["DINO"] += pair(enc.encode_dino, gen, refs / ref["path"])
        n = len(ref_rows)
        out["SA"].append(sums["SA"] / n)
        out["NSD"].append(1 - sums["NSD"] / n)
        out["CLIP-I"].append(sums["CLIP-I"] / n)
        out["DINO"].append(sums["DINO"] / n)
        text = enc.encode_texts([row["prompt_plain"]])[0]
        out["TA"].append(float(enc.encode_images([_load(gen)])[0] @ text))
    return out


def _timed(fn: Any, repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        result = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_scoring(
    real_size: bool = False,
    generated: int = 24,
    references: int = 4,
    batch_size: int = 32,
    repeats: int = 3,
    threads: int | None = None,
) -> dict:
    """Images/s of score_arm and of the naive pairwise scorer, their ratio and agreement."""
    from sidpipe.metrics import score_arm

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 512 if real_size else 64  # the paper's / the demo's sample and reference resolution
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        build = _real_size_encoders if real_size else _tiny_encoders
        enc = build(tmp, device, batch_size)
        dirs = write_arm(tmp / "arm", generated, references, size)

        def batched() -> list[dict]:
            return score_arm(
                *dirs, "dog", "bench", "sid", "standard", "", "dino", batch_size, encoders=enc
            )

        batched()  # warm-up (kernels, allocator, lazy imports) outside the timings
        naive_scores(*dirs, enc)
        fast_s, rows = _timed(batched, repeats)
        naive_s, naive = _timed(lambda: naive_scores(*dirs, enc), repeats)
        worst = 0.0
        for metric, values in naive.items():
            ours = [r["value"] for r in rows if r["metric"] == metric]
            worst = max(worst, float(np.max(np.abs(np.subtract(ours, values)))))
    return {
        "name": "scoring_real_size" if real_size else "scoring_tiny",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "models": "CLIP ViT-B/32 + DINO ViT-S/16 (random weights)" if real_size else "tiny",
        "generated_images": generated,
        "references": references,
        "image_size": size,
        "batch_size": batch_size,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "score_arm": {"seconds": round(fast_s, 4), "images_per_s": round(generated / fast_s, 2)},
        "naive_pairwise": {
            "seconds": round(naive_s, 4),
            "images_per_s": round(generated / naive_s, 2),
        },
        "speedup": round(naive_s / fast_s, 2),
        # Both paths compute the same cosines; differences are float32 batch effects plus
        # score_arm's rounding to 6 decimals.
        "max_abs_diff_vs_naive": float(f"{worst:.2e}"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-size", action="store_true", help="ViT-B/32 + ViT-S/16, 224 px")
    parser.add_argument("--generated", type=int, default=24)
    parser.add_argument("--references", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = bench_scoring(
        real_size=args.real_size,
        generated=args.generated,
        references=args.references,
        batch_size=args.batch_size,
        repeats=args.repeats,
        threads=args.threads,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
