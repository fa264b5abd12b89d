"""Stage `sample`: the evaluation images of one arm (prompts x seeds), resumable and batched.

Every image's starting latents come from its own seeded CPU generator, so an image depends only
on (model, prompt, seed, settings), never on the batch it was generated in. Finished images are
written through temp + rename and kept on a rerun, so a killed job loses at most one batch.
"""

from __future__ import annotations

import gc
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from tqdm import tqdm

from sidpipe.io import SidpipeError, atomic_file, log, read_csv, write_csv

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that generate: prompts need only PIL (the figures are
# in sidpipe.sample_grids).

PLACEHOLDER = "[V]"
MANIFEST_FIELDS = ["prompt_id", "prompt", "prompt_plain", "seed", "path", "negative_prompt"]
SETTINGS_FILE = ".sampling.json"  # what the finished images were made with (resume check)
_IMAGE_RE = re.compile(r"^(\d+)_(\d+)\.png$")
# Words that only tie a description's context to the subject ("a [V] mug, with a plant").
_JOINERS = ("and", "with", "while", "which is", "that is", "plus")


# --- prompts -------------------------------------------------------------------------------


def _squash(text: str) -> str:
    """Single spaces, no space before punctuation, trimmed."""
    text = " ".join(text.split())
    return re.sub(r"\s+([,.;:!?])", r"\1", text).strip()


def names_class(prompt: str, class_name: str) -> bool:
    """Whether the prompt names the class as a word ("a mug on the beach" names mug, "a mugshot"
    does not): a concept subject's carrier prompts do, its transfer prompts do not."""
    return re.search(rf"\b{re.escape(class_name)}\b", prompt) is not None


def expand_prompts(
    templates: list[str], class_name: str, token: str, concept: str | None = None
) -> list[dict]:
    """One row per template: prompt_id (0-based), prompt (with `token`) and prompt_plain (the
    same prompt without the identifier, e.g. "a dog in the jungle"; for a concept subject the
    concept's words in its place, e.g. "a frozen dog in the jungle": what text alignment and
    the world's judge read)."""
    rows = []
    for prompt_id, template in enumerate(templates):
        if "{token}" not in template:
            raise SidpipeError(f"prompt template {template!r} has no {{token}} placeholder")
        filled = template.replace("{class}", class_name)
        plain = filled
        if concept and concept[0] in "aeiou":  # "an upside down dog", not "a upside down dog"
            plain = re.sub(r"\b([Aa]) \{token\}", r"\1n {token}", plain)
        rows.append(
            {
                "prompt_id": prompt_id,
                "prompt": _squash(filled.replace("{token}", token)),
                "prompt_plain": _squash(plain.replace("{token}", concept or "")),
            }
        )
    return rows


def _strip_joiners(part: str) -> str:
    part = part.strip(" ,;.")
    changed = True
    while changed and part:
        changed = False
        for joiner in _JOINERS:
            if part.lower().startswith(joiner + " "):
                part = part[len(joiner) :].strip(" ,;.")
                changed = True
    return part


def negative_prompt_from_descriptions(
    descriptions: list[str],
    class_name: str,
    tokenizer: Any = None,
    max_tokens: int = 77,
    placeholders: Sequence[str] = (PLACEHOLDER,),
) -> str:
    """The non-subject part of a subject's SID descriptions as one negative prompt (Sec. 7.1).

    Each description is split at commas; in the part naming the subject ("a [V] mug on a
    tablecloth") everything up to "[V] <class>" is dropped, keeping what follows ("on a
    tablecloth"); pure joiners ("with", "and") are stripped, spatial words ("on", "next to")
    kept as they say where the context is. Parts are deduplicated (case-insensitive, in order)
    and joined with ", "; with a tokenizer, whole parts are kept while they fit `max_tokens`
    (special tokens included).
    """
    marker = "|".join(re.escape(p) for p in placeholders)
    # "[V] mug" / "[V] mugs" / bare "[V]": the identifier and the class noun right after it.
    subject = re.compile(rf"(?:{marker})(?:\s+{re.escape(class_name)}(?:e?s)?\b)?", re.IGNORECASE)
    parts: list[str] = []
    seen: set[str] = set()
    for description in descriptions:
        for raw in re.split(r"[,;]", description):
            match = subject.search(raw)
            part = raw[match.end() :] if match else raw
            part = _strip_joiners(_squash(part))
            key = part.lower()
            if part and key not in seen:
                seen.add(key)
                parts.append(part)
    if tokenizer is None:
        return ", ".join(parts)
    kept: list[str] = []
    for part in parts:
        candidate = ", ".join([*kept, part])
        if len(tokenizer(candidate).input_ids) > max_tokens:
            log.info(
                "negative prompt cut at %d of %d parts (%d tokens)",
                len(kept),
                len(parts),
                max_tokens,
            )
            break
        kept.append(part)
    return ", ".join(kept)


# --- the pipeline --------------------------------------------------------------------------


def load_arm_pipeline(
    base_model: str,
    algorithm: str | None = None,
    weights_dir: Path | None = None,
    dtype: str = "float16",
    device: str = "auto",
) -> Any:
    """Base SD pipeline (DDIM) with an arm's trained weights applied; half precision on GPU
    only (on CPU it is slow and some ops lack kernels, so it falls back to float32).

    Each method's `Trainer.load_pipeline` builds it: DreamBooth hands its fine-tuned UNet and
    text encoder to the pipeline, so the base model's are never loaded only to be replaced."""
    from sidpipe.models import load_sd_pipeline, pick_device

    if pick_device(device).type == "cpu" and dtype != "float32":
        log.warning("sampling on CPU: using float32 instead of %s", dtype)
        dtype = "float32"
    if algorithm:
        if weights_dir is None:
            raise SidpipeError(f"algorithm {algorithm!r} given without a weights folder")
        from sidpipe.training import trainer_class

        pipe = trainer_class(algorithm).load_pipeline(base_model, Path(weights_dir), dtype, device)
    elif weights_dir is not None:
        raise SidpipeError(f"weights folder {weights_dir} given without an algorithm")
    else:
        pipe = load_sd_pipeline(base_model, dtype, device)
    pipe.set_progress_bar_config(disable=True)  # one bar over batches instead
    return pipe


class LazyPipeline:
    """An arm's pipeline (`load_arm_pipeline`'s arguments), loaded on the first call and then
    shared: a job that samples an arm and draws its attention maps loads the model once, and
    not at all when every image is kept from an earlier run and no map is due."""

    def __init__(
        self,
        base_model: str,
        algorithm: str | None = None,
        weights_dir: Path | None = None,
        dtype: str = "float16",
        device: str = "auto",
    ) -> None:
        self.args = (base_model, algorithm, weights_dir, dtype, device)
        self.loads = 0
        self._pipe: Any = None

    def __call__(self) -> Any:
        if self._pipe is None:
            self._pipe = load_arm_pipeline(*self.args)
            self.loads += 1
        return self._pipe

    def release(self) -> None:
        """Drop the pipeline and give its accelerator memory back (e.g. to GroundingDINO)."""
        self._pipe = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def seed_latents(pipe: Any, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """Starting latents, one seeded CPU generator per image: independent of batch and device."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    shape = (
        1,
        pipe.unet.config.in_channels,
        height // pipe.vae_scale_factor,
        width // pipe.vae_scale_factor,
    )
    cpu = torch.device("cpu")
    noise = [
        randn_tensor(shape, generator=torch.Generator(cpu).manual_seed(int(s)), device=cpu)
        for s in seeds
    ]
    return torch.cat(noise).to(pipe._execution_device, pipe.unet.dtype)


def encode_prompt(pipe: Any, prompt: str, negative_prompt: str | None, cfg: bool) -> tuple:
    """(prompt_embeds, negative_prompt_embeds or None), each (1, 77, dim), via the pipeline's
    own encode_prompt (so textual-inversion tokens and clip_skip behave as in pipe(...))."""
    import torch

    with torch.no_grad():
        positive, negative = pipe.encode_prompt(
            prompt, pipe._execution_device, 1, cfg, negative_prompt=negative_prompt or None
        )
    return positive, (negative if cfg else None)


def image_name(prompt_id: int, seed: int) -> str:
    return f"{int(prompt_id):02d}_{int(seed):02d}.png"


def image_ok(path: Path, resolution: int | None = None) -> bool:
    """True for a complete, decodable PNG (of `resolution` px when given)."""
    try:
        with Image.open(path) as handle:
            handle.verify()  # checks chunk CRCs; load() below catches truncated pixel data
        with Image.open(path) as handle:
            handle.load()
            return resolution is None or handle.size == (resolution, resolution)
    except Exception:  # any decoder error means "regenerate"
        return False


def _weights_fingerprint(weights_dir: Path | None) -> list:
    """Cheap identity of the trained weights (names, sizes, mtimes): retraining changes it,
    so images of old weights are never kept as finished. Hashing GBs per job would be slow."""
    if weights_dir is None:
        return []
    files = sorted(p for p in Path(weights_dir).rglob("*") if p.is_file())
    return [
        [str(p.relative_to(weights_dir)), p.stat().st_size, p.stat().st_mtime_ns] for p in files
    ]


def _drop_stale(out_dir: Path, settings: dict, wanted: set[str]) -> None:
    """Remove images made with other settings or prompts, and leftovers of killed writes."""
    old: dict = {}
    path = out_dir / SETTINGS_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    same_run = old.get("global") == settings["global"]
    if old and not same_run:
        log.warning("%s: sampling settings or weights changed; regenerating every image", out_dir)
    for file in out_dir.iterdir():
        if file.name.startswith(".") and ".tmp-" in file.name:
            file.unlink(missing_ok=True)
            continue
        match = _IMAGE_RE.match(file.name)
        if not match:
            continue
        prompt_id = str(int(match[1]))
        keep = (
            same_run
            and file.name in wanted
            and old.get("prompts", {}).get(prompt_id) == settings["prompts"].get(prompt_id)
        )
        if not keep:
            file.unlink()


def sample_arm(
    base_model: str,
    out_dir: Path,
    prompts: list[dict],
    seeds: list[int],
    algorithm: str | None,
    weights_dir: Path | None,
    token: str,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int = 512,
    batch_size: int = 10,
    dtype: str = "float16",
    device: str = "auto",
    negative_prompt: str | None = None,
    pipe: Any = None,
    loader: Callable[[], Any] | None = None,
) -> list[dict]:
    """Generate every (prompt, seed) image of an arm into `out_dir` as
    `{prompt_id:02d}_{seed:02d}.png` plus `manifest.csv` (written last); return its rows.

    Up to `batch_size` images per pipeline call; prompt embeddings are computed once per
    prompt. Resumable: verified images from a previous run with the same settings are kept.
    `pipe` (tests, benchmarks) replaces loading `base_model` + the arm's weights; `loader`
    (a `LazyPipeline` the job shares with `attention_for_arm`) is called for the pipeline
    when images are due, instead of `load_arm_pipeline`.
    """
    out_dir = Path(out_dir)
    if batch_size < 1:
        raise SidpipeError(f"batch_size must be at least 1, got {batch_size}")
    if resolution % 8:
        raise SidpipeError(f"resolution={resolution} must be a multiple of 8")
    if not seeds or len(set(seeds)) != len(seeds):
        raise SidpipeError(f"seeds must be a non-empty list without repeats, got {seeds}")
    ids = [int(row["prompt_id"]) for row in prompts]
    if len(set(ids)) != len(ids):
        raise SidpipeError("prompt ids repeat; use expand_prompts' rows")
    for row in prompts:
        if token not in row["prompt"]:
            log.warning(
                "prompt %s (%r) lacks the identifier %r", row["prompt_id"], row["prompt"], token
            )

    negative = negative_prompt or ""
    # The precision the images are made in (CPU falls back to float32), so a resume never
    # mixes images of another precision under one settings record.
    if pipe is not None:
        dtype = str(pipe.unet.dtype).removeprefix("torch.")
    elif dtype != "float32":
        from sidpipe.models import pick_device

        if pick_device(device).type == "cpu":
            dtype = "float32"
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "global": {
            "base_model": str(base_model),
            "algorithm": algorithm or "",
            "weights": _weights_fingerprint(weights_dir),
            "steps": steps,
            "guidance_scale": guidance_scale,
            "resolution": resolution,
            "dtype": dtype,
            "negative_prompt": negative,
            "injected_pipe": pipe is not None,
        },
        "prompts": {str(int(row["prompt_id"])): row["prompt"] for row in prompts},
    }
    manifest = [
        {
            "prompt_id": int(row["prompt_id"]),
            "prompt": row["prompt"],
            "prompt_plain": row.get("prompt_plain", ""),
            "seed": int(seed),
            "path": image_name(row["prompt_id"], seed),
            "negative_prompt": negative,
        }
        for row in prompts
        for seed in seeds
    ]
    _drop_stale(out_dir, settings, {row["path"] for row in manifest})
    with atomic_file(out_dir / SETTINGS_FILE) as handle:
        json.dump(settings, handle, indent=1)

    todo = []
    for row in manifest:
        path = out_dir / row["path"]
        if path.exists() and not image_ok(path, resolution):
            log.warning("%s is incomplete or unreadable; regenerating it", path)
            path.unlink()
        if not path.exists():
            todo.append(row)
    log.info(
        "%s: %d of %d images to generate (%d kept from an earlier run)",
        out_dir,
        len(todo),
        len(manifest),
        len(manifest) - len(todo),
    )

    if todo:
        if pipe is None:
            loader = loader or LazyPipeline(base_model, algorithm, weights_dir, dtype, device)
            pipe = loader()
        _generate(pipe, out_dir, todo, steps, guidance_scale, resolution, batch_size, negative)
    write_csv(out_dir / "manifest.csv", manifest, MANIFEST_FIELDS)
    return manifest


def _generate(
    pipe: Any,
    out_dir: Path,
    todo: list[dict],
    steps: int,
    guidance_scale: float,
    resolution: int,
    batch_size: int,
    negative: str,
) -> None:
    import torch

    cfg = guidance_scale > 1.0  # the pipeline's own rule for classifier-free guidance
    embeds: dict[int, tuple] = {}
    for row in todo:
        if row["prompt_id"] not in embeds:
            embeds[row["prompt_id"]] = encode_prompt(pipe, row["prompt"], negative, cfg)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for number, batch in enumerate(tqdm(batches, desc="sample", unit="batch", file=sys.stderr)):
        start = time.perf_counter()
        positive = torch.cat([embeds[row["prompt_id"]][0] for row in batch])
        negative_embeds = torch.cat([embeds[row["prompt_id"]][1] for row in batch]) if cfg else None
        with torch.no_grad():
            images = pipe(
                prompt_embeds=positive,
                negative_prompt_embeds=negative_embeds,
                latents=seed_latents(pipe, [row["seed"] for row in batch], resolution, resolution),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                output_type="pil",
            ).images
        for row, image in zip(batch, images, strict=True):
            with atomic_file(out_dir / row["path"], "wb") as handle:
                image.save(handle, format="PNG")
        log.info(
            "batch %d/%d: %d images (%s) in %.1f s",
            number + 1,
            len(batches),
            len(batch),
            ", ".join(row["path"] for row in batch),
            time.perf_counter() - start,
        )


__all__ = [
    "MANIFEST_FIELDS",
    "LazyPipeline",
    "encode_prompt",
    "expand_prompts",
    "image_ok",
    "load_arm_pipeline",
    "negative_prompt_from_descriptions",
    "sample_arm",
    "seed_latents",
]


def arm_prompts(
    templates: list[str],
    class_name: str,
    train_info: Path,
    negative_csv: Path | None = None,
    base_model: str | None = None,
    concept: str | None = None,
) -> tuple[str, list[dict], str | None]:
    """An arm's prompt token (from its `train_info.json`: the identifier, `<sks>` for Textual
    Inversion, `<new1>` for Custom Diffusion), its expanded prompts, and the negative prompt
    built from a description CSV when the arm's inference setting uses one. With
    `base_model`, the negative prompt keeps the whole parts that fit its tokenizer's window,
    so the manifest records what the text encoder really sees (not a cut mid-phrase). A concept
    subject's `concept` words stand in for the token in prompt_plain."""
    token = json.loads(Path(train_info).read_text())["token"]
    negative = None
    if negative_csv is not None:
        texts = [row["description"] for row in read_csv(negative_csv)]
        tokenizer = None
        if base_model is not None:
            from sidpipe.descriptions.text import load_base_tokenizer

            tokenizer = load_base_tokenizer(base_model)
        max_tokens = tokenizer.model_max_length if tokenizer is not None else 77
        negative = negative_prompt_from_descriptions(texts, class_name, tokenizer, max_tokens)
        if not negative:
            log.warning(
                "%s: the descriptions name nothing beside the subject, so the negative prompt "
                "is empty and this arm samples as the standard one",
                negative_csv,
            )
    return token, expand_prompts(templates, class_name, token, concept), negative
