"""Biased personalization subjects drawn by the world, with ground truth.

Each subject has an identity its class word alone does not give (a colour and pattern pair
the base model draws about 1 time in 200 for "a {class}"), 4 views, and the biases of the SID
paper: the same background and nearby object in every view (background and nearby-object
bias), an object tied to the subject (tied-object bias) or one pose in every view (pose bias).
The concept subjects (kind `concept`, for Lego) show a concept beyond appearance on a carrier
with its own look, in 4 views on 4 backgrounds: "upside down" (the subject's own pose) and
"wearing a red hat" (mostly outside the subject's mask). What the views share is the carrier
and the concept, so the carrier is what can leak into the concept's tokens.
A subject folder holds `01.png`.. with `<stem>.mask.png` ground-truth masks, a
`descriptions.yaml` with Case 1-4 from the caption writer (the `manual` backend) and
`truth.json` (the identity and each view's scene), which the leak measures read.

`python -m sidpipe.world.subjects OUT_DIR [--table subjects.tsv]` writes the demo's subjects,
the concept subjects included (byte-reproducible).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from sidpipe.io import atomic_dir, atomic_file
from sidpipe.world.captions import describe
from sidpipe.world.draw import render
from sidpipe.world.grammar import CLASS_KIND, Element, Scene, Subject


@dataclass(frozen=True)
class SubjectSpec:
    name: str
    identity: Subject
    bias: str  # the SID paper's bias types, comma-separated
    backgrounds: tuple[str, ...]  # one per view (repeated: a background bias)
    elements: tuple[tuple[Element, ...], ...]  # per view
    concept: str = ""  # a concept subject's concept in words (the subjects table's column)


def _same(element: Element, sides: tuple[str, ...]) -> tuple[tuple[Element, ...], ...]:
    return tuple((Element(element.kind, element.colour, element.size, side),) for side in sides)


DEMO_SUBJECTS: tuple[SubjectSpec, ...] = (
    SubjectSpec(
        "blue_mug",
        Subject("mug", "blue", "spotted", "yellow"),
        "background,nearby-object",
        ("tablecloth",) * 4,
        _same(Element("plant", "orange", "small", "left"), ("left", "right", "right", "left")),
    ),
    SubjectSpec(
        "toy_robot",
        Subject("robot", "blue", "striped", "yellow"),
        "background,nearby-object",
        ("brick wall",) * 4,
        _same(Element("box", "orange", "large", "left"), ("right", "left", "right", "right")),
    ),
    SubjectSpec(
        "spotted_dog",
        Subject("dog", "white", "spotted", "blue"),
        "background,nearby-object",
        ("night sky",) * 4,
        tuple(
            (
                Element("fence", "orange", "small", "behind"),
                Element("frisbee", "yellow", "small", s),
            )
            for s in ("left", "right", "left", "left")
        ),
    ),
    SubjectSpec(
        "balloon_car",
        Subject("car", "yellow", "two-tone", "blue"),
        "tied-object",
        ("grass", "wooden floor", "city", "snow"),
        _same(Element("balloon", "red", "large", "tied"), ("tied",) * 4),
    ),
    SubjectSpec(
        "upside_robot",
        Subject("robot", "pink", "spotted", "green", upside_down=True),
        "pose",
        ("beach", "jungle", "pink fabric", "mountain"),
        ((), (), (), ()),
    ),
)


# Concept subjects (Lego): the concept is a pose or a hat. Each carrier's colour and pattern
# are its own, so the judge can tell the carrier leaking (its class or colour) from the concept.
CONCEPT_SUBJECTS: tuple[SubjectSpec, ...] = (
    SubjectSpec(
        "upside_down_dog",
        Subject("dog", "green", "striped", "white", upside_down=True),
        "",
        ("grass", "city", "snow", "wooden floor"),
        ((), (), (), ()),
        concept="upside down",
    ),
    SubjectSpec(
        "upside_down_car",
        Subject("car", "red", "two-tone", "white", upside_down=True),
        "",
        ("beach", "brick wall", "night sky", "tablecloth"),
        ((), (), (), ()),
        concept="upside down",
    ),
    # A concept outside the subject: about 3/4 of the hat's pixels lie outside the subject's
    # mask (the brim covers the top of the head), where Lego's subject separation sends the
    # concept (the pose above has no such region). The world puts hats on the classes with a
    # head only, so each carrier's transfer class is the other one.
    SubjectSpec(
        "red_hat_dog",
        Subject("dog", "purple", "spotted", "white", hat="red"),
        "",
        ("jungle", "wooden floor", "beach", "city"),
        ((), (), (), ()),
        concept="wearing a red hat",
    ),
    SubjectSpec(
        "red_hat_robot",
        Subject("robot", "orange", "striped", "green", hat="red"),
        "",
        ("grass", "night sky", "snow", "pink fabric"),
        ((), (), (), ()),
        concept="wearing a red hat",
    ),
)
WORLD_SUBJECTS = DEMO_SUBJECTS + CONCEPT_SUBJECTS


def view_scenes(spec: SubjectSpec, seed: int) -> list[Scene]:
    """The subject's views: its identity, each view's background and elements, placement and
    (for classes with a left/right) facing drawn from `seed`."""
    rng = np.random.default_rng(seed)
    scenes = []
    for background, elements in zip(spec.backgrounds, spec.elements, strict=True):
        facing = "left" if rng.random() < 0.5 else "right"
        identity = Subject(**{**spec.identity.__dict__, "facing": facing})
        scenes.append(
            Scene(
                identity,
                background,
                elements,
                x=float(rng.uniform(0.44, 0.56)),
                scale=float(rng.uniform(0.9, 1.08)),
            )
        )
    return scenes


def write_subject(spec: SubjectSpec, out_dir: Path, resolution: int = 32, seed: int = 0) -> Path:
    """Write one subject folder (images, masks, descriptions.yaml, truth.json) atomically."""
    scenes = view_scenes(spec, seed)
    with atomic_dir(out_dir) as tmp:
        descriptions = {}
        for i, scene in enumerate(scenes, start=1):
            stem = f"{i:02d}"
            image, mask = render(scene, resolution, seed=seed * 100 + i)
            image.save(tmp / f"{stem}.png", optimize=False)
            mask.save(tmp / f"{stem}.mask.png", optimize=False)
            descriptions[stem] = {f"case{c}": describe(scene, c) for c in (1, 2, 3, 4)}
        header = (
            f"# Case 1-4 descriptions of {spec.name}, written by the world's caption "
            "writer (sidpipe.world.captions.describe).\n"
        )
        (tmp / "descriptions.yaml").write_text(
            header + yaml.safe_dump(descriptions, sort_keys=True, width=200), encoding="utf-8"
        )
        truth = {
            "subject": spec.name,
            "identity": Scene(spec.identity, spec.backgrounds[0]).truth()["subject"],
            "bias": spec.bias,
            "views": {f"{i:02d}": s.truth() for i, s in enumerate(scenes, start=1)},
        }
        (tmp / "truth.json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)


def subjects_table(specs: tuple[SubjectSpec, ...], folder: str) -> str:
    """subjects.tsv rows for `specs` (ground-truth masks: mask_backend provided); a spec
    with a concept is of kind `concept`."""
    lines = ["subject\tclass\tkind\timages\tsource\tmask_backend\tbias\tconcept"]
    for spec in specs:
        cls = spec.identity.cls
        kind = "concept" if spec.concept else CLASS_KIND[cls]
        lines.append(
            f"{spec.name}\t{cls}\t{kind}\t{folder}/{spec.name}\tlocal\t"
            f"provided\t{spec.bias}\t{spec.concept}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the subject folders (demo/subjects)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--table", type=Path, help="also write this subjects.tsv (paths relative to its folder)"
    )
    args = parser.parse_args(argv)
    for spec in WORLD_SUBJECTS:
        write_subject(spec, args.out / spec.name, args.resolution, args.seed)
        print(args.out / spec.name)
    if args.table:
        folder = os.path.relpath(args.out, args.table.parent)
        with atomic_file(args.table) as handle:
            handle.write(subjects_table(WORLD_SUBJECTS, folder))
        print(args.table)


if __name__ == "__main__":
    main()
