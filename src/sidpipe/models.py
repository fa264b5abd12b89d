"""One loading path for every model: a config string handed to the library's `from_pretrained`.

On the cluster the string is a hub id; in tests and the demo it is a local folder written by
`build_tiny_models` (`sidpipe.tiny_models`), which saves tiny *random* models of the very same
classes with `save_pretrained`, so the demo exercises exactly the code the real runs use.

Imports follow use: this module imports no ML library at its top; each loader imports what
its model needs when it is called. So scoring (CLIP, DINO) and masking (GroundingDINO, SAM) never
import diffusers, and importing `sidpipe.models` itself costs nothing. Every job is a fresh
process: an import at a module's top is paid by every job that imports the module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .io import SidpipeError, expand_home, log, looks_local

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import (
        CLIPModel,
        CLIPProcessor,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SamModel,
        SamProcessor,
        ViTImageProcessorPil,
        ViTModel,
    )

# DDIM with the noise schedule Stable Diffusion v1 was trained with.
SD_SCHEDULER_KWARGS: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

_DTYPES = ("float32", "float16", "bfloat16")

# The tiny model builders moved to sidpipe.tiny_models; these names still resolve from here.
_TINY = (
    "build_tiny_models",
    "train_clip_tokenizer",
    "train_bert_tokenizer",
    "BOS",
    "EOS",
    "MAX_LENGTH",
)


def __getattr__(name: str) -> Any:
    if name in _TINY:
        from . import tiny_models

        return getattr(tiny_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- what a job's process does first ------------------------------------------------------

_bitsandbytes_hidden = False


def setup_job(threads: int) -> None:
    """First thing in a job's process (the adapters call it): torch runs on the job's
    `threads`, and bitsandbytes is hidden (`hide_bitsandbytes`).

    `threads` is Snakemake's (1 unless a rule or `--set-threads` says more; on SLURM the job's
    CPUs). torch would otherwise start one OpenMP thread per core in every job, and jobs running
    side by side spin against each other: on a busy 2-core machine a tiny pipeline call took
    0.7-3.8 s on 2 threads against 0.07 s on 1. Set before torch is imported (OpenMP reads
    OMP_NUM_THREADS when it loads), and on torch too if it already is.
    """
    threads = max(1, int(threads))
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    hide_bitsandbytes()
    quiet_torchvision_fallback()


def hide_bitsandbytes() -> None:
    """Make this process see bitsandbytes as not installed, unless it is imported already.

    diffusers (its quantizer module) and peft (`peft.helpers`) import bitsandbytes whenever it is
    installed, and bitsandbytes imports torch._inductor: 1-2 s of every job, though only 8-bit
    Adam (and quantized loading, which sidpipe never does) uses it. A `None` entry in
    `sys.modules` is Python's own "not importable" marker: `importlib.util.find_spec` returns
    None for it, so both libraries take their no-bitsandbytes path. `import_bitsandbytes`
    undoes it where 8-bit Adam is on. Jobs call it (through `setup_job`); library code never.
    """
    global _bitsandbytes_hidden
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
        _bitsandbytes_hidden = True


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' "`X` requires torchvision (not installed); falling back to `XPil`"."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("requires torchvision" in message and "falling back to" in message)


# The logger that warns: diffusers' pipelines import `CLIPImageProcessor` and
# `SiglipImageProcessor` (every sampling job), which resolve through transformers' import_utils.
_TORCHVISION_FALLBACK_LOGGER = "transformers.utils.import_utils"


def quiet_torchvision_fallback() -> None:
    """Keep transformers' torchvision-fallback warning out of job logs (jobs call it through
    `setup_job`; library code never).

    sidpipe installs no torchvision on purpose (README, "Dependencies": no CPU build, and the CUDA
    one fails to import beside CPU torch), so the PIL image processors the warning falls back to
    are the ones meant. The warning told every sampling job's log to install torchvision, the
    one fix that breaks the environment. Only that message is dropped; other warnings pass.
    """
    logger = logging.getLogger(_TORCHVISION_FALLBACK_LOGGER)
    if not any(isinstance(f, _TorchvisionFallbackFilter) for f in logger.filters):
        logger.addFilter(_TorchvisionFallbackFilter())


def import_bitsandbytes() -> Any:
    """bitsandbytes, imported for real even after `hide_bitsandbytes` (ImportError where it is
    not installed, or was made unimportable other than by `hide_bitsandbytes`)."""
    global _bitsandbytes_hidden
    if _bitsandbytes_hidden and sys.modules.get("bitsandbytes", False) is None:
        del sys.modules["bitsandbytes"]
    _bitsandbytes_hidden = False
    import bitsandbytes

    return bitsandbytes


# --- devices and dtypes --------------------------------------------------------------------


def torch_dtype(name: str) -> torch.dtype:
    """Map a config dtype name ("float32", "float16", "bfloat16") to a torch dtype."""
    if name not in _DTYPES:
        raise SidpipeError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    import torch

    return getattr(torch, name)


def pick_device(prefer: str = "auto") -> torch.device:
    """'auto' gives cuda when available, else cpu (`refuse_unusable_gpu` first); an explicit
    device must exist."""
    import torch

    if prefer == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        refuse_unusable_gpu()
        return torch.device("cpu")
    device = torch.device(prefer)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SidpipeError(f"device {prefer!r} requested but CUDA is not available; use 'auto'")
    return device


def refuse_unusable_gpu() -> None:
    """Raise where a GPU was given to this process (CUDA_VISIBLE_DEVICES names one, as SLURM
    sets it for a job's --gpus) and torch is a CUDA build, yet CUDA does not work (a driver
    older than the wheels' CUDA, a broken node): "auto" would run the job on the CPU, where a
    real-size job ends only at its time limit, on every retry. A CPU build of torch (`make
    install`'s default: the demo, the tests, the test cluster's fake GPU) runs on the CPU."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if torch.version.cuda is None or visible in ("", "-1", "NoDevFiles"):
        return
    raise SidpipeError(
        f"a GPU was given to this job (CUDA_VISIBLE_DEVICES={visible}) and torch "
        f"{torch.__version__} is built for CUDA {torch.version.cuda}, but CUDA does not work "
        "here (a warning from torch above may say why): check `nvidia-smi` on the node against "
        "the wheels' CUDA (envs/gpu.yaml); on the CPU the job would run until its time limit"
    )


# Where the base model's string comes from: the paper's arms and the encoder arms' own setting.
SD_SOURCE = "config key models.base, or an encoder method's base_model"


@contextlib.contextmanager
def _loading(what: str, model: str, source: str) -> Iterator[None]:
    """Turn any from_pretrained failure into an error naming the model string and where it is
    set (`source`, e.g. "config key models.clip"); `model` has its `~` expanded already."""
    if looks_local(model) and not Path(model).is_dir():
        # Otherwise the hub client reports a confusing "Repo id must be in the form ..." error.
        raise SidpipeError(
            f"{what}: model folder {model!r} ({source}) does not exist; "
            "point it at a hub id or a folder written by save_pretrained / build_tiny_models"
        )
    try:
        yield
    except Exception as err:
        raise SidpipeError(
            f"cannot load {what} from {model!r} ({source}): "
            f"{type(err).__name__}: {str(err).rstrip('.')}. It must be a Hugging Face hub id "
            "(already cached when HF_HUB_OFFLINE=1) or a local folder written by "
            "save_pretrained / build_tiny_models."
        ) from err


def _half_on_cpu(dtype: torch.dtype, device: torch.device) -> None:
    import torch

    if dtype != torch.float32 and device.type == "cpu":
        log.warning("%s on CPU is slow and some ops lack kernels; prefer float32 there", dtype)


# --- Stable Diffusion ----------------------------------------------------------------------


def load_sd_pipeline(
    model: str,
    dtype: str = "float32",
    device: str = "auto",
    *,
    source: str = SD_SOURCE,
    **components: Any,
) -> StableDiffusionPipeline:
    """Stable Diffusion pipeline with a DDIM scheduler and no safety checker, on `device`.

    `components` (e.g. `unet=`, `text_encoder=`: already loaded modules, such as a full
    fine-tune's) replace the base model's, which are then not loaded at all. `source` says
    where `model` was set, for the error when it cannot be loaded.
    """
    model = expand_home(model)
    dev, dt = pick_device(device), torch_dtype(dtype)
    _half_on_cpu(dt, dev)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    with _loading("the Stable Diffusion pipeline", model, source):
        scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler")
        # feature_extractor only feeds the safety checker; skipping it also avoids loading a
        # CLIP image processor (torchvision-backed by default in transformers 5).
        pipe = StableDiffusionPipeline.from_pretrained(
            model,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            dtype=dt,
            **components,
        )
    return pipe.to(dev)


def load_sd_components(model: str, dtype: str = "float32", device: str = "auto") -> SimpleNamespace:
    """What fine-tuning needs: tokenizer, text_encoder, vae, unet and a DDPM noise_scheduler."""
    model = expand_home(model)
    dev, dt = pick_device(device), torch_dtype(dtype)
    _half_on_cpu(dt, dev)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    with _loading("Stable Diffusion components", model, SD_SOURCE):
        parts = SimpleNamespace(
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dt),
            vae=AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dt),
            unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dt),
            # Training adds noise with the same schedule the sampler removes it with.
            noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler"),
        )
    for name in ("text_encoder", "vae", "unet"):
        getattr(parts, name).to(dev)
    return parts


