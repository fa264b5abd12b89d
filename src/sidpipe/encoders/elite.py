"""ELITE (Wei et al., ICCV 2023) inference on current diffusers/transformers, official checkpoints.

Read from csyxwei/ELITE (commit 665fa85; it pinned diffusers 0.11.1, transformers 4.26.1):
train_global.py (`Mapper`, `inj_forward_text`, `inj_forward_crossattention`, `validation`),
train_local.py (`MapperLocal`, its `inj_forward_crossattention` and `validation`),
inference_global.py/.sh, inference_local.py/.sh, datasets.py (`CustomDatasetWithBG`: test-time
preprocessing) and app_gradio.py. Done as there:

* Reference: RGB image and object mask (`mask > 0` per channel); the unmasked image and the object
  `image * mask` are resized to 224 px (PIL bicubic) and CLIP-normalised; the mask's first channel
  goes (nearest) to 128 px, then to the 16x16 patch grid.
* Global: CLIP ViT-L/14 (`CLIPVisionModel`) of the *unmasked* image; `[last_hidden_state,
  hidden_states[4], [8], [12], [16]]` -> `Mapper` (per layer `mapping_i(CLS) +
  mean(mapping_patch_i(patches))`: five words). Inference keeps w0 (`inj_embedding[:, 0:1]`:
  inference_local.py always, inference_global.sh via `--token_index=0`), which replaces the token
  embedding of the placeholder "S" before the position embeddings are added.
* Every UNet attn2 takes keys/values from the global mapper's `<layer>_to_k` / `_to_v` (SD's
  to_k/to_v, fine-tuned with the mapper), in the conditional and the unconditional ("") pass.
* Local: the masked object's five layers -> `MapperLocal` (`mapping_i(CLS) +
  mapping_patch_i(patch)` per patch, mean over layers) times the 16x16 mask; in the conditional
  pass attn2 adds `lambda * w * softmax(q k_local^T * scale) v_local` (the local mapper's
  `to_k`/`to_v`), `w` = each query's attention to S over its maximum. `lambda` = 0.8
  (inference_local.py `--llambda` and .sh; the gradio demo starts at 0.6).
* Sampling: LMSDiscreteScheduler(0.00085..0.012, scaled_linear), 100 steps, guidance 5.0, noise
  `torch.randn` after `torch.manual_seed(seed)` times `init_noise_sigma`, VAE decode of
  latents / 0.18215, `(x / 2 + 0.5).clamp(0, 1)`.

Our reading (identical to the official code in its own setting unless said):

* Prompts name the concept by the standalone word "S" (the official template "a photo of a S",
  the demo's "A S wearing sunglasses"): "a photo of a S on the beach", no class noun after S. The
  official code locates S by *word* index + 1, we by *token* index: the same whenever each word
  before S is one CLIP token (all official prompts); otherwise it overwrote a wrong token (we log
  it). A prompt without a standalone "S" is an error (officially: the BOS token was overwritten).
* The local weight's maximum is per image (officially over the batch; its inference used one
  image); conditional and unconditional rows share one UNet call (officially two).
* Tokenizer and text encoder come from `base_model` (officially openai/clip-vit-large-patch14's:
  the text encoder of SD v1-4). LMS's step coefficients are integrated exactly in numpy (diffusers
  uses scipy's `quad`, exact for these cubics; scipy is not a dependency here).
* `mask=None` takes the whole image as the object (officially a mask is required); a mask of
  another size is resized (nearest). `resolution` sets the latent size (officially 512 px).
* `scheduler="ddim"` (the base model's scheduler config, as the other arms), `steps`,
  `guidance_scale` override LMS / 100 / 5.0 (the SID experiment: DDIM, 50, 7.5); `dtype` is free
  (officially float16). Noise from `torch.Generator("cpu").manual_seed(seed)`: the same draw.
* The mappers' hidden width (officially fixed 1024) is read from the checkpoint, so tiny test
  checkpoints stay tiny; the parameter names are the official ones.
* Not implemented: inference_global.py's argparse default `--token_index=full` (all five words,
  shifting the prompt); its script uses w0. `local_mapper=None` is the global-only inference.
"""

from __future__ import annotations

import math
import pickle
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..io import SidpipeError, expand_home, log

