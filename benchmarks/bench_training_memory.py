"""Peak GPU memory of training at Stable Diffusion 2.1-base's size (512 px), counted on fake
tensors (`sidpipe.training.memory`: shapes only, so it runs here, without a GPU, in seconds).

The paper's DreamBooth (config.yaml's settings: text encoder trained, prior preservation,
1 instance + 1 class image per step) with each combination of the memory options. (The other
methods train a small part of the model; their memory is far below DreamBooth's.)
Target: DreamBooth within 24 GiB with the documented options (fp16 autocast, gradient
checkpointing, 8-bit AdamW). The count is of live tensors, what `torch.cuda.max_memory_allocated`
reports less allocator rounding and cuDNN workspaces; `bench_training_real_size.py` measures
the same job on a GPU.

    python benchmarks/bench_training_memory.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

REPO = Path(__file__).resolve().parents[1]
TARGET_GIB = 24.0
# (mixed_precision, gradient_checkpointing, use_8bit_adam)
DREAMBOOTH_OPTIONS = [
    ("no", False, False),
    ("fp16", False, False),
    ("fp16", True, False),
    ("fp16", False, True),
    ("fp16", True, True),  # the documented 24 GB set-up (config.yaml, README)
]


def _builder(tmp: Path):
    from diffusers import DDPMScheduler

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_sampling import real_size_modules

    def build() -> SimpleNamespace:
        modules = real_size_modules(tmp)
        return SimpleNamespace(
            tokenizer=modules["tokenizer"],
            text_encoder=modules["text_encoder"],
            vae=modules["vae"],
            unet=modules["unet"],
            noise_scheduler=DDPMScheduler.from_config(modules["scheduler"].config),
        )

    return build


def _gib(n: int) -> float:
    return round(n / 2**30, 2)


def _estimate(build, method: dict, mixed: str, checkpointing: bool, adam8: bool) -> dict:
    from sidpipe.training.memory import estimate_training_memory

    settings = {k: v for k, v in method.items() if k != "algorithm"}
    start = time.perf_counter()
    result = estimate_training_memory(
        build,
        method["algorithm"],
        settings,
        resolution=512,
        mixed_precision=mixed,
        gradient_checkpointing=checkpointing,
        use_8bit_adam=adam8,
    )
    return {
        "mixed_precision": mixed,
        "gradient_checkpointing": checkpointing,
        "use_8bit_adam": adam8,
        "peak_gib": _gib(result["peak_bytes"]),
        "weights_gib": _gib(result["weights_bytes"]),
        "optimizer_state_gib": _gib(result["optimizer_state_bytes"]),
        "activations_gib": _gib(result["activation_bytes"]),
        "trainable_parameters": result["trainable_parameters"],
        "within_target": result["peak_bytes"] <= TARGET_GIB * 2**30,
        "count_seconds": round(time.perf_counter() - start, 1),
    }


def bench_training_memory() -> dict:
    methods = yaml.safe_load((REPO / "config.yaml").read_text())["methods"]
    with tempfile.TemporaryDirectory() as tmp:
        build = _builder(Path(tmp))
        dreambooth = [_estimate(build, methods["dreambooth"], *o) for o in DREAMBOOTH_OPTIONS]
    return {
        "name": "training_memory_sd21_base_512px",
        "target_gib": TARGET_GIB,
        "dreambooth": dreambooth,
        "counted": "live tensors on fake tensors (shapes only): 5 references + 200 class images "
        "cached, the VAE moved off the device, two optimizer steps",
        "not_counted": "CUDA context, allocator rounding/fragmentation, cuDNN workspaces",
    }


def main() -> None:
    print(json.dumps(bench_training_memory(), indent=2))


if __name__ == "__main__":
    main()