# --- image and text encoders, detector, segmenter ------------------------------------------


def load_clip(model: str, device: str = "auto") -> tuple[CLIPModel, CLIPProcessor]:
    """CLIP model (eval mode) and its processor, with the PIL image backend (no torchvision)."""
    model = expand_home(model)
    dev = pick_device(device)
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    with _loading("the CLIP model", model, "config key models.clip"):
        clip = CLIPModel.from_pretrained(model)
        processor = CLIPProcessor(
            image_processor=AutoImageProcessor.from_pretrained(model, backend="pil"),
            tokenizer=CLIPTokenizer.from_pretrained(model),
        )
    return clip.eval().to(dev), processor


def load_dino(model: str, device: str = "auto") -> tuple[ViTModel, ViTImageProcessorPil]:
    """DINO ViT (eval mode, no pooler: use the CLS token) and its PIL-backed image processor."""
    model = expand_home(model)
    dev = pick_device(device)
    from transformers import AutoImageProcessor, ViTModel

    with _loading("the DINO model", model, "config key models.dino"):
        # DINO checkpoints carry no pooler weights; asking for one would add random layers.
        dino = ViTModel.from_pretrained(model, add_pooling_layer=False)
        processor = AutoImageProcessor.from_pretrained(model, backend="pil")
    return dino.eval().to(dev), processor


