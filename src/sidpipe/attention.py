"""Where does [V] look? Cross-attention maps of the identifier (SID paper, Sec. 5).

A recording processor wraps each cross-attention layer's (attn2) own processor: the layer's
output is the wrapped processor's, untouched, so recording cannot change the image; the
identifier's attention probabilities are recomputed beside it from the same query and key
projections, for the conditional half of classifier-free guidance only. Maps are averaged over
timesteps, layers and heads (each layer's map resized to a common size first), summed over the
identifier's sub-tokens, upsampled to the image and normalised to sum 1.

Beyond the paper: `attention_mass_in_mask` is the share of that mass inside the subject's mask,
found by Grounded-SAM on the generated image (`sidpipe.grounded_sam.generated_subject_mask`)
or, in the synthetic world, read by its judge (`judged_subject_mask`).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from sidpipe.io import SidpipeError, atomic_dir, atomic_file, log, write_csv
from sidpipe.sampling import LazyPipeline, encode_prompt, image_name, seed_latents

CSV_FIELDS = [
    "prompt_id",
    "seed",
    "prompt",
    "attention_mass_in_mask",
    "mask_fraction",
    "flag",
    "image_path",
    "map_path",
    "overlay_path",
    "mask_path",
]


# --- recording -----------------------------------------------------------------------------


class AttentionStore:
    """Running sum of the chosen tokens' cross-attention maps, one (P, H, W) stack per image.

    `latent_hw` is the latent size (to recover each layer's spatial grid from its token count);
    `map_size` the common size every layer's map is resized to (default: the latent size).
    """

    def __init__(
        self,
        positions: Sequence[int],
        latent_hw: tuple[int, int],
        cfg: bool,
        map_size: tuple[int, int] | None = None,
    ) -> None:
        if not positions:
            raise SidpipeError("no token positions to record")
        self.positions = list(positions)
        self.latent_hw = latent_hw
        self.map_size = map_size or latent_hw
        self.cfg = cfg
        self.total: torch.Tensor | None = None
        self.calls = 0

    def grid(self, tokens: int) -> tuple[int, int]:
        """(h, w) of a layer with `tokens` query positions (a 2^k downsampling of the latents,
        rounded up as the UNet's strided convolutions do)."""
        height, width = self.latent_hw
        for factor in (2**k for k in range(8)):
            h, w = math.ceil(height / factor), math.ceil(width / factor)
            if h * w == tokens:
                return h, w
        raise SidpipeError(f"cannot map {tokens} attention positions onto latents {self.latent_hw}")

    def add(self, probs: torch.Tensor) -> None:
        """probs: (batch, heads, queries, P) attention probabilities of the tracked tokens."""
        batch, _, tokens, count = probs.shape
        h, w = self.grid(tokens)
        maps = probs.float().mean(dim=1).permute(0, 2, 1).reshape(batch, count, h, w)
        if (h, w) != tuple(self.map_size):
            maps = F.interpolate(maps, size=self.map_size, mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps
        self.calls += 1

    def mean(self) -> torch.Tensor:
        """(batch, P, H, W): the average over every recorded layer call (layers x timesteps)."""
        if self.total is None:
            raise SidpipeError("no cross-attention was recorded (does the UNet have attn2 layers?)")
        return self.total / self.calls


def _projections(inner: Any, attn: Any) -> tuple[Any, Any]:
    """The query and key projections the wrapped processor really uses: Custom Diffusion's
    processors carry their own trained ones instead of attn.to_q / attn.to_k."""
    to_q = inner.to_q_custom_diffusion if getattr(inner, "train_q_out", False) else attn.to_q
    to_k = inner.to_k_custom_diffusion if getattr(inner, "train_kv", False) else attn.to_k
    return to_q, to_k


class IdentifierAttnProcessor:
    """Wraps a cross-attention processor: returns its output unchanged and records the
    attention probabilities of the store's token positions."""

    def __init__(self, inner: Any, store: AttentionStore) -> None:
        self.inner = inner
        self.store = store

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if temb is not None:  # not every processor takes temb (Custom Diffusion's does not)
            kwargs["temb"] = temb
        out = self.inner(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **kwargs,
        )
        if encoder_hidden_states is not None:
            with torch.no_grad():
                self.store.add(self._probs(attn, hidden_states, encoder_hidden_states, temb))
        return out

    def _probs(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        temb: torch.Tensor | None,
    ) -> torch.Tensor:
        """softmax(q k^T * scale) of the conditional half, restricted to the tracked keys;
        the same pre-processing as AttnProcessor2_0 (spatial/group norm, norm_cross, norm_q/k)."""
        key_context = getattr(self.inner, "key_context", None)
        if key_context is not None:  # SeFi-IDE: the keys see the stage's K text features
            context = key_context(context)
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if self.store.cfg:  # the pipeline stacks [unconditional, conditional]
            half = hidden_states.shape[0] // 2
            hidden_states, context = hidden_states[half:], context[half:]
        to_q, to_k = _projections(self.inner, attn)
        query = to_q(hidden_states.to(to_q.weight.dtype))
        key = to_k(context.to(to_k.weight.dtype))
        batch = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # float32: half-precision softmax over 77 keys loses the small identifier probabilities
        scores = query.float() @ key.float().transpose(-1, -2) * attn.scale
        return scores.softmax(dim=-1)[..., self.store.positions]


@contextlib.contextmanager
def record_cross_attention(pipe: Any, store: AttentionStore) -> Iterator[AttentionStore]:
    """Install recording processors on every cross-attention layer (attn2) of `pipe.unet`;
    the original processors are put back on exit, even after an error."""
    layers = [
        module
        for name, module in pipe.unet.named_modules()
        if name.endswith("attn2") and hasattr(module, "set_processor")
    ]
    if not layers:
        raise SidpipeError("the UNet has no cross-attention (attn2) layers to record")
    originals = [layer.processor for layer in layers]
    for layer, original in zip(layers, originals, strict=True):
        layer.set_processor(IdentifierAttnProcessor(original, store))
    try:
        yield store
    finally:
        for layer, original in zip(layers, originals, strict=True):
            layer.set_processor(original)


# --- tokens and maps -----------------------------------------------------------------------


def _convert(pipe: Any, text: str) -> str:
    """Expand multi-vector textual-inversion tokens exactly as pipe.encode_prompt does."""
    if hasattr(pipe, "maybe_convert_prompt"):
        return pipe.maybe_convert_prompt(text, pipe.tokenizer)
    return text


def identifier_positions(pipe: Any, prompt: str, identifier: str) -> list[int]:
    """Positions of the identifier's token ids in the prompt's (padded, 77-token) encoding:
    every sub-token when BPE splits it, every occurrence when it repeats."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(
        _convert(pipe, prompt),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
    ).input_ids
    sub = tokenizer(_convert(pipe, identifier), add_special_tokens=False).input_ids
    if not sub:
        raise SidpipeError(f"the identifier {identifier!r} encodes to no tokens")
    positions = [
        i + j
        for i in range(len(ids) - len(sub) + 1)
        if ids[i : i + len(sub)] == sub
        for j in range(len(sub))
    ]
    if not positions:
        raise SidpipeError(
            f"the identifier {identifier!r} (tokens {tokenizer.convert_ids_to_tokens(sub)}) does "
            f"not occur in the encoded prompt {prompt!r} (or lies past the 77-token window)"
        )
    return positions


def token_attention(
    pipe: Any,
    prompt: str,
    seed: int,
    positions: Sequence[int],
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int = 512,
    negative_prompt: str | None = None,
    map_size: tuple[int, int] | None = None,
) -> tuple[Image.Image, np.ndarray]:
    """Generate one image (same latents as `sample_arm` for `seed`) and return it with the raw
    averaged attention maps of each token position: (P, h, w), at the latent size by default."""
    cfg = guidance_scale > 1.0
    latent_hw = (resolution // pipe.vae_scale_factor,) * 2
    store = AttentionStore(positions, latent_hw, cfg, map_size)
    positive, negative = encode_prompt(pipe, prompt, negative_prompt, cfg)
    with record_cross_attention(pipe, store), torch.no_grad():
        image = pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            latents=seed_latents(pipe, [seed], resolution, resolution),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            output_type="pil",
        ).images[0]
    return image, store.mean()[0].cpu().numpy()


def finish_map(token_maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Sum per-token maps, upsample bilinearly to `size` (h, w), normalise to sum 1."""
    total = torch.from_numpy(np.asarray(token_maps, np.float32)).sum(dim=0)[None, None]
    up = F.interpolate(total, size=size, mode="bilinear", align_corners=False)[0, 0]
    up = up.clamp_min(0)  # bilinear weights are convex, so this only removes rounding noise
    mass = float(up.sum())
    if mass <= 0:
        raise SidpipeError("the identifier received no attention at all")
    return (up / mass).numpy()


def attention_maps(
    pipe: Any,
    prompt: str,
    seed: int,
    identifier: str,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int = 512,
    negative_prompt: str | None = None,
) -> tuple[Image.Image, np.ndarray]:
    """(image, map): the identifier's attention, (resolution, resolution), non-negative,
    summing to 1 (a distribution over pixels)."""
    positions = identifier_positions(pipe, prompt, identifier)
    image, token_maps = token_attention(
        pipe, prompt, seed, positions, steps, guidance_scale, resolution, negative_prompt
    )
    return image, finish_map(token_maps, (image.height, image.width))


def overlay_attention(
    image: Image.Image, attention: np.ndarray, alpha: float = 0.5, cmap: str = "jet"
) -> Image.Image:
    """`image` blended with the map (scaled to its maximum) through a matplotlib colormap."""
    from matplotlib import colormaps

    values = np.asarray(attention, np.float32)
    if values.shape != (image.height, image.width):
        values = np.asarray(
            Image.fromarray(values).resize(image.size, Image.Resampling.BILINEAR), np.float32
        )
    peak = float(values.max())
    scaled = values / peak if peak > 0 else values
    colours = colormaps[cmap](scaled)[..., :3] * 255.0
    rgb = np.asarray(image.convert("RGB"), np.float32)
    return Image.fromarray(np.rint((1 - alpha) * rgb + alpha * colours).astype(np.uint8))


def map_image(attention: np.ndarray) -> Image.Image:
    """8-bit grayscale picture of a map, scaled to its maximum."""
    values = np.asarray(attention, np.float32)
    peak = float(values.max())
    return Image.fromarray(np.rint(255 * values / (peak if peak > 0 else 1)).astype(np.uint8))


def attention_mass_in_mask(attention: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's mass inside `mask` (same shape; non-zero = subject): 1.0 for a full
    mask, 0.0 for an empty one."""
    values, keep = np.asarray(attention, np.float64), np.asarray(mask) != 0
    if values.shape != keep.shape:
        raise SidpipeError(f"attention map {values.shape} and mask {keep.shape} differ in shape")
    total = values.sum()
    if total <= 0:
        raise SidpipeError("the attention map has no mass")
    return float(values[keep].sum() / total)


# --- the subject's mask in generated images -----------------------------------------------


def judged_subject_mask(images: list[Image.Image], judge: str) -> list[np.ndarray | None]:
    """The subject's mask in each generated image as the world's judge reads it; None where
    it finds no subject pixel (the image may lack the subject)."""
    from sidpipe.world.judge import load_judge, read_images

    seen = read_images(load_judge(judge), images)
    return [s["mask"] if s["mask"].any() else None for s in seen]


def attention_for_arm(
    base_model: str,
    out_dir: Path,
    prompts: list[dict],
    seeds: list[int],
    algorithm: str | None,
    weights_dir: Path | None,
    token: str,
    class_name: str,
    detector: str,
    segmenter: str,
    prompt_ids: Sequence[int] | None = None,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int = 512,
    dtype: str = "float16",
    device: str = "auto",
    negative_prompt: str | None = None,
    segmentation: dict | None = None,
    pipe: Any = None,
    loader: LazyPipeline | None = None,
    judge: str | None = None,
) -> list[dict]:
    """For the chosen prompts (all when `prompt_ids` is None) x `seeds`: the image, the
    identifier's map (maps/*.png, maps.npz), its overlay, the subject's mask and
    `attention.csv` (prompt_id, seed, attention_mass_in_mask, mask_fraction, ...).

    `segmentation`: keyword arguments for `sidpipe.grounded_sam.generated_subject_mask`
    (thresholds, box_mode, ...).
    `judge`: the synthetic world's judge folder; when given, its mask head (trained on the
    scenes' true masks) gives the generated images' subject masks instead of Grounded-SAM.
    `pipe` (tests) is used as given; otherwise the pipeline comes from `loader` (the one the
    job's `sample_arm` used, so the model is loaded once per job) or is loaded here, and is
    released before GroundingDINO and SAM are loaded.
    """
    wanted = None if prompt_ids is None else {int(i) for i in prompt_ids}
    chosen = [r for r in prompts if wanted is None or int(r["prompt_id"]) in wanted]
    if not chosen:
        raise SidpipeError(f"none of the prompt ids {list(prompt_ids or [])} is in the prompts")
    own_pipe = pipe is None
    if own_pipe:
        loader = loader or LazyPipeline(base_model, algorithm, weights_dir, dtype, device)
        pipe = loader()
    jobs = [(row, int(seed)) for row in chosen for seed in seeds]
    images, maps = [], {}
    for row, seed in tqdm(jobs, desc="attention", unit="image", file=sys.stderr):
        image, attention = attention_maps(
            pipe, row["prompt"], seed, token, steps, guidance_scale, resolution, negative_prompt
        )
        images.append(image)
        maps[image_name(row["prompt_id"], seed)[:-4]] = attention
    if own_pipe:  # free the accelerator for GroundingDINO and SAM
        del pipe
        loader.release()
    if judge:
        masks = judged_subject_mask(images, judge)
    else:
        from sidpipe.grounded_sam import generated_subject_mask

        masks = generated_subject_mask(
            images, class_name, detector, segmenter, device=device, **(segmentation or {})
        )

    rows: list[dict] = []
    with atomic_dir(out_dir) as tmp:
        for folder in ("images", "maps", "overlays", "masks"):
            (tmp / folder).mkdir()
        for (row, seed), image, mask in zip(jobs, images, masks, strict=True):
            name = image_name(row["prompt_id"], seed)
            attention = maps[name[:-4]]
            paths = {folder: f"{folder}/{name}" for folder in ("images", "maps", "overlays")}
            image.save(tmp / paths["images"])
            map_image(attention).save(tmp / paths["maps"])
            overlay_attention(image, attention).save(tmp / paths["overlays"])
            mass: float | str = ""
            fraction, flag, mask_path = 0.0, "no_detection", ""
            if mask is not None and mask.any():
                mask_path = f"masks/{name}"
                Image.fromarray(mask.astype(np.uint8) * 255).save(tmp / mask_path)
                mass = round(attention_mass_in_mask(attention, mask), 6)
                fraction, flag = float(mask.mean()), ""
            rows.append(
                {
                    "prompt_id": int(row["prompt_id"]),
                    "seed": seed,
                    "prompt": row["prompt"],
                    "attention_mass_in_mask": mass,
                    "mask_fraction": round(fraction, 6),
                    "flag": flag,
                    "image_path": paths["images"],
                    "map_path": paths["maps"],
                    "overlay_path": paths["overlays"],
                    "mask_path": mask_path,
                }
            )
            log.info("attention %s: mass in mask %s, mask %.1f%%", name, mass, 100 * fraction)
        np.savez_compressed(tmp / "maps.npz", **maps)
        write_csv(tmp / "attention.csv", rows, CSV_FIELDS)
    return rows


__all__ = [
    "AttentionStore",
    "CSV_FIELDS",
    "IdentifierAttnProcessor",
    "attention_for_arm",
    "attention_mass_in_mask",
    "attention_maps",
    "finish_map",
    "identifier_positions",
    "map_image",
    "overlay_attention",
    "record_cross_attention",
    "token_attention",
]


def write_overlay_grid(out_dir: Path, rows: list[dict], grid_path: Path, tile: int = 128) -> None:
    """Report figure: each generated image beside its [V] attention overlay, with the share of
    attention inside the subject's mask."""
    from PIL import ImageDraw

    out_dir = Path(out_dir)
    grid = Image.new("RGB", (2 * tile, (tile + 14) * max(len(rows), 1)), "white")
    draw = ImageDraw.Draw(grid)
    for index, row in enumerate(rows):
        top = index * (tile + 14)
        for column, key in enumerate(("image_path", "overlay_path")):
            image = Image.open(out_dir / row[key]).convert("RGB").resize((tile, tile))
            grid.paste(image, (column * tile, top + 14))
        mass = row.get("attention_mass_in_mask", "")
        ids = f"p{int(row['prompt_id']):02d} s{int(row['seed']):02d}"
        label = f"{ids} in-mask {mass} {row.get('flag', '')}"
        draw.text((2, top + 1), label, fill="black")
    with atomic_file(grid_path, "wb") as handle:
        grid.save(handle, format="PNG")