PLACEHOLDER = "S"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HIDDEN_LAYERS = (4, 8, 12, 16)  # image_features[2][4], [8], [12], [16] after image_features[0]
OFFICIAL_HIDDEN = 1024  # the mappers' hard-coded width
SEG_SIZE = 128  # CustomDatasetWithBG's mask size before the patch grid
LMS_KWARGS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
OFFICIAL_STEPS, OFFICIAL_GUIDANCE, OFFICIAL_LAMBDA = 100, 5.0, 0.8


# --- the official modules ---------------------------------------------------------------------


def _mlp(input_dim: int, hidden_dim: int, output_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.LeakyReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.LeakyReLU(),
        nn.Linear(hidden_dim, output_dim),
    )


class _FiveLayerMapper(nn.Module):
    """`mapping_i` (for CLS) and `mapping_patch_i` (for the patches) per feature layer i < 5."""

    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int = OFFICIAL_HIDDEN):
        super().__init__()
        for i in range(5):
            setattr(self, f"mapping_{i}", _mlp(input_dim, hidden_dim, output_dim))
            setattr(self, f"mapping_patch_{i}", _mlp(input_dim, hidden_dim, output_dim))


class Mapper(_FiveLayerMapper):
    """train_global.Mapper: five image feature layers -> five word embeddings (B, 5, out)."""

    def forward(self, embs: list[torch.Tensor]) -> torch.Tensor:
        hidden_states = ()
        for i, emb in enumerate(embs):
            patch = getattr(self, f"mapping_patch_{i}")(emb[:, 1:]).mean(dim=1, keepdim=True)
            hidden_states += (getattr(self, f"mapping_{i}")(emb[:, :1]) + patch,)
        return torch.cat(hidden_states, dim=1)


class MapperLocal(_FiveLayerMapper):
    """train_local.MapperLocal: five feature layers -> one embedding per patch (B, N, out)."""

    def forward(self, embs: list[torch.Tensor]) -> torch.Tensor:
        hidden_states = ()
        for i, emb in enumerate(embs):
            state = getattr(self, f"mapping_{i}")(emb[:, :1])
            state = state + getattr(self, f"mapping_patch_{i}")(emb[:, 1:])
            hidden_states += (state.unsqueeze(0),)
        return torch.cat(hidden_states, dim=0).mean(dim=0)


def cross_attention_names(unet: nn.Module) -> list[str]:
    """The UNet attention modules ELITE re-projects: every attention not named attn1 (official:
    class `CrossAttention`, diffusers 0.11; `Attention` now), in `named_modules` order."""
    from diffusers.models.attention_processor import Attention

    return [n for n, m in unet.named_modules() if isinstance(m, Attention) and "attn1" not in n]


def add_projections(mapper: nn.Module, unet: nn.Module, copy_from_unet: bool = False) -> None:
    """Add `<layer with _>_to_k` / `_to_v` (bias-free, to_k's shape) as the official scripts do;
    `copy_from_unet` initialises them from SD's to_k/to_v, as training does."""
    for name in cross_attention_names(unet):
        attn = unet.get_submodule(name)
        for proj in ("to_k", "to_v"):
            weight = getattr(attn, proj).weight
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            if copy_from_unet:
                linear.weight.data = weight.data.clone()
            mapper.add_module(f"{name.replace('.', '_')}_{proj}", linear)


def load_mapper(cls: type, path: Path, unet: nn.Module, input_dim: int, output_dim: int) -> Any:
    """`cls` (Mapper / MapperLocal) with its projections, loaded strictly from an official .pt."""
    path = Path(path)
    if not path.is_file():
        raise SidpipeError(f"ELITE {cls.__name__} checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SidpipeError(
            f"{path}: not a readable ELITE {cls.__name__} checkpoint ({reason}); download it "
            "again (see README, ELITE)"
        ) from None
    first, last = state.get("mapping_0.0.weight"), state.get("mapping_0.6.weight")
    got = None if first is None or last is None else (first.shape[1], last.shape[0])
    if got != (input_dim, output_dim):
        raise SidpipeError(
            f"{path}: not an ELITE {cls.__name__} for image features of {input_dim} and text "
            f"embeddings of {output_dim} (its (input, output) dims: {got})"
        )
    mapper = cls(input_dim, output_dim, hidden_dim=first.shape[0])
    add_projections(mapper, unet)
    try:
        mapper.load_state_dict(state)
    except RuntimeError as err:
        raise SidpipeError(f"{path} does not fit this base model's UNet: {err}") from err
    return mapper.eval()


