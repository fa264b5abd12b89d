"""Custom Diffusion (Kumari et al., 2023), as diffusers' examples/custom_diffusion does it.

Trains the key/value projections of every UNet cross-attention (`attn2`), as
`CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False)` copies initialised from the
original `to_k` / `to_v`, plus the embedding of a new modifier token `<new1>` that replaces
`[V]` in the captions ("a [V] mug on a table" -> "a <new1> mug on a table"). The references
are rescaled at every step as the reference's dataset does (`sidpipe.training.augment`; the
loop applies it where `resize_augmentation` is on, the default).

`save` writes `pytorch_custom_diffusion_weights.safetensors` (the layout of
`UNet2DConditionModel.save_attn_procs`) and `<new1>.safetensors` (the layout
`pipe.load_textual_inversion` reads). Load the result over a base pipeline with::

    from sidpipe.training.custom_diffusion import CustomDiffusionTrainer
    pipe = CustomDiffusionTrainer.load_into(pipe, "results/train/custom_diffusion/sid/standard/cat")
    pipe("a <new1> cat on the beach")

`load_into` is sidpipe's loader. diffusers 0.42's `unet.load_attn_procs` cannot read this file:
without its private `_pipeline` argument it silently installs nothing, and with it it refuses a
safetensors file (which, as `save_attn_procs` writes it, lacks the weightless self-attention
entries). So the cross-attention processors are rebuilt here from the file, the other layers
keep theirs; the token goes through the public `pipe.load_textual_inversion`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from safetensors.torch import load_file, save_file

from sidpipe.training.base import PLACEHOLDER, Trainer, train_one_row

MODIFIER_TOKEN = "<new1>"
# The reference script's default `--initializer_token` (a rare word, "ktn+pll+ucd").
INITIALIZER_TOKEN = "ktn"
WEIGHT_NAME = "pytorch_custom_diffusion_weights.safetensors"
TOKEN_WEIGHT_NAME = f"{MODIFIER_TOKEN}.safetensors"
_PROC_SUFFIX = ".processor"
_EMBEDDING_KEY = f"text_encoder.{MODIFIER_TOKEN}"


def effective_learning_rate(settings: dict) -> float:
    """The `--scale_lr` rule of diffusers' train_custom_diffusion.py (its documented command
    enables it), followed as is: lr x gradient accumulation x batch size x processes (here one
    process without accumulation), and x2 with prior preservation, whose batches also hold as
    many class images. So the config's 1e-5
    at batch 2 with prior preservation trains at 4e-5. `scale_lr: false` opts out."""
    lr = float(settings["learning_rate"])
    if not settings.get("scale_lr", True):
        return lr
    lr *= int(settings.get("batch_size", 1))  # one process, no gradient accumulation here
    if settings.get("prior_preservation", False):
        lr *= 2.0
    return lr


class CustomDiffusionTrainer(Trainer):
    """Cross-attention K/V + a `<new1>` token embedding (see the module docstring)."""

    algorithm = "custom_diffusion"
    weight_files = (WEIGHT_NAME, TOKEN_WEIGHT_NAME)

    def __init__(
        self, components: SimpleNamespace, settings: dict, identifier: str, class_name: str
    ) -> None:
        super().__init__(components, settings, identifier, class_name)
        self.token_id: int | None = None
        self._processors: dict[str, CustomDiffusionAttnProcessor2_0] = {}
        self._original_embeddings: torch.Tensor | None = None

    @property
    def resize_augmentation(self) -> bool:
        """On unless `resize_augmentation: false`: the reference script's default (`--noaug`
        turns it off), and the official code's."""
        return bool(self.settings.get("resize_augmentation", True))

    @property
    def trains_text_encoder(self) -> bool:
        """True: the encoder's layers are frozen, but the `<new1>` embedding row trains, so the
        text embeddings change every step and the loop must not cache them."""
        return True

    def caption(self, description: str) -> str:
        """`[V]` becomes the modifier token (the configured identifier is not used)."""
        return description.replace(PLACEHOLDER, MODIFIER_TOKEN)

    def _embedding(self) -> torch.nn.Embedding:
        return self.c.text_encoder.get_input_embeddings()

    def _initial_embedding(self) -> torch.Tensor:
        """The rare word's embedding as in the reference; a tokenizer that splits it (the tiny
        test ones may) falls back to the mean embedding of the class word's tokens."""
        tokenizer, weight = self.c.tokenizer, self._embedding().weight
        ids = tokenizer.encode(INITIALIZER_TOKEN, add_special_tokens=False)
        if len(ids) != 1:
            ids = tokenizer.encode(self.class_name, add_special_tokens=False)
        return weight[ids].detach().mean(dim=0)

    def _add_modifier_token(self) -> None:
        tokenizer, text_encoder = self.c.tokenizer, self.c.text_encoder
        if tokenizer.add_tokens(MODIFIER_TOKEN) == 0:
            raise ValueError(f"the tokenizer already has {MODIFIER_TOKEN}; prepare() runs once")
        self.token_id = tokenizer.convert_tokens_to_ids(MODIFIER_TOKEN)
        # mean_resizing would draw from the global RNG (and build a covariance of the whole
        # vocabulary) for a row that is overwritten right away.
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        initial = self._initial_embedding()  # after resizing: resizing replaces the module
        weight = self._embedding().weight
        with torch.no_grad():
            weight[self.token_id] = initial
        train_one_row(weight, self.token_id)  # as the reference: only the new row's gradient
        self._original_embeddings = weight.detach().clone()

    def _add_processors(self) -> None:
        unet = self.c.unet
        processors: dict[str, Any] = {}
        for name in unet.attn_processors:
            attn = unet.get_submodule(name.removesuffix(_PROC_SUFFIX))
            if not attn.is_cross_attention:
                # As the reference: self-attention keeps the frozen projections.
                processors[name] = CustomDiffusionAttnProcessor2_0(
                    train_kv=False, train_q_out=False, hidden_size=attn.to_q.out_features
                )
                continue
            # Sizes from the layer itself (the reference derives them from block_out_channels).
            proc = CustomDiffusionAttnProcessor2_0(
                train_kv=True,
                train_q_out=False,
                hidden_size=attn.to_k.out_features,
                cross_attention_dim=attn.to_k.in_features,
            )
            proc.load_state_dict(
                {
                    "to_k_custom_diffusion.weight": attn.to_k.weight.detach().float(),
                    "to_v_custom_diffusion.weight": attn.to_v.weight.detach().float(),
                }
            )
            # Trainable copies stay float32 (the processor casts around them), as the reference.
            proc.to(attn.to_k.weight.device)
            processors[name] = proc
            self._processors[name] = proc
        unet.set_attn_processor(dict(processors))  # it pops from the dict it is given

    def prepare(self) -> list[dict]:
        for model in (self.c.unet, self.c.text_encoder, self.c.vae):
            model.requires_grad_(False)
        self._add_modifier_token()
        self._add_processors()
        # Train mode as the reference (it also lets transformers' gradient checkpointing act).
        self.c.unet.train()
        self.c.text_encoder.train()
        lr = effective_learning_rate(self.settings)
        kv = [p for proc in self._processors.values() for p in proc.parameters()]
        return [
            {"name": "cross_attention_kv", "params": kv, "lr": lr},
            {"name": "modifier_token", "params": [self._embedding().weight], "lr": lr},
        ]

    def trained_parameter_count(self, params: list[torch.Tensor]) -> int:
        weight = self._embedding().weight  # one row of it trains
        return super().trained_parameter_count(params) - weight.numel() + weight.shape[1]

    def after_step(self) -> None:
        """Put back every embedding row but `<new1>`'s: their gradients are zero, but AdamW's
        weight decay still shrinks them (the reference lets it)."""
        assert self._original_embeddings is not None, "prepare() first"
        weight = self._embedding().weight
        keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        keep[self.token_id] = False
        with torch.no_grad():
            weight[keep] = self._original_embeddings[keep].to(weight.dtype)

    def _processor_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": value.detach().cpu().contiguous()
            for name, proc in self._processors.items()
            for key, value in proc.state_dict().items()
        }

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"unet.{key}": value for key, value in self._processor_state().items()}
        state[_EMBEDDING_KEY] = self._embedding().weight[self.token_id].detach().cpu().clone()
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state())
        if set(state) != expected:
            raise KeyError(f"checkpoint keys differ: {sorted(set(state) ^ expected)[:5]}")
        weight = self._embedding().weight
        with torch.no_grad():
            weight[self.token_id] = state[_EMBEDDING_KEY].to(weight)
            for name, proc in self._processors.items():
                prefix = f"unet.{name}."
                proc.load_state_dict(
                    {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
                )

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # The tensors `unet.save_attn_procs(out_dir)` writes, without its warning about the
        # (weightless) self-attention processors it drops.
        save_file(self._processor_state(), str(out_dir / WEIGHT_NAME), metadata={"format": "pt"})
        row = self._embedding().weight[self.token_id].detach().float().cpu().clone()
        save_file({MODIFIER_TOKEN: row}, str(out_dir / TOKEN_WEIGHT_NAME))

    @staticmethod
    def load_into(pipe: Any, weights_dir: Path) -> Any:
        """Install the trained cross-attention processors in `pipe.unet` and add `<new1>` to
        its tokenizer / text encoder."""
        weights_dir = Path(weights_dir)
        unet = pipe.unet
        grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        names = set(unet.attn_processors)
        for key, value in load_file(str(weights_dir / WEIGHT_NAME)).items():
            name, _, sub = key.partition(_PROC_SUFFIX + ".")
            if name + _PROC_SUFFIX not in names:
                raise KeyError(f"{WEIGHT_NAME}: {key!r} names no attention layer of this UNet")
            grouped[name + _PROC_SUFFIX][sub] = value
        processors = dict(unet.attn_processors)
        for name, weights in grouped.items():
            to_k = weights["to_k_custom_diffusion.weight"]
            proc = CustomDiffusionAttnProcessor2_0(
                train_kv=True,
                train_q_out="to_q_custom_diffusion.weight" in weights,
                hidden_size=to_k.shape[0],
                cross_attention_dim=to_k.shape[1],
                out_bias="to_out_custom_diffusion.0.bias" in weights,
            )
            proc.load_state_dict(weights)
            processors[name] = proc.to(device=unet.device, dtype=unet.dtype)
        unet.set_attn_processor(processors)
        pipe.load_textual_inversion(
            str(weights_dir), weight_name=TOKEN_WEIGHT_NAME, token=MODIFIER_TOKEN
        )
        return pipe