def _expect_model_type(model: str, expected: str) -> None:
    """Refuse a checkpoint of another architecture: from_pretrained would only warn and fill
    the whole model with random weights (a CLIP folder loads "fine" as SAM)."""
    from transformers import PreTrainedConfig

    found = PreTrainedConfig.get_config_dict(model)[0].get("model_type")
    if found != expected:
        raise ValueError(f"its config.json is for model_type {found!r}, not {expected!r}")


def load_grounding_dino(
    model: str, device: str = "auto"
) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """GroundingDINO detector (eval mode) and its processor, with the PIL image backend."""
    model = expand_home(model)
    dev = pick_device(device)
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
    )

    with _loading("the GroundingDINO detector", model, "config key models.grounding_dino"):
        _expect_model_type(model, "grounding-dino")
        detector = GroundingDinoForObjectDetection.from_pretrained(model)
        # Built from its parts, like CLIP's: AutoProcessor would hand `backend` to the tokenizer.
        processor = GroundingDinoProcessor(
            image_processor=AutoImageProcessor.from_pretrained(model, backend="pil"),
            tokenizer=AutoTokenizer.from_pretrained(model),
        )
    return detector.eval().to(dev), processor


def load_sam(model: str, device: str = "auto") -> tuple[SamModel, SamProcessor]:
    """SAM (eval mode) and its processor, with the PIL image backend (no torchvision)."""
    model = expand_home(model)
    dev = pick_device(device)
    from transformers import AutoImageProcessor, SamModel, SamProcessor

    with _loading("the SAM segmenter", model, "config key models.sam"):
        _expect_model_type(model, "sam")
        sam = SamModel.from_pretrained(model)
        processor = SamProcessor(
            image_processor=AutoImageProcessor.from_pretrained(model, backend="pil")
        )
    return sam.eval().to(dev), processor
