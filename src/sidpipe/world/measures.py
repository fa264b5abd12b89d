"""Ground-truth entanglement measures of generated images, read by the world's judge.

Per image, from what the judge sees, what the prompt asks (`prompts.read_prompt`) and the
subject's truth (`truth.json` of its folder):

* leak_background: the judge sees one of the references' backgrounds that the prompt did not
  ask for (undefined when the prompt asks for the references' only background);
* leak_object: a non-subject element of the references appears although the prompt does not
  name it (undefined for subjects whose references have none);
* leak_pose: the subject is upside down although the prompt does not ask for it (only for
  subjects whose references are all upside down);
* subject_kept: the judge sees the subject's class and identity (its pattern and accent colour,
  and its own colour unless the prompt asks for another one); undefined for a prompt that does
  not name the subject's class (a concept subject's transfer prompt);
* leak_subject: on a prompt that does not name the subject's class (a concept subject's
  transfer prompt, "an upside down mug" for a concept learned on a dog), the judge sees the
  carrier: its class, or its body colour where the prompt asks no colour of the class it draws
  (its first class noun) (Lego's subject leak; the base model's rate of it is the chance level);
* kept_class, kept_colour, kept_pattern, kept_accent: each part of subject_kept on its own
  (where subject_kept is defined; kept_colour only where the prompt keeps the subject's colour,
  kept_accent only for a subject with a pattern), so summary.csv shows which part of the
  identity an arm learns;
* prompt_followed: everything the prompt asks besides the subject is there (background, colour,
  hat, upside down); undefined for a prompt that asks for nothing else.

Each is 0 or 1; undefined measures get no row. Lower is better for the leaks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidpipe.io import SidpipeError
from sidpipe.sampling import names_class
from sidpipe.world.grammar import SUBJECT_CLASSES
from sidpipe.world.prompts import read_prompt

IDENTITY_PARTS = ("kept_class", "kept_colour", "kept_pattern", "kept_accent")
MEASURES = (
    "leak_background",
    "leak_object",
    "leak_pose",
    "leak_subject",
    "subject_kept",
    *IDENTITY_PARTS,
    "prompt_followed",
)
PRESENT = 0.5  # a flag the judge gives more than this probability is seen


def read_truth(path: str | Path, reference_subset: int | str | None = None) -> dict[str, Any]:
    """A subject's truth.json, with the facts the measures use (of the views a reference
    subset keeps: a single-reference arm leaks only what its one reference shows)."""
    from sidpipe.subsets import select_references

    path = Path(path)
    try:
        truth = json.loads(path.read_text(encoding="utf-8"))
        keep = select_references(list(truth["views"]), reference_subset, str(path))
        views = [truth["views"][view] for view in keep]
        identity = truth["identity"]
    except (OSError, ValueError, KeyError) as exc:
        raise SidpipeError(
            f"{path}: not a world subject's truth.json ({exc}); write the subject with "
            "`python -m sidpipe.world.subjects`"
        ) from exc
    return {
        "identity": identity,
        "backgrounds": sorted({v["background"] for v in views}),
        "elements": sorted({e["kind"] for v in views for e in v.get("elements", [])}),
        "upside_down": all(v["subject"]["upside_down"] for v in views),
    }


_CLASS_WORD = re.compile(r"\b(" + "|".join(map(re.escape, SUBJECT_CLASSES)) + r")\b")


def prompt_class(prompt: str) -> str | None:
    """The world class a prompt draws: the first class noun in it (None without one)."""
    match = _CLASS_WORD.search(prompt)
    return match.group(1) if match else None


def image_measures(seen: dict[str, Any], prompt: str, truth: dict[str, Any]) -> dict[str, float]:
    """The measures of one image (undefined ones left out)."""
    identity = truth["identity"]
    asked = read_prompt(prompt, identity["class"])
    out: dict[str, float] = {}
    other_backgrounds = set(truth["backgrounds"]) - {asked["background"]}
    if other_backgrounds:
        out["leak_background"] = float(seen["background"] in other_backgrounds)
    unasked = [e for e in truth["elements"] if e not in asked["elements"]]
    if unasked:
        out["leak_object"] = float(any(seen[e] > PRESENT for e in unasked))
    if truth["upside_down"] and not asked["upside_down"]:
        out["leak_pose"] = float(seen["upside_down"] > PRESENT)
    parts = {
        "kept_class": seen["class"] == identity["class"],
        "kept_pattern": seen["pattern"] == identity["pattern"],
    }
    if identity["pattern"] != "plain":
        parts["kept_accent"] = seen["accent"] == identity["accent"]
    if asked["colour"] is None:
        parts["kept_colour"] = seen["colour"] == identity["colour"]
    # A concept subject's transfer prompt asks for another class: the subject is not asked for.
    if names_class(prompt, identity["class"]):
        out["subject_kept"] = float(all(parts.values()))
        out |= {name: float(parts[name]) for name in IDENTITY_PARTS if name in parts}
    else:
        # the colour asked for the class the prompt draws (its first class noun), if any
        drawn = prompt_class(prompt)
        asks_colour = drawn is not None and read_prompt(prompt, drawn)["colour"] is not None
        carrier_colour = not asks_colour and seen["colour"] == identity["colour"]
        out["leak_subject"] = float(parts["kept_class"] or carrier_colour)
    checks = []
    if asked["background"]:
        checks.append(seen["background"] == asked["background"])
    if asked["colour"]:
        checks.append(seen["colour"] == asked["colour"])
    if asked["hat"]:
        checks.append(seen["hat"] > PRESENT)
    if asked["upside_down"]:
        checks.append(seen["upside_down"] > PRESENT)
    if checks:
        out["prompt_followed"] = float(all(checks))
    return out


def measure_images(
    judge: Any, images: Sequence, prompts: Sequence[str], truth: dict[str, Any]
) -> list[dict[str, float]]:
    """`image_measures` of every image (PIL) with its prompt (plain, without the identifier)."""
    from sidpipe.world.judge import read_images

    if len(images) != len(prompts):
        raise SidpipeError(f"{len(images)} images but {len(prompts)} prompts")
    seen = read_images(judge, list(images))
    return [image_measures(s, p, truth) for s, p in zip(seen, prompts, strict=True)]


def measure_arm(
    samples_dir: Path,
    truth_json: Path,
    judge_model: str,
    subject: str,
    method: str,
    descriptions: str,
    inference: str,
    reference_subset: int | str | None = None,
) -> list[dict]:
    """The measures of every image of one arm and subject as long rows in `metrics.FIELDS`
    (the score stage appends them to SA/NSD/TA's rows); a reference subset's arm leaks only
    what its references show."""
    from PIL import Image

    from sidpipe.io import read_manifest
    from sidpipe.world.judge import load_judge

    samples_dir = Path(samples_dir)
    columns = ["prompt_id", "prompt", "prompt_plain", "seed", "path"]
    samples = read_manifest(samples_dir, "samples", "sample_arm", columns)
    from sidpipe.subsets import split_name

    if reference_subset is None:  # the subset a method's name carries (dreambooth--first1)
        reference_subset = split_name(method)[1]
    truth = read_truth(truth_json, reference_subset)
    from sidpipe.metric_tables import image_keys

    judge = load_judge(judge_model)
    images = []
    for row in samples:
        with Image.open(samples_dir / row["path"]) as handle:
            images.append(handle.convert("RGB"))
    values = measure_images(judge, images, [row["prompt_plain"] for row in samples], truth)
    out = []
    for row, measures in zip(samples, values, strict=True):
        keys = image_keys(row, samples_dir / row["path"], subject, method, descriptions, inference)
        out += [{**keys, "metric": n, "value": measures[n]} for n in MEASURES if n in measures]
    return out
