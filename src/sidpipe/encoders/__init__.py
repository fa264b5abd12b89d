"""Arms without per-subject training: encoder-based personalization baselines, and the base
model itself."""

# `methods.*.algorithm` values of the encoder arms (rule sample_encoder, no training job).
ENCODER_ALGORITHMS = ("blip_diffusion", "elite")
# The untrained base model on the prompts without the identifier ("a mug on the beach"): what
# the class word alone gives, so the floor of SA and subject_kept and the chance rate of each
# leak. No training job either; sampled by rule sample_encoder with the trained arms' seeds.
BASE_MODEL_ALGORITHM = "base_model"
UNTRAINED_ALGORITHMS = (*ENCODER_ALGORITHMS, BASE_MODEL_ALGORITHM)
# The settings of an encoder method that name models (hub ids or folders) its arm loads.
ENCODER_MODEL_KEYS = {"blip_diffusion": ("model",), "elite": ("base_model", "image_encoder")}
# What diffusers' BLIP-Diffusion Q-Former loads as its tokenizer when the checkpoint names none
# (the hub's checkpoint; the tiny one ships its own).
QFORMER_DEFAULT_TOKENIZER = "bert-base-uncased"
# ELITE's mapper files: not on the hub, so downloaded by hand (inputs of its jobs).
ELITE_MAPPER_KEYS = ("global_mapper", "local_mapper")
ELITE_MAPPERS_SOURCE = (
    'the official repository (github.com/csyxwei/ELITE, README "Pretrained Models")'
)

# Exported lazily (PEP 562): the modules import torch, transformers and diffusers, which a job
# that imports this package for something else should not pay for. name -> defining submodule.
_LAZY_EXPORTS = {
    "build_tiny_blip_diffusion": "tiny",
    "load_blip_diffusion": "blip_diffusion",
    "build_tiny_elite": "tiny",
    "load_elite": "elite",
}


def __getattr__(name: str) -> object:
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
