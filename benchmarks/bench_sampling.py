"""Images per second of `sample_arm` (batched, prompt embeddings cached) against a naive loop
that calls the diffusers pipeline once per image: same model, prompts, seeds and steps, in the
same process. Both write PNGs. Prints JSON.

    python benchmarks/bench_sampling.py              # tiny random models (CPU or GPU)
    python benchmarks/bench_sampling.py --real-size  # SD-2.1-base architecture, random weights,
                                                     # fp16, CUDA only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _prompts(count: int) -> list[dict]:
    from sidpipe.sampling import expand_prompts

    templates = yaml.safe_load((REPO / "prompts/dreambooth.yaml").read_text())["object"]
    return expand_prompts(templates[:count], "dog", "sks")


def _tiny_pipe(tmp: Path, device: str) -> Any:
    from sidpipe.config import tokenizer_corpus
    from sidpipe.models import build_tiny_models
    from sidpipe.sampling import load_arm_pipeline

    corpus = tokenizer_corpus([REPO / "prompts/dreambooth.yaml"], ["dog"], "sks")
    models = build_tiny_models(tmp / "tiny", corpus)
    return load_arm_pipeline(models["sd"], None, None, "float32", device)


def real_size_modules(tmp: Path) -> dict[str, Any]:
    """Stable Diffusion 2.1-base's architecture (its published configs, written out here as
    nothing can be downloaded) with random weights, on the default device; the tokenizer is a
    small CLIP-format BPE (only token ids < 49408 matter for speed)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sidpipe.config import tokenizer_corpus
    from sidpipe.models import SD_SCHEDULER_KWARGS, train_clip_tokenizer

    # The evaluation prompts and the demo's descriptions (what the training benchmark
    # trains on) are whole tokens, so captions have realistic lengths, as with CLIP's vocabulary.
    texts = [
        REPO / "prompts/dreambooth.yaml",
        *sorted(REPO.glob("tests/data/tiny_demo/subjects/*/descriptions.yaml")),
    ]
    corpus = tokenizer_corpus(texts, ["dog", "mug"], "sks")
    tokenizer = train_clip_tokenizer(corpus, tmp / "tokenizer")
    text_encoder = CLIPTextModel(  # OpenCLIP ViT-H/14's text tower, penultimate layer kept
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "unet": unet,
        "vae": vae,
        "scheduler": DDIMScheduler(**SD_SCHEDULER_KWARGS),
    }


def real_size_pipe(tmp: Path, dtype: torch.dtype = torch.float16, device: str = "cuda") -> Any:
    """`real_size_modules` as a pipeline in `dtype` on `device`."""
    from diffusers import StableDiffusionPipeline

    modules = real_size_modules(tmp)
    for name in ("text_encoder", "unet", "vae"):  # each model (pipe.to(dtype) warns for the VAE)
        modules[name].to(device, dtype)
    pipe = StableDiffusionPipeline(
        **modules, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def naive_loop(
    pipe: Any, out: Path, prompts: list[dict], seeds: list[int], steps: int, cfg: float, res: int
) -> None:
    """What a first script does: one pipeline call (prompt re-encoded) per image."""
    out.mkdir(parents=True, exist_ok=True)
    for row in prompts:
        for seed in seeds:
            image = pipe(
                row["prompt"],
                generator=torch.Generator("cpu").manual_seed(seed),
                num_inference_steps=steps,
                guidance_scale=cfg,
                height=res,
                width=res,
            ).images[0]
            image.save(out / f"{row['prompt_id']:02d}_{seed:02d}.png")


def _max_pixel_diff(a: Path, b: Path) -> int:
    worst = 0
    for path in sorted(a.glob("*.png")):
        with Image.open(path) as x, Image.open(b / path.name) as y:
            diff = np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16))
            worst = max(worst, int(diff.max()))
    return worst


def _timed(fn: Any) -> tuple[float, float | None]:
    _sync()
    _reset_peak()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start, _peak_mib()


def bench_sampling(
    real_size: bool = False,
    prompts: int | None = None,
    seeds: int | None = None,
    steps: int | None = None,
    batch_sizes: list[int] | None = None,
    guidance_scale: float = 7.5,
    threads: int | None = None,
) -> dict:
    """Images/s of sample_arm (each batch size) and of the naive loop, and the speed-ups."""
    from sidpipe.sampling import sample_arm

    if real_size and not torch.cuda.is_available():
        return {"name": "sampling_real_size", "skipped": "no CUDA device"}
    if threads:
        torch.set_num_threads(threads)
    # Defaults: a quick real-size run (fits minutes on one GPU), a CPU-friendly tiny one.
    n_prompts, n_seeds = prompts or (2 if real_size else 5), seeds or (10 if real_size else 8)
    steps = steps or (20 if real_size else 10)
    batch_sizes = batch_sizes or ([5, 10] if real_size else [8, 20, 40])
    res = 512 if real_size else 64
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, seed_list = _prompts(n_prompts), list(range(n_seeds))
    images = n_prompts * n_seeds

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pipe = real_size_pipe(tmp) if real_size else _tiny_pipe(tmp, device)
        dtype = str(pipe.unet.dtype).removeprefix("torch.")
        # Warm-up (kernels, allocator, lazy imports) outside the timings.
        naive_loop(pipe, tmp / "warm", rows[:1], [0], steps, guidance_scale, res)

        naive_s, naive_peak = _timed(
            lambda: naive_loop(pipe, tmp / "naive", rows, seed_list, steps, guidance_scale, res)
        )
        result: dict[str, Any] = {
            "name": "sampling_real_size" if real_size else "sampling_tiny",
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "dtype": dtype,
            "resolution": res,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "prompts": n_prompts,
            "seeds": n_seeds,
            "images": images,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "naive": {"seconds": round(naive_s, 3), "images_per_s": round(images / naive_s, 3)},
            "batched": {},
        }
        if naive_peak is not None:
            result["naive"]["peak_gpu_mib"] = naive_peak
        for batch_size in batch_sizes:
            out = tmp / f"batched_{batch_size}"

            def run(out: Path = out, batch_size: int = batch_size) -> None:
                sample_arm(
                    "bench",
                    out,
                    rows,
                    seed_list,
                    None,
                    None,
                    "sks",
                    steps=steps,
                    guidance_scale=guidance_scale,
                    resolution=res,
                    batch_size=batch_size,
                    dtype=dtype,
                    pipe=pipe,
                )

            seconds, peak = _timed(run)
            entry = {
                "seconds": round(seconds, 3),
                "images_per_s": round(images / seconds, 3),
                "speedup_vs_naive": round(naive_s / seconds, 2),
                # Same seeds -> same starting latents in both paths: the images must agree.
                "max_pixel_diff_vs_naive": _max_pixel_diff(tmp / "naive", out),
            }
            if peak is not None:
                entry["peak_gpu_mib"] = peak
            result["batched"][str(batch_size)] = entry
            shutil.rmtree(out)
        best = max(result["batched"].values(), key=lambda e: e["speedup_vs_naive"])
        result["best_speedup"] = best["speedup_vs_naive"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-size", action="store_true", help="SD-2.1-base size, CUDA only")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, action="append", dest="batch_sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = bench_sampling(
        real_size=args.real_size,
        prompts=args.prompts,
        seeds=args.seeds,
        steps=args.steps,
        batch_sizes=args.batch_sizes,
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
