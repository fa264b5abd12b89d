"""Biased personalization subjects drawn by the world, with ground truth.

Each subject has an identity its class word alone does not give (a colour and pattern pair
the base model draws about 1 time in 200 for "a {class}"), 4 views, and the biases of the SID
paper: the same background and nearby object in every view (background and nearby-object
bias), an object tied to the subject (tied-object bias) or one pose in every view (pose bias).
A subject folder holds `01.png`.. with `<stem>.mask.png` ground-truth masks, a
`descriptions.yaml` with Case 1-4 from the caption writer (the `manual` backend) and
`truth.json` (the identity and each view's scene), which the leak measures read.

`python -m sidpipe.world.subjects OUT_DIR [--table subjects.tsv]` writes the demo's subjects
(byte-reproducible).
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
    """subjects.tsv rows for `specs` (ground-truth masks: mask_backend provided)."""
    lines = ["subject\tclass\tkind\timages\tsource\tmask_backend\tbias"]
    for spec in specs:
        cls = spec.identity.cls
        lines.append(
            f"{spec.name}\t{cls}\t{CLASS_KIND[cls]}\t{folder}/{spec.name}\tlocal\t"
            f"provided\t{spec.bias}"
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
    for spec in DEMO_SUBJECTS:
        write_subject(spec, args.out / spec.name, args.resolution, args.seed)
        print(args.out / spec.name)
    if args.table:
        folder = os.path.relpath(args.out, args.table.parent)
        with atomic_file(args.table) as handle:
            handle.write(subjects_table(DEMO_SUBJECTS, folder))
        print(args.table)


if __name__ == "__main__":
    main()