# --- the injected cross-attention ---------------------------------------------------------------


class _LocalContext:
    """What the conditional rows' local branch needs during one batch's denoising."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.local: torch.Tensor | None = None  # (n, N, dim): masked local embeddings
        self.index: torch.Tensor | None = None  # (n,): S's token index per conditional row
        self.start = 0  # the conditional rows are start .. start + n of the UNet batch
        self.llambda = 0.0


class EliteAttnProcessor:
    """train_local.inj_forward_crossattention as a diffusers attention processor (for attn2)."""

    def __init__(self, to_k, to_v, to_k_local, to_v_local, context: _LocalContext):
        self.to_k, self.to_v = to_k, to_v
        self.to_k_local, self.to_v_local = to_k_local, to_v_local
        self.context = context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        if attention_mask is not None:
            raise SidpipeError("ELITE's cross-attention takes no attention mask")
        if encoder_hidden_states is None:  # the official code's context-less branch
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        else:
            key = self.to_k(encoder_hidden_states)
            value = self.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key, value = attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = (torch.matmul(query, key.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
        out = torch.matmul(probs, value)

        ctx = self.context
        if ctx.local is not None and encoder_hidden_states is not None:
            heads, n = attn.heads, ctx.local.shape[0]
            rows = slice(ctx.start * heads, (ctx.start + n) * heads)
            key_local = attn.head_to_batch_dim(self.to_k_local(ctx.local))
            value_local = attn.head_to_batch_dim(self.to_v_local(ctx.local))
            scores = torch.matmul(query[rows], key_local.transpose(-1, -2)) * attn.scale
            probs_local = scores.softmax(dim=-1)
            # Each query's attention to S (per head), divided by its maximum over the image.
            index = ctx.index.repeat_interleave(heads)
            weight = probs[rows][torch.arange(n * heads, device=index.device), :, index]
            peak = weight.reshape(n, -1).amax(dim=1).repeat_interleave(heads)
            weight = (weight / peak[:, None]).unsqueeze(2)
            out[rows] += torch.matmul(probs_local * weight * ctx.llambda, value_local)

        out = attn.batch_to_head_dim(out)
        return attn.to_out[1](attn.to_out[0](out))


# --- reference preprocessing --------------------------------------------------------------------


def _clip_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Bicubic resize, ToTensor, CLIP Normalize (datasets.CustomDatasetWithBG.get_tensor_clip)."""
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1) / 255.0
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((pixels - mean) / std).unsqueeze(0)


def preprocess_reference(
    reference: Image.Image, mask: Image.Image | None, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, masked object, mask) as CustomDatasetWithBG gives pixel_values_clip,
    pixel_values_obj and pixel_values_seg: (1, 3, size, size) x 2 and (1, 1, 128, 128)."""
    image = np.array(reference.convert("RGB"))
    if mask is None:
        keep = np.ones_like(image, dtype=bool)
    else:
        mask = mask.convert("RGB")
        if mask.size != reference.size:
            mask = mask.resize(reference.size, Image.Resampling.NEAREST)
        keep = np.array(mask) > 0
    obj = (image * keep).astype(np.uint8)
    seg = torch.from_numpy(keep[..., 0].astype(np.float32))[None, None]
    seg = F.interpolate(seg, size=(SEG_SIZE, SEG_SIZE), mode="nearest")
    return _clip_tensor(Image.fromarray(image), size), _clip_tensor(Image.fromarray(obj), size), seg


def lms_scheduler() -> Any:
    """The official LMSDiscreteScheduler, without scipy: diffusers integrates each step's Lagrange
    polynomial (degree < 4) with scipy's `quad`, exact for it; we integrate it exactly too."""
    from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
    from numpy.polynomial import Polynomial

    class ExactLMS(LMSDiscreteScheduler):
        def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
            sigma = [float(s) for s in self.sigmas]
            others = [sigma[t - k] for k in range(order) if k != current_order]
            scale = math.prod(sigma[t - current_order] - s for s in others)
            integral = (Polynomial.fromroots(others) if others else Polynomial(1.0)).integ()
            return float((integral(sigma[t + 1]) - integral(sigma[t])) / scale)

    return ExactLMS(**LMS_KWARGS)


# --- the model ----------------------------------------------------------------------------------


