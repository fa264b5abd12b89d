"""SeFi-IDE ("Beyond Inserting", arXiv 2402.00631): an identity embedding that stays editable.

What the paper says (abstract and project page; no code or hyper-parameters are public):
  * the identifier is optimised as **per-stage tokens**: the denoising schedule is cut into
    stages, each with its own token, and "each token contains two disentangled features": one
    feeds the cross-attention keys, one the values;
  * a **face-wise attention loss** keeps the identifier's cross-attention on the subject's
    region instead of absorbing layout and background; lambda = 0.003 is the paper's best;
  * only the token embeddings train.

Our readings (each a setting):
  * `stages` (default 5) equal intervals of the training timesteps; stage s covers
    t in [s*T/S, (s+1)*T/S).
  * The two features are two input-embedding rows per stage, `<id_k{s}>` and `<id_v{s}>`. A
    prompt holds one placeholder token `<id>`; `SeFiTextEncoder` encodes it 2S times, with the
    placeholder's row replaced by each of the 2S trained rows, and returns the 2S text-encoder
    outputs side by side along the sequence (B, 2S*77, dim). `SeFiAttnProcessor` (on every
    cross-attention layer) takes the block of the current stage's K row for `to_k` and of its V
    row for `to_v`; the stage comes from the timestep, which a UNet forward pre-hook records.
    The same code runs in training and in any diffusers pipeline (`load_into`).
  * `attention_target: class_word` (default, after the project page): the identifier's maps
    under "a photo of [V] {class}" are pulled towards the class word's maps under "a photo of a
    {class}" (frozen target); `mask`: towards the subject's mask (the face-wise variant; the
    masks are this term's target only, the reconstruction fits the whole image).
    Maps are averaged over heads and over the cross-attention layers of one resolution
    (`attention_resolution`: "middle", the middle one of the UNet's, 16x16 on SD at 512 px, or
    a number), each divided by its maximum; the loss is their mean squared difference.
  * `initializer_word` (default the class name) initialises all 2S rows.

Load a result over a base pipeline::

    from sidpipe.training.sefi_ide import SeFiIdeTrainer
    pipe = SeFiIdeTrainer.load_into(pipe, "results/train/sefi_ide/sid/cat/weights")
    pipe("a photo of <sks> cat on the beach")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import BaseModelOutputWithPooling

from sidpipe.io import SidpipeError, log
from sidpipe.training.base import PLACEHOLDER, Batch, FrozenRows, Trainer, train_rows
from sidpipe.training.textual_inversion import placeholder_token

WEIGHT_NAME = "sefi_ide.safetensors"
DEFAULTS = {
    "stages": 5,
    "attention_weight": 0.003,
    "attention_target": "class_word",
    "attention_resolution": "middle",
    "learning_rate": 5e-3,
}


def variant_tokens(token: str, stages: int) -> list[str]:
    """`<sks>` -> [`<sks_k0>`, `<sks_v0>`, `<sks_k1>`, ...]: the K and V rows of each stage."""
    stem = token.strip("<>")
    return [f"<{stem}_{kind}{s}>" for s in range(stages) for kind in ("k", "v")]


def stage_of(timesteps: torch.Tensor, stages: int, num_train_timesteps: int) -> torch.Tensor:
    """The stage index of each timestep: equal intervals of [0, num_train_timesteps)."""
    index = torch.div(timesteps.long() * stages, num_train_timesteps, rounding_mode="floor")
    return index.clamp_(0, stages - 1)


class SeFiState:
    """What the processors share: the stage of each sample in the UNet call in flight, and,
    while `record` is a token position, the maps recorded there (name -> (B, N) per layer)."""

    def __init__(self, stages: int, num_train_timesteps: int) -> None:
        self.stages = stages
        self.num_train_timesteps = num_train_timesteps
        self.stage: torch.Tensor | None = None
        self.record: torch.Tensor | None = None  # (B,) token position per sample
        self.maps: dict[str, torch.Tensor] = {}

    def unet_pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        timestep = torch.as_tensor(timestep, device=sample.device).flatten()
        timestep = timestep.expand(sample.shape[0]) if timestep.numel() == 1 else timestep
        self.stage = stage_of(timestep, self.stages, self.num_train_timesteps)


class SeFiAttnProcessor:
    """Cross-attention whose keys come from the stage's K text features and values from its
    V text features; records the attention of `state.record`'s positions when asked."""

    def __init__(self, state: SeFiState, name: str) -> None:
        self.state = state
        self.name = name

    def key_value_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        variants = 2 * self.state.stages
        batch, length, dim = context.shape
        if length % variants or self.state.stage is None:
            raise SidpipeError(
                f"SeFi-IDE cross-attention got encoder states of length {length}, not 2 x "
                f"{self.state.stages} stages x the prompt length: encode prompts through the "
                "pipeline's SeFiTextEncoder (SeFiIdeTrainer.load_into installs it)"
            )
        blocks = context.view(batch, variants, length // variants, dim)
        rows = torch.arange(batch, device=context.device)
        stage = self.state.stage.to(context.device)
        return blocks[rows, 2 * stage], blocks[rows, 2 * stage + 1]

    def key_context(self, context: torch.Tensor) -> torch.Tensor:
        """The keys' text features (what attention maps are computed against)."""
        return self.key_value_context(context)[0]

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise SidpipeError(f"{self.name}: SeFiAttnProcessor serves cross-attention only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        key_context, value_context = self.key_value_context(encoder_hidden_states)
        if attn.norm_cross:
            key_context = attn.norm_encoder_hidden_states(key_context)
            value_context = attn.norm_encoder_hidden_states(value_context)
        query = attn.to_q(hidden_states)
        key = attn.to_k(key_context)
        value = attn.to_v(value_context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if self.state.record is not None:
            # Explicit softmax: the recorded probabilities must be the ones used, with grad.
            scores = query @ key.transpose(-1, -2) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            rows = torch.arange(batch, device=probs.device)
            position = self.state.record.to(probs.device)
            self.state.maps[self.name] = probs.mean(dim=1)[rows, :, position]  # (B, N)
            out = probs.to(value.dtype) @ value
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SeFiTextEncoder(torch.nn.Module):
    """A CLIP text encoder that returns, for every prompt, its 2S variants (the placeholder's
    row replaced by each stage's K and V rows) side by side: (B, 2S*L, dim). Prompts without
    the placeholder give 2S equal copies."""

    def __init__(self, inner: Any, placeholder_id: int, variant_ids: list[int]) -> None:
        super().__init__()
        self.inner = inner
        self.placeholder_id = int(placeholder_id)
        self.register_buffer("variant_ids", torch.tensor(variant_ids), persistent=False)

    # what pipelines read from a text encoder
    config = property(lambda self: self.inner.config)
    text_model = property(lambda self: self.inner.text_model)
    dtype = property(lambda self: self.inner.dtype)
    device = property(lambda self: self.inner.device)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.inner.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        window = int(self.inner.config.max_position_embeddings)
        if input_ids.shape[1] > window:
            # Pipelines tokenize the negative prompt to the positive embeddings' length (2S x
            # the window here): keep the window, ending in EOS as a 77-token truncation would.
            cut = input_ids[:, :window].clone()
            overflow = (input_ids[:, window:] != input_ids[:, -1:]).any(dim=1)
            cut[overflow, -1] = int(self.inner.config.eos_token_id)
            input_ids = cut
            if attention_mask is not None:
                attention_mask = attention_mask[:, :window]
        batch, length = input_ids.shape
        variants = len(self.variant_ids)
        expanded = input_ids[:, None, :].repeat(1, variants, 1)
        is_placeholder = expanded == self.placeholder_id
        replacement = self.variant_ids.to(input_ids.device)[None, :, None].expand_as(expanded)
        expanded = torch.where(is_placeholder, replacement, expanded).view(-1, length)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(variants, dim=0)
        out = self.inner(
            expanded, attention_mask=attention_mask, output_hidden_states=output_hidden_states
        )

        def side_by_side(states: torch.Tensor) -> torch.Tensor:
            return states.reshape(batch, variants * length, states.shape[-1])

        hidden = out.hidden_states
        return BaseModelOutputWithPooling(
            last_hidden_state=side_by_side(out.last_hidden_state),
            pooler_output=out.pooler_output.view(batch, variants, -1)[:, 0],
            hidden_states=tuple(side_by_side(h) for h in hidden) if hidden is not None else None,
        )


def cross_attention_layers(unet: Any) -> dict[str, Any]:
    return {
        name: module
        for name, module in unet.named_modules()
        if name.endswith("attn2") and hasattr(module, "set_processor")
    }


def install(unet: Any, state: SeFiState) -> Any:
    """SeFi processors on every cross-attention layer and the timestep pre-hook on `unet`."""
    layers = cross_attention_layers(unet)
    if not layers:
        raise SidpipeError("the UNet has no cross-attention (attn2) layers for SeFi-IDE")
    for name, layer in layers.items():
        layer.set_processor(SeFiAttnProcessor(state, name))
    return unet.register_forward_pre_hook(state.unet_pre_hook, with_kwargs=True)


def layer_resolutions(unet: Any, latent_size: int) -> dict[str, int]:
    """Cross-attention layer -> the side of its query grid at `latent_size` latents."""
    out, size = {}, latent_size
    sizes = {}
    for i, block in enumerate(unet.down_blocks):
        sizes[f"down_blocks.{i}"] = size
        if getattr(block, "downsamplers", None):
            size //= 2
    sizes["mid_block"] = size
    for i, block in enumerate(unet.up_blocks):
        sizes[f"up_blocks.{i}"] = size
        if getattr(block, "upsamplers", None):
            size *= 2
    for name in cross_attention_layers(unet):
        out[name] = next(v for k, v in sizes.items() if name.startswith(k + "."))
    return out


def chosen_layers(unet: Any, latent_size: int, resolution: str | int) -> list[str]:
    """The layers whose maps the attention loss reads: those of one resolution."""
    sides = layer_resolutions(unet, latent_size)
    available = sorted(set(sides.values()), reverse=True)
    if resolution == "middle":
        side = available[len(available) // 2]
    else:
        side = min(available, key=lambda s: abs(s - int(resolution)))
        if side != int(resolution):
            log.warning(
                "no cross-attention at %sx%s; using %dx%d", resolution, resolution, side, side
            )
    return [name for name, s in sides.items() if s == side]


def normalised_map(maps: list[torch.Tensor]) -> torch.Tensor:
    """Layer maps (each (B, N)) -> their mean, each sample divided by its maximum."""
    mean = torch.stack(maps).mean(dim=0)
    return mean / mean.amax(dim=-1, keepdim=True).clamp_min(1e-12)


def attention_alignment_loss(
    identifier_map: torch.Tensor, target_map: torch.Tensor
) -> torch.Tensor:
    """Mean squared difference of two max-normalised maps (B, N); the target is not trained."""
    return F.mse_loss(identifier_map.float(), target_map.detach().float())


class SeFiIdeTrainer(Trainer):
    """Trains the 2S K/V rows; saves `sefi_ide.safetensors` (k, v: (S, dim)) with metadata."""

    algorithm = "sefi_ide"
    weight_files = (WEIGHT_NAME,)
    max_grad_norm = 0.0  # as textual inversion
    log_fields = ("attention_loss",)

    def __init__(self, components: Any, settings: dict, identifier: str, class_name: str) -> None:
        super().__init__(components, {**DEFAULTS, **settings}, identifier, class_name)
        self.token = placeholder_token(identifier)
        self.stages = int(self.settings["stages"])
        if self.stages < 1:
            raise SidpipeError(f"sefi_ide setting stages must be at least 1, got {self.stages}")
        target = self.settings["attention_target"]
        if target not in ("class_word", "mask"):
            raise SidpipeError(
                f"sefi_ide setting attention_target must be class_word or mask, got {target!r}"
            )
        self.needs_masks = target == "mask" and float(self.settings["attention_weight"]) > 0
        self.variants = variant_tokens(self.token, self.stages)

    @property
    def trains_text_encoder(self) -> bool:
        return True  # only 2S rows train, but the encoder's outputs change: nothing to cache

    def caption(self, description: str) -> str:
        return description.replace(PLACEHOLDER, self.token)

    @property
    def _embeddings(self) -> torch.nn.Embedding:
        return self.c.text_encoder.get_input_embeddings()

    def prepare(self) -> list[dict]:
        c = self.c
        added = c.tokenizer.add_tokens([self.token, *self.variants])
        if added != 1 + len(self.variants):
            raise SidpipeError(
                f"sefi_ide tokens {self.token!r}/{self.variants[0]!r}... are already in the "
                "tokenizer's vocabulary; choose another identifier in the config"
            )
        ids = c.tokenizer.convert_tokens_to_ids([self.token, *self.variants])
        self.placeholder_id, self.variant_ids = ids[0], ids[1:]
        word = self.settings.get("initializer_word") or self.class_name
        init_ids = c.tokenizer(word, add_special_tokens=False).input_ids
        if not init_ids:
            raise SidpipeError(f"sefi_ide initializer_word {word!r} tokenizes to nothing")
        c.text_encoder.resize_token_embeddings(len(c.tokenizer), mean_resizing=False)
        weight = self._embeddings.weight
        with torch.no_grad():
            weight[ids] = weight[init_ids].mean(dim=0)
        for module in (c.vae, c.unet, c.text_encoder):
            module.requires_grad_(False)
        train_rows(weight, self.variant_ids)
        self._frozen_rows = FrozenRows(weight, self.variant_ids)
        c.text_encoder.train()
        self.encoder = SeFiTextEncoder(c.text_encoder, self.placeholder_id, self.variant_ids)
        self.state = SeFiState(self.stages, int(c.noise_scheduler.config.num_train_timesteps))
        install(c.unet, self.state)
        return [{"params": [weight], "lr": float(self.settings["learning_rate"])}]

    def trained_parameter_count(self, params: list[torch.Tensor]) -> int:
        return len(self.variant_ids) * self._embeddings.weight.shape[1]

    def after_step(self) -> None:
        self._frozen_rows.restore(self._embeddings.weight)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids).last_hidden_state

    # --- the attention loss ---------------------------------------------------------------

    def _prompt_ids(self, text: str, batch: int, device: torch.device) -> torch.Tensor:
        tok = self.c.tokenizer
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True)
        return torch.tensor([ids.input_ids] * batch, device=device)

    def _position(self, ids: torch.Tensor, token_ids: list[int], what: str) -> torch.Tensor:
        """The first position of `token_ids` (a word's sub-tokens: its first) in each row."""
        hits = (ids[0][:, None] == torch.tensor(token_ids, device=ids.device)).any(dim=1)
        if not hits.any():
            raise SidpipeError(f"sefi_ide: {what} is not in its attention prompt")
        return hits.nonzero()[0].expand(ids.shape[0])

    def _maps(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, ids: torch.Tensor, at: torch.Tensor
    ) -> torch.Tensor:
        unet = self.c.unet
        # Gradient checkpointing would recompute this pass in backward without the record, so
        # through the other attention branch (a different graph): this pass keeps its
        # activations. The main pass's recompute reads the stage this pass would leave behind
        # (the pre-hook does not run again): it is put back.
        checkpointing = unet.is_gradient_checkpointing
        if checkpointing:
            unet.disable_gradient_checkpointing()
        stage = self.state.stage
        self.state.record, self.state.maps = at, {}
        try:
            unet(noisy, timesteps, self.encode_text(ids))
        finally:
            self.state.record, self.state.stage = None, stage
            if checkpointing:
                unet.enable_gradient_checkpointing()
        return normalised_map([self.state.maps[name] for name in self._layers])

    def compute_loss(
        self,
        batch: Batch,
        encoder_hidden_states: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        prior_loss_weight: float,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # The masks are the face-wise attention term's target; the reconstruction fits the whole
        # image as the paper's does (class_word keeps `masked: true`'s masked reconstruction).
        whole = self.settings["attention_target"] == "mask"
        loss, parts = super().compute_loss(
            dataclasses.replace(batch, masks=None) if whole else batch,
            encoder_hidden_states,
            noise,
            timesteps,
            prior_loss_weight,
        )
        weight = float(self.settings["attention_weight"])
        instance = ~batch.is_prior
        if weight == 0 or not instance.any():
            return loss, parts
        latents, eps, t = batch.latents[instance], noise[instance], timesteps[instance]
        if not hasattr(self, "_layers"):
            resolution = self.settings["attention_resolution"]
            self._layers = chosen_layers(self.c.unet, latents.shape[-1], resolution)
        noisy = self.c.noise_scheduler.add_noise(latents, eps, t)
        n = len(latents)
        ids = self._prompt_ids(f"a photo of {self.token} {self.class_name}", n, latents.device)
        identifier = self._maps(noisy, t, ids, self._position(ids, [self.placeholder_id], "[V]"))
        side = int(round(identifier.shape[-1] ** 0.5))
        if self.settings["attention_target"] == "mask":
            mask = F.interpolate(batch.masks[instance].float(), size=(side, side), mode="area")
            target = normalised_map([mask.flatten(1)])
        else:
            class_ids = self.c.tokenizer(self.class_name, add_special_tokens=False).input_ids
            ref = self._prompt_ids(f"a photo of a {self.class_name}", n, latents.device)
            with torch.no_grad():
                target = self._maps(noisy, t, ref, self._position(ref, class_ids, "the class word"))
        attention = attention_alignment_loss(identifier, target)
        parts["attention_loss"] = float(attention.detach())
        return loss + weight * attention, parts

    # --- results --------------------------------------------------------------------------

    def _rows(self) -> torch.Tensor:
        return self._embeddings.weight[self.variant_ids].detach().to("cpu", copy=True)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"variant_rows": self._rows()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self._embeddings.weight[self.variant_ids] = state["variant_rows"].to(
                self._embeddings.weight
            )

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = self._rows().float()
        metadata = {
            "token": self.token,
            "stages": str(self.stages),
            "num_train_timesteps": str(self.state.num_train_timesteps),
        }
        save_file(
            {"k": rows[0::2].contiguous(), "v": rows[1::2].contiguous()},
            out_dir / WEIGHT_NAME,
            metadata=metadata,
        )

    @staticmethod
    def load_into(pipe: Any, weights_dir: Path) -> Any:
        """Add the placeholder and its 2S rows to `pipe`'s tokenizer and text encoder, wrap the
        encoder in `SeFiTextEncoder` and install the stage-selecting processors."""
        from safetensors import safe_open

        path = Path(weights_dir) / WEIGHT_NAME
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        if not {"token", "stages", "num_train_timesteps"} <= set(meta):
            raise SidpipeError(f"{path}: not a SeFi-IDE file (its metadata lacks token/stages)")
        tensors = load_file(str(path))
        token, stages = meta["token"], int(meta["stages"])
        variants = variant_tokens(token, stages)
        if pipe.tokenizer.add_tokens([token, *variants]) != 1 + len(variants):
            raise SidpipeError(f"{path}: the pipeline already has the token {token!r}")
        ids = pipe.tokenizer.convert_tokens_to_ids([token, *variants])
        encoder = pipe.text_encoder
        encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
        weight = encoder.get_input_embeddings().weight
        rows = torch.stack([tensors["k"], tensors["v"]], dim=1).flatten(0, 1)
        with torch.no_grad():
            weight[ids[1:]] = rows.to(weight)
        pipe.text_encoder = SeFiTextEncoder(encoder, ids[0], ids[1:])
        state = SeFiState(stages, int(meta["num_train_timesteps"]))
        install(pipe.unet, state)
        pipe.sefi_state = state
        return pipe
