"""Competence of the world's base model: does it draw what a prompt asks, for combinations of
class, colour and background that no pretraining caption (or scene) held?"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sidpipe.world.captions import _PATTERN_WORDS, background_phrase
from sidpipe.world.grammar import COLOURS, SUBJECT_CLASSES
from sidpipe.world.judge import load_judge, read_images


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(centre - half, 4), round(centre + half, 4))


def with_article(phrase: str) -> str:
    """ "a red", "an orange": the article the world's captions put before a phrase (the caption
    writer's rule, `captions._article`, is private; making it public would edit `captions.py`,
    which the shipped weights' code digest covers, and mark them stale)."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def competence_prompts(held_out: list, seeds: list[int]) -> list[dict[str, Any]]:
    """ "a {colour} {class} {background}" for every held-out triple and seed ("an orange
    ...", as the captions write it)."""
    rows = []
    for cls, colour, background in sorted(tuple(t) for t in held_out):
        prompt = f"{with_article(colour)} {cls} {background_phrase(background, 'prompt')}"
        for seed in seeds:
            rows.append(
                {
                    "prompt": prompt,
                    "class": cls,
                    "colour": colour,
                    "background": background,
                    "seed": seed,
                }
            )
    return rows


def identity_prompts(per_pattern: int, seeds: list[int], seed: int = 0) -> list[dict[str, Any]]:
    """Prompts that name a subject's whole identity, as the captions' most detailed level
    writes it ("a blue mug with yellow spots on the beach"): per class and pattern (striped,
    spotted, two-tone), `per_pattern` random colour/accent pairs on random backgrounds
    (deterministic from `seed`), each with every seed of `seeds`."""
    from sidpipe.world.captions import subject_details
    from sidpipe.world.grammar import BACKGROUND_NAMES, COLOURS, PATTERNS, SUBJECT_CLASSES, Subject

    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    rows = []
    for cls in SUBJECT_CLASSES:
        for pattern in PATTERNS[1:]:
            for _ in range(per_pattern):
                colour, accent = (colours[i] for i in rng.choice(len(colours), 2, replace=False))
                background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))]
                before, after = subject_details(Subject(cls, colour, pattern, accent))
                where = background_phrase(background, "prompt")
                prompt = f"{with_article(before)} {cls} {after} {where}"
                identity = {"class": cls, "colour": colour, "pattern": pattern, "accent": accent}
                rows += [{"prompt": prompt, **identity, "seed": s} for s in seeds]
    return rows


