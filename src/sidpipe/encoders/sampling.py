"""Stage `sample` for the arms without a training job: the encoder-based ones (BLIP-Diffusion,
ELITE; the subject's reference goes to the encoder at sampling time) and the base model (the
prompts without the identifier). Images and manifest as `sample_arm` writes them
(`{prompt_id:02d}_{seed:02d}.png`, same prompts and seeds), so `score`, the tables and the plots
treat these arms like any other.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from sidpipe.encoders import BASE_MODEL_ALGORITHM, UNTRAINED_ALGORITHMS
from sidpipe.io import SidpipeError, atomic_file, log, read_manifest, write_csv
from sidpipe.sampling import MANIFEST_FIELDS, expand_prompts, image_name
from sidpipe.subsets import select_references

# ELITE names the subject with the word S in place of "[V] class" ("a photo of a S").
ELITE_WORD = "S"


def reference_of(
    references_dir: Path, masks_dir: Path | None, reference_subset: int | str | None, where: str
) -> tuple[str, Image.Image, Image.Image | None]:
    """The one reference an encoder sees: the subset's first (the first image when no subset
    is given), with its subject mask when `masks_dir` is given."""
    refs = read_manifest(references_dir, "references", "prepare_references", ("image_id", "path"))
    ids = select_references([r["image_id"] for r in refs], reference_subset or 1, where)
    if len(ids) > 1:
        log.warning("%s: an encoder takes one reference; using %s of %s", where, ids[0], ids)
    row = next(r for r in refs if r["image_id"] == ids[0])
    with Image.open(Path(references_dir) / row["path"]) as handle:
        image = handle.convert("RGB")
    mask = None
    if masks_dir is not None:
        masks = read_manifest(masks_dir, "masks", "segment_references", ("image_id", "mask_path"))
        hit = [m for m in masks if m["image_id"] == ids[0]]
        if not hit:
            raise SidpipeError(f"{masks_dir}/manifest.csv has no mask for reference {ids[0]}")
        with Image.open(Path(masks_dir) / hit[0]["mask_path"]) as handle:
            mask = handle.convert("L")
    return ids[0], image, mask


def sample_encoder_arm(
    algorithm: str,
    settings: dict,
    out_dir: Path,
    templates: list[str],
    class_name: str,
    seeds: list[int],
    references_dir: Path | None = None,
    masks_dir: Path | None = None,
    reference_subset: int | str | None = None,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int = 512,
    batch_size: int = 4,
    dtype: str = "float16",
    device: str = "auto",
    concept: str | None = None,
) -> list[dict]:
    """Generate every (prompt, seed) image of an arm without training into `out_dir` with
    `manifest.csv` (written last); return its rows. `settings` is the method's config entry:
    BLIP-Diffusion's `model`; ELITE's `base_model`, `image_encoder`, `global_mapper`,
    `local_mapper` and optional `lambda`; the base model's `model` (its Stable Diffusion, which
    gets each prompt without the identifier, a concept subject's with the concept's words)."""
    if algorithm not in UNTRAINED_ALGORITHMS:
        raise SidpipeError(
            f"{algorithm!r} is not an algorithm without training ({UNTRAINED_ALGORITHMS})"
        )
    out_dir = Path(out_dir)
    if algorithm == BASE_MODEL_ALGORITHM:
        from sidpipe.sampling import sample_arm

        plain = expand_prompts(templates, class_name, "", concept)
        return sample_arm(
            settings["model"],
            out_dir,
            [{**row, "prompt": row["prompt_plain"]} for row in plain],
            seeds,
            None,
            None,
            "",
            steps=steps,
            guidance_scale=guidance_scale,
            resolution=resolution,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
        )
    if references_dir is None:
        raise SidpipeError(f"{algorithm} needs the subject's references (references_dir)")
    out_dir.mkdir(parents=True, exist_ok=True)
    image_id, reference, mask = reference_of(
        references_dir, masks_dir if algorithm == "elite" else None, reference_subset, class_name
    )
    plain = expand_prompts(templates, class_name, "")
    if algorithm == "blip_diffusion":
        from sidpipe.encoders.blip_diffusion import (
            generate,
            load_blip_diffusion,
            subject_and_context,
        )

        pipe = load_blip_diffusion(settings["model"], dtype, device)
        seen = [row["prompt_plain"] for row in plain]
        parts = {p: subject_and_context(p, class_name) for p in seen}

        def make(prompts: list[str]) -> list[Image.Image]:
            # one (prompt, seed) pair per image, prompt-major
            return generate(
                pipe,
                reference,
                class_name,
                [parts[p][1] for p in prompts for _ in seeds],
                [s for _ in prompts for s in seeds],
                steps,
                guidance_scale,
                resolution,
                batch_size=batch_size,
                targets=[parts[p][0] for p in prompts for _ in seeds],
            )
    else:
        from sidpipe.encoders.elite import load_elite

        elite = load_elite(
            settings["base_model"],
            settings["image_encoder"],
            Path(settings["global_mapper"]).expanduser(),
            Path(settings["local_mapper"]).expanduser() if settings.get("local_mapper") else None,
            dtype,
            device,
        )
        seen = [row["prompt"] for row in expand_prompts(templates, "", ELITE_WORD)]

        def make(prompts: list[str]) -> list[Image.Image]:
            # prompts x seeds, prompt-major; the reference is encoded once per call
            return elite.generate(
                reference,
                mask,
                prompts,
                list(seeds),
                steps,
                guidance_scale,
                resolution,
                scheduler="ddim",
                llambda=float(settings.get("lambda", 0.8)),
                batch_size=batch_size,
            )

    log.info("%s: reference %s, %d prompts x %d seeds", algorithm, image_id, len(plain), len(seeds))
    manifest = []
    # Calls of about `batch_size` images (whole prompts), so the progress bar moves and each
    # call encodes the reference once.
    per_call = max(1, batch_size // len(seeds))
    chunks = [list(range(i, min(i + per_call, len(plain)))) for i in range(0, len(plain), per_call)]
    for chunk in tqdm(chunks, desc=algorithm, unit="call", file=sys.stderr):
        pairs = [(i, seed) for i in chunk for seed in seeds]
        for (i, seed), image in zip(pairs, make([seen[i] for i in chunk]), strict=True):
            row, prompt = plain[i], seen[i]
            name = image_name(row["prompt_id"], seed)
            with atomic_file(out_dir / name, "wb") as handle:
                image.save(handle, format="PNG")
            manifest.append(
                {
                    "prompt_id": row["prompt_id"],
                    "prompt": prompt,
                    "prompt_plain": row["prompt_plain"],
                    "seed": seed,
                    "path": name,
                    "negative_prompt": "",
                }
            )
    write_csv(out_dir / "manifest.csv", manifest, MANIFEST_FIELDS)
    return manifest