class Elite:
    """Loaded ELITE: `generate` makes images of the reference's concept from "S" prompts."""

    def __init__(self, parts: Any, image_encoder, mapper, mapper_local, device, dtype) -> None:
        self.tokenizer, self.text_encoder = parts.tokenizer, parts.text_encoder
        self.vae, self.unet = parts.vae, parts.unet
        self.scheduler_config = parts.noise_scheduler.config
        self.image_encoder, self.mapper, self.mapper_local = image_encoder, mapper, mapper_local
        self.device, self.dtype = device, dtype
        ids = self.tokenizer(PLACEHOLDER, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise SidpipeError(f"the tokenizer splits {PLACEHOLDER!r} into {len(ids)} tokens")
        self.placeholder_id = ids[0]
        self._word: tuple[torch.Tensor, int] | None = None  # (w0, index) while encoding a prompt
        self.text_encoder.get_input_embeddings().register_forward_hook(self._inject)
        self.context = _LocalContext()
        processors = dict(self.unet.attn_processors)
        for name in cross_attention_names(self.unet):
            key = name.replace(".", "_")
            local = [getattr(mapper_local, f"{key}_{p}", None) for p in ("to_k", "to_v")]
            processors[f"{name}.processor"] = EliteAttnProcessor(
                getattr(mapper, f"{key}_to_k"), getattr(mapper, f"{key}_to_v"), *local, self.context
            )
        self.unet.set_attn_processor(processors)

    # text ----------------------------------------------------------------------------------

    def _inject(self, module, args, output):
        """inj_forward_text: w0 replaces S's token embedding (before the position embeddings)."""
        if self._word is None:
            return None
        word, index = self._word
        output = output.clone()
        output[:, index] = word.to(output.dtype)
        return output

    def _ids(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(
            prompt,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def placeholder_index(self, prompt: str) -> int:
        """Token index of the (last) standalone word "S" in `prompt`, BOS counted."""
        words = prompt.strip().split(" ")
        hits = [i for i, word in enumerate(words) if word == PLACEHOLDER]
        if not hits:
            raise SidpipeError(
                f"ELITE prompt {prompt!r} has no standalone placeholder word {PLACEHOLDER!r}; "
                f"write e.g. 'a photo of a {PLACEHOLDER} on the beach'"
            )
        prefix = " ".join(words[: hits[-1]])
        index = 1 + len(self.tokenizer(prefix, add_special_tokens=False).input_ids)
        ids = self._ids(prompt)[0]
        if index >= len(ids) - 1 or int(ids[index]) != self.placeholder_id:
            raise SidpipeError(f"ELITE prompt {prompt!r}: {PLACEHOLDER!r} is cut off or merged")
        if index != hits[-1] + 1:
            log.warning(
                "ELITE prompt %r: S is token %d; the official code would inject at word index "
                "%d (it counts words, not tokens)",
                prompt,
                index,
                hits[-1] + 1,
            )
        return index

    @torch.no_grad()
    def encode_prompt(
        self, prompt: str, word: torch.Tensor | None, index: int | None = None
    ) -> torch.Tensor:
        """(1, 77, dim) text embeddings; `word` (1, 1, dim) replaces S (token `index`) if given."""
        if word is not None:
            index = self.placeholder_index(prompt) if index is None else index
            self._word = (word[0, 0], index)
        try:
            return self.text_encoder(self._ids(prompt))[0]
        finally:
            self._word = None

    # reference -----------------------------------------------------------------------------

    def _features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        out = self.image_encoder(pixels.to(self.device, self.dtype), output_hidden_states=True)
        if len(out.hidden_states) <= max(HIDDEN_LAYERS):
            raise SidpipeError(f"ELITE needs an image encoder with >= {max(HIDDEN_LAYERS)} layers")
        return [out.last_hidden_state] + [out.hidden_states[k] for k in HIDDEN_LAYERS]

    @torch.no_grad()
    def encode_reference(
        self, reference: Image.Image, mask: Image.Image | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(w0 (1, 1, dim), masked local embeddings (1, N, dim) or None without a local mapper)."""
        image, obj, seg = preprocess_reference(
            reference, mask, self.image_encoder.config.image_size
        )
        word = self.mapper(self._features(image))[:, 0:1, :]
        if self.mapper_local is None:
            return word, None
        local = self.mapper_local(self._features(obj))
        grid = math.isqrt(local.shape[1])
        if grid * grid != local.shape[1]:
            raise SidpipeError(f"ELITE: {local.shape[1]} image patches are not a square grid")
        seg = F.interpolate(seg, size=(grid, grid), mode="nearest")
        return word, local * seg[:, 0].reshape(1, -1, 1).to(local)

    # sampling ------------------------------------------------------------------------------

    def _scheduler(self, name: str):
        from diffusers import DDIMScheduler

        if name == "lms":
            return lms_scheduler()
        if name == "ddim":
            return DDIMScheduler.from_config(self.scheduler_config)
        raise SidpipeError(f"ELITE scheduler {name!r}: use 'lms' (official) or 'ddim'")

    @torch.no_grad()
    def generate(
        self,
        reference: Image.Image,
        mask: Image.Image | None,
        prompts: list[str],
        seeds: list[int],
        steps: int = OFFICIAL_STEPS,
        guidance_scale: float = OFFICIAL_GUIDANCE,
        resolution: int = 512,
        scheduler: str = "lms",
        llambda: float = OFFICIAL_LAMBDA,
        batch_size: int = 1,
    ) -> list[Image.Image]:
        """One image per (prompt, seed), prompt-major: [p0 s0, p0 s1, ..., p1 s0, ...].

        Prompts name the concept with the word "S" ("a photo of a S on the beach"). Defaults
        are the official inference's (LMS, 100 steps, guidance 5.0, lambda 0.8); each image's
        noise comes from its own seeded CPU generator, so it depends only on prompt and seed.
        """
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % scale:
            raise SidpipeError(f"ELITE resolution {resolution} is not a multiple of {scale}")
        word, local = self.encode_reference(reference, mask)
        uncond = self.encode_prompt("", None)
        index = {p: self.placeholder_index(p) for p in prompts}
        cond = {p: self.encode_prompt(p, word, index[p]) for p in index}
        rows = list(product(prompts, seeds))
        images: list[Image.Image] = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            n = len(batch)
            sched = self._scheduler(scheduler)
            sched.set_timesteps(steps, device=self.device)
            shape = (1, self.unet.config.in_channels, resolution // scale, resolution // scale)
            noise = [
                torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)))
                for _, s in batch
            ]
            latents = torch.cat(noise).to(self.device, self.dtype) * sched.init_noise_sigma
            context = torch.cat([uncond.expand(n, -1, -1)] + [cond[p] for p, _ in batch])
            if local is not None:
                self.context.local = local.expand(n, -1, -1)
                self.context.index = torch.tensor([index[p] for p, _ in batch], device=self.device)
                self.context.start, self.context.llambda = n, float(llambda)
            try:
                for t in sched.timesteps:
                    model_input = sched.scale_model_input(latents, t)
                    eps = self.unet(torch.cat([model_input] * 2), t, encoder_hidden_states=context)
                    eps_uncond, eps_text = eps.sample.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
                    latents = sched.step(eps, t, latents).prev_sample
            finally:
                self.context.clear()
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            decoded = (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
            images += [Image.fromarray(x) for x in (decoded * 255).round().astype("uint8")]
        return images


def load_elite(
    base_model: str,
    image_encoder: str,
    global_mapper: Path,
    local_mapper: Path | None,
    dtype: str = "float32",
    device: str = "cpu",
) -> Elite:
    """ELITE on SD `base_model` (CompVis/stable-diffusion-v1-4 in the paper), CLIP vision tower
    `image_encoder` (openai/clip-vit-large-patch14) and the official `global_mapper.pt` /
    `local_mapper.pt`; `local_mapper=None` gives the global-only inference."""
    from transformers import CLIPVisionModel

    from ..models import load_sd_components, pick_device, torch_dtype

    dev, dt = pick_device(device), torch_dtype(dtype)
    parts = load_sd_components(base_model, dtype, str(dev))
    try:
        vision = CLIPVisionModel.from_pretrained(expand_home(image_encoder), dtype=dt)
        vision = vision.to(dev).eval()
    except Exception as err:
        raise SidpipeError(f"cannot load the ELITE image encoder {image_encoder!r}: {err}") from err
    dims = vision.config.hidden_size, parts.text_encoder.config.hidden_size
    mapper = load_mapper(Mapper, global_mapper, parts.unet, *dims).to(dev, dt)
    mapper_local = None
    if local_mapper is not None:
        mapper_local = load_mapper(MapperLocal, local_mapper, parts.unet, *dims).to(dev, dt)
    return Elite(parts, vision, mapper, mapper_local, dev, dt)