def _generate(
    pipe: Any, rows: list[dict], steps: int, guidance_scale: float, batch_size: int
) -> list[Image.Image]:
    """The base pipeline's image for each row's prompt and seed, in batches."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        generators = [torch.Generator().manual_seed(int(r["seed"])) for r in chunk]
        out = pipe(
            [r["prompt"] for r in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=size,
            width=size,
        )
        images.extend(out.images)
    return images


def _accuracies(rows: list[dict], seen: list[dict], keys: Sequence[str]) -> dict[str, Any]:
    """Per key: how often the judge read it as asked, with a Wilson 95 % interval."""
    result = {}
    for key in keys:
        hits = int(sum(s[key] == r[key] for s, r in zip(seen, rows, strict=True)))
        result[key] = {"accuracy": round(hits / len(rows), 4), "ci95": wilson(hits, len(rows))}
    return result


@torch.no_grad()
def measure_competence(
    sd_model: str | Path,
    judge_model: str | Path,
    held_out: list,
    seeds: list[int],
    steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 64,
    identity_per_pattern: int = 0,
) -> dict[str, Any]:
    """Sample the base model on held-out combinations; the judge's read of background,
    colour and class: accuracy with Wilson 95 % intervals. With `identity_per_pattern`, also
    on prompts that name the whole identity (`identity_prompts`, the same seeds): class,
    colour, pattern, accent and all four at once (`subject_kept`'s identity), per pattern too;
    whether the base model can draw what a personalized arm must learn, when told."""
    from sidpipe.models import load_sd_pipeline

    pipe = load_sd_pipeline(
        str(sd_model), "float32", "cpu", source="the world's sd/ folder, written by pretrain_world"
    )
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(judge_model)
    rows = competence_prompts(held_out, seeds)
    images = _generate(pipe, rows, steps, guidance_scale, batch_size)
    seen = read_images(judge, images)
    result: dict[str, Any] = {"samples": len(rows), "prompts": len({r["prompt"] for r in rows})}
    result.update(_accuracies(rows, seen, ("background", "colour", "class")))
    result["class_by_class"] = accuracy_by_value(rows, seen, "class")
    result["colour_by_colour"] = accuracy_by_value(rows, seen, "colour")
    result["images"] = images
    result["rows"] = rows
    result["seen"] = seen
    if identity_per_pattern:
        named = identity_prompts(identity_per_pattern, seeds)
        named_seen = read_images(judge, _generate(pipe, named, steps, guidance_scale, batch_size))
        result["identity_named"] = identity_accuracy(named, named_seen)
    return result


def identity_accuracy(rows: list[dict], seen: list[dict]) -> dict[str, Any]:
    """How often the judge read each identity head as the prompt named it, all four at once
    (`subject_kept`'s identity), and the pattern per named pattern."""
    result: dict[str, Any] = {"samples": len(rows), **_accuracies(rows, seen, IDENTITY_HEADS)}
    hits = int(
        sum(all(s[h] == r[h] for h in IDENTITY_HEADS) for s, r in zip(seen, rows, strict=True))
    )
    result["all_four"] = {"accuracy": round(hits / len(rows), 4), "ci95": wilson(hits, len(rows))}
    result["pattern_by_pattern"] = accuracy_by_value(rows, seen, "pattern")
    return result


def accuracy_by_value(rows: list[dict], seen: list[dict], key: str) -> dict[str, dict]:
    """How often the judge reads `key` as asked, per asked value (each class, each colour), and
    what it read instead: which values the aggregate's misses come from."""
    read_as: dict[str, Counter] = {}
    for row, read in zip(rows, seen, strict=True):
        read_as.setdefault(row[key], Counter())[read[key]] += 1
    result = {}
    for value, counts in sorted(read_as.items()):
        n = sum(counts.values())
        result[value] = {
            "accuracy": round(counts[value] / n, 4),
            "ci95": wilson(counts[value], n),
            "n": n,
            "read_as": dict(counts),
        }
    return result


# --- what limits it: the text conditioning and the CLIP ------------------------------------------


@torch.no_grad()
def word_similarity(
    text_encoder: Any, tokenizer: Any, words: Sequence[str], template: str
) -> dict[str, Any]:
    """Cosine similarity of the text encoder's output at each word's last token, every pair of
    `words` put into the same `template` ("a red {} on the grass"). CLIP's text tower is causal,
    so that state depends on the template's prefix and the word only: two words whose states are
    nearly parallel reach the UNet's cross-attention as nearly the same condition, and the UNet
    cannot draw them apart (the tokenizer must give each word its own token(s))."""
    prompts = [template.format(word) for word in words]
    prefix = template.split("{}")[0]
    # [BOS, prefix..., word..., EOS]: the word's last token sits just before EOS
    positions = [len(tokenizer(prefix + word).input_ids) - 2 for word in words]
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    hidden = text_encoder(ids).last_hidden_state
    states = torch.stack([hidden[i, pos] for i, pos in enumerate(positions)])
    states = torch.nn.functional.normalize(states, dim=-1)
    cosine = (states @ states.T).numpy()
    pairs = [
        {"a": words[i], "b": words[j], "cosine": round(float(cosine[i, j]), 4)}
        for i in range(len(words))
        for j in range(i + 1, len(words))
    ]
    pairs.sort(key=lambda pair: -pair["cosine"])
    return {"template": template, "pairs": pairs, "max": pairs[0] if pairs else None}


def word_separation(text_encoder: Any, tokenizer: Any) -> dict[str, dict[str, Any]]:
    """`word_similarity` for what the UNet must tell apart: the class words, the colour words
    (each after the article the captions give it) and the pattern's noun as the captions write a
    pattern ("with yellow spots", "with a yellow top"), the only word that names the pattern."""
    nouns = [phrase.split()[-1] for phrase in _PATTERN_WORDS.values()]
    return {
        "class_words": word_similarity(
            text_encoder, tokenizer, SUBJECT_CLASSES, "a red {} on the grass"
        ),
        "colour_words": word_similarity(
            text_encoder, tokenizer, [with_article(c) for c in COLOURS], "{} dog on the grass"
        ),
        "pattern_words": word_similarity(
            text_encoder, tokenizer, nouns, "a blue mug with yellow {} on the grass"
        ),
    }


def zero_shot_accuracy(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    candidates: np.ndarray,
    truth: np.ndarray,
) -> float:
    """Share of images whose most similar text among their own `candidates` (image i: row i,
    indices into `text_features`) is the true one (`truth[i]`, an index into that row)."""
    image = torch.nn.functional.normalize(image_features, dim=-1)
    text = torch.nn.functional.normalize(text_features, dim=-1)
    scores = torch.einsum("id,icd->ic", image, text[torch.as_tensor(candidates)])
    return float((scores.argmax(1).numpy() == truth).mean())


def clip_attribute_accuracy(clip_model: str | Path, scenes: Any) -> dict[str, float]:
    """The world CLIP's zero-shot reading of each scene's class, colour and background, one at
    a time with the other two given: among "a {colour} {class} {background}" captions that
    differ from the truth in that one attribute, is the true one the closest? (The metrics'
    CLIP, and the text tower SD is conditioned on: a class it cannot read is a class whose
    words its contrastive training had no reason to tell apart.)"""
    from sidpipe.metrics import Encoders
    from sidpipe.world.grammar import BACKGROUND_NAMES, COLOURS, SUBJECT_CLASSES

    encoders = Encoders.load(str(clip_model), batch_size=256, device="cpu")
    colours = list(COLOURS)
    axes = {"class": list(SUBJECT_CLASSES), "colour": colours, "background": list(BACKGROUND_NAMES)}
    grid = [(k, c, b) for k in colours for c in SUBJECT_CLASSES for b in BACKGROUND_NAMES]
    index = {triple: i for i, triple in enumerate(grid)}
    texts = [f"{with_article(k)} {c} {background_phrase(b, 'prompt')}" for k, c, b in grid]
    text_features = encoders.encode_texts(texts)
    image_features = encoders.encode_images([Image.fromarray(image) for image in scenes.images])
    result = {}
    for axis, values in axes.items():
        candidates, truth = [], []
        for scene in scenes.scenes:
            true = {
                "colour": scene.subject.colour,
                "class": scene.subject.cls,
                "background": scene.background,
            }
            row = []
            for value in values:
                t = {**true, axis: value}
                row.append(index[(t["colour"], t["class"], t["background"])])
            candidates.append(row)
            truth.append(values.index(true[axis]))
        result[axis] = round(
            zero_shot_accuracy(
                image_features, text_features, np.array(candidates), np.array(truth)
            ),
            4,
        )
    return result


# The subject's identity as `subject_kept` asks for it (measures.image_measures).
IDENTITY_HEADS = ("class", "colour", "pattern", "accent")


def identity_read(predicted: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> np.ndarray:
    """Per image: every identity head read as labelled (a head without a label for the image,
    -1, as the accent of a plain subject, counts as read)."""
    ok = np.ones(len(labels[IDENTITY_HEADS[0]]), dtype=bool)
    for head in IDENTITY_HEADS:
        ok &= (predicted[head] == labels[head]) | (labels[head] < 0)
    return ok


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two [-1, 1] image batches (peak-to-peak 2)."""
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


@torch.no_grad()
def vae_fidelity(vae: Any, judge: Any, scenes: Any) -> dict[str, Any]:
    """What of a scene survives the world VAE's encode-decode (`trainers.reconstruct`): the
    PSNR, and the judge's reading of the real scenes against their reconstructions, per identity
    head and all four at once. Every image the UNet draws comes out of this decoder, so the
    reconstructions' identity rate bounds what `subject_kept` can reach."""
    from sidpipe.world.trainers import reconstruct

    real = scenes.pixels(slice(None))
    rebuilt = reconstruct(vae, scenes)
    result: dict[str, Any] = {"scenes": len(real), "psnr_db": round(psnr(real, rebuilt), 2)}
    for name, pixels in (("real", real), ("reconstructed", rebuilt)):
        outs = [judge(pixels[i : i + 512]) for i in range(0, len(pixels), 512)]
        predicted = {h: torch.cat([o[h] for o in outs]).argmax(1).numpy() for h in IDENTITY_HEADS}
        heads = {
            h: round(float((predicted[h] == scenes.labels[h])[scenes.labels[h] >= 0].mean()), 4)
            for h in IDENTITY_HEADS
        }
        identity = round(float(identity_read(predicted, scenes.labels).mean()), 4)
        result[name] = {**heads, "identity": identity}
    return result


@torch.no_grad()
def references_through_vae(
    vae: Any, judge: Any, subjects_dir: str | Path
) -> dict[str, dict[str, float]]:
    """Per world subject under `subjects_dir` (a folder with truth.json): the share of its
    reference views in which the judge sees the subject kept (`subject_kept` of the bare prompt
    "a [V] class"), as drawn and after the VAE's encode-decode, turned into images the way a
    pipeline turns its output into PNGs: whether the subject's identity can survive the VAE."""
    from diffusers.image_processor import VaeImageProcessor

    from sidpipe.world.judge import to_pixels
    from sidpipe.world.measures import image_measures, read_truth

    to_images = VaeImageProcessor(do_resize=False)
    out = {}
    for truth_path in sorted(Path(subjects_dir).glob("*/truth.json")):
        truth = read_truth(truth_path)
        prompt = f"a {truth['identity']['class']}"
        views = sorted(truth_path.parent.glob("[0-9][0-9].png"))
        images = [Image.open(path).convert("RGB") for path in views]
        pixels = to_pixels(images, judge.resolution)
        rebuilt = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        out[truth_path.parent.name] = {
            name: round(
                float(np.mean([image_measures(s, prompt, truth)["subject_kept"] for s in seen])),
                4,
            )
            for name, seen in (
                ("references", read_images(judge, images)),
                ("reconstructed", read_images(judge, to_images.postprocess(rebuilt, "pil"))),
            )
        }
    return out


def contact_sheet(images: list, columns: int = 16, scale: int = 2):
    """The images in a grid (nearest upscaling), for a quick look."""
    from PIL import Image

    arrays = [np.asarray(i) for i in images]
    h, w = arrays[0].shape[:2]
    rows = math.ceil(len(arrays) / columns)
    sheet = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for k, a in enumerate(arrays):
        r, c = divmod(k, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = a
    return Image.fromarray(sheet).resize(
        (columns * w * scale, rows * h * scale), Image.Resampling.NEAREST
    )
