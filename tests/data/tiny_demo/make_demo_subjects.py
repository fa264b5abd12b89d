#!/usr/bin/env python3
"""Draw the built-in demo's tiny synthetic personalization subjects.

Each subject gets 4 small RGB photos (stems ``01``..``04``) in which the subject moves and
changes size, but always appears with the same strongly biased surroundings. Those
surroundings are what leaks into ``[V]`` under plain "a [V] class" captions and what SID's
Case 3 descriptions are meant to disentangle:

* ``red_mug``     - always on a blue and white checkered tablecloth next to a potted plant;
* ``toy_robot``   - always in front of a yellow brick wall with a red ball nearby;
* ``spotted_dog`` - always on grass in front of a wooden fence with an orange frisbee.

Next to every ``<stem>.png`` the script writes ``<stem>.mask.png`` (mode L, 0/255), the
ground-truth silhouette of the subject alone, drawn with the same shapes as the subject.
``descriptions.yaml`` holds hand-written Case 1-4 descriptions of every image; the layout
table below fixes on which side each distractor is drawn, and the script checks that the
Case 3/4 texts name that side.

Only numpy (seeded RNG) and PIL.ImageDraw are used, no metadata is written into the PNGs,
and each subject folder is written to a temporary sibling and renamed into place, so the
script is idempotent (byte-identical reruns) and a crash never leaves a half-written
folder.

Usage: python tests/data/tiny_demo/make_demo_subjects.py [--out DIR]
(default: the subjects/ folder beside it)
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SEED = 20240611
CASES = ("case1", "case2", "case3", "case4")
MAX_WORDS = 50

Color = tuple[int, int, int]


class Canvas:
    """An RGB image plus the subject's binary mask, drawn in lockstep."""

    def __init__(self, size: tuple[int, int], background: Color):
        self.image = Image.new("RGB", size, background)
        self.mask = Image.new("L", size, 0)
        self.draw = ImageDraw.Draw(self.image)
        self.mdraw = ImageDraw.Draw(self.mask)

    def subject(self, shape: str, *args, fill: Color | None, **kwargs) -> None:
        """Draw a silhouette-defining subject part on the image and, in white, on the mask."""
        getattr(self.draw, shape)(*args, fill=fill, **kwargs)
        if "outline" in kwargs:
            kwargs["outline"] = 255
        getattr(self.mdraw, shape)(*args, fill=None if fill is None else 255, **kwargs)

    def detail(self, shape: str, *args, **kwargs) -> None:
        """Draw on the image only (background, distractors, details inside the subject)."""
        getattr(self.draw, shape)(*args, **kwargs)


def _shade(color: Color, delta: int) -> Color:
    return tuple(int(min(255, max(0, c + delta))) for c in color)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# red_mug: blue/white checkered tablecloth, cream wall, green plant in a terracotta pot.
# --------------------------------------------------------------------------------------------
MUG_RED: Color = (200, 25, 30)
MUG_LAYOUT = {
    # cx: mug centre x, bottom: mug bottom y, w: mug width, plant: side, plant_cx: pot centre
    "01": {"cx": 60, "bottom": 80, "w": 28, "plant": "left", "plant_cx": 20},
    "02": {"cx": 34, "bottom": 84, "w": 30, "plant": "right", "plant_cx": 76},
    "03": {"cx": 56, "bottom": 90, "w": 40, "plant": "left", "plant_cx": 5},
    "04": {"cx": 40, "bottom": 74, "w": 26, "plant": "right", "plant_cx": 80},
}


def _draw_plant(cv: Canvas, rng: np.random.RandomState, cx: int, base: int, scale: float) -> None:
    pot_w, pot_h = int(18 * scale), int(15 * scale)
    leaf_greens = [(40, 140, 50), (60, 170, 60), (30, 115, 40)]
    for _ in range(9):
        angle = rng.uniform(-2.4, -0.7)
        reach = rng.uniform(8, 17) * scale
        lx = cx + np.cos(angle) * reach
        ly = base - pot_h + np.sin(angle) * reach
        rx, ry = rng.uniform(4, 6) * scale, rng.uniform(2.5, 4) * scale
        green = leaf_greens[rng.randint(len(leaf_greens))]
        cv.detail("line", [(cx, base - pot_h), (lx, ly)], fill=(30, 100, 35), width=1)
        cv.detail("ellipse", [lx - rx, ly - ry, lx + rx, ly + ry], fill=green)
    terracotta = (190, 95, 55)
    cv.detail(
        "polygon",
        [
            (cx - pot_w / 2, base - pot_h),
            (cx + pot_w / 2, base - pot_h),
            (cx + pot_w / 3, base),
            (cx - pot_w / 3, base),
        ],
        fill=terracotta,
    )
    cv.detail(
        "rectangle",
        [cx - pot_w / 2 - 1, base - pot_h - 3, cx + pot_w / 2 + 1, base - pot_h],
        fill=_shade(terracotta, -25),
    )


def draw_red_mug(stem: str, rng: np.random.RandomState) -> Canvas:
    lay = MUG_LAYOUT[stem]
    cv = Canvas((96, 96), (238, 228, 205))  # plain cream wall
    table_y = 46
    cell = 8
    for row, y in enumerate(range(table_y, 96, cell)):
        for col, x in enumerate(range(0, 96, cell)):
            color = (40, 80, 190) if (row + col) % 2 == 0 else (245, 245, 245)
            cv.detail("rectangle", [x, y, x + cell - 1, y + cell - 1], fill=color)

    jitter = int(rng.randint(-2, 3))
    _draw_plant(cv, rng, lay["plant_cx"] + jitter, lay["bottom"] - 4, scale=lay["w"] / 28)

    cx, bottom, w = lay["cx"] - jitter, lay["bottom"], lay["w"]
    h = int(round(1.05 * w))
    top = bottom - h
    left, right = cx - w // 2, cx + w // 2
    # White handle on the mug's right side (a thick ring; its hole is not part of the mask).
    handle_w = max(4, w // 7)
    handle = [right - handle_w, top + h // 5, right + int(0.38 * w), bottom - h // 4]
    cv.subject("ellipse", handle, fill=None, outline=(120, 120, 125), width=handle_w)
    inner = [handle[0] + 1, handle[1] + 1, handle[2] - 1, handle[3] - 1]
    cv.detail("ellipse", inner, fill=None, outline=(252, 252, 252), width=handle_w - 2)
    cv.subject("rounded_rectangle", [left, top, right, bottom], radius=max(2, w // 8), fill=MUG_RED)
    cv.subject("ellipse", [left, top - 3, right, top + 3], fill=MUG_RED)
    cv.detail("ellipse", [left + 2, top - 2, right - 2, top + 2], fill=(90, 10, 15))  # opening
    cv.detail(
        "rectangle",
        [left + w // 5, top + 5, left + w // 5 + max(2, w // 9), bottom - 5],
        fill=(240, 110, 110),  # glossy highlight
    )
    return cv


MUG_TEXT = {
    "01": {
        "case2": "a [V] mug on a tablecloth next to a plant in front of a wall",
        "case3": "a [V] mug on a blue and white checkered tablecloth, next to a small green "
        "leafy plant in a terracotta pot on the left, in front of a plain cream wall",
        "case4": "a glossy red ceramic [V] mug with a white handle on its right side, on a "
        "blue and white checkered tablecloth, next to a small green leafy plant in a "
        "terracotta pot on the left, in front of a plain cream wall",
    },
    "02": {
        "case2": "a [V] mug on a tablecloth next to a plant in front of a wall",
        "case3": "a [V] mug on a blue and white checkered tablecloth, with a small green "
        "leafy plant in a terracotta pot on the right, in front of a plain cream wall",
        "case4": "a glossy red ceramic [V] mug with a white handle on its right side, on a "
        "blue and white checkered tablecloth, with a small green leafy plant in a "
        "terracotta pot on the right, in front of a plain cream wall",
    },
    "03": {
        "case2": "a [V] mug on a tablecloth next to a plant in front of a wall",
        "case3": "a [V] mug on a blue and white checkered tablecloth, with a "
        "green leafy plant in a terracotta pot cut off at the edge on the left, plain cream "
        "wall behind",
        "case4": "a close-up of a glossy red ceramic [V] mug with a white handle on its right "
        "side, on a blue and white checkered tablecloth, with a green leafy plant in a "
        "terracotta pot cut off at the edge on the left, plain cream wall behind",
    },
    "04": {
        "case2": "a [V] mug on a tablecloth next to a plant in front of a wall",
        "case3": "a [V] mug on a blue and white checkered tablecloth, next to a small green "
        "leafy plant in a terracotta pot on the right, in front of a plain cream wall",
        "case4": "a small glossy red ceramic [V] mug with a white handle on its right side, "
        "further back on a blue and white checkered tablecloth, next to a small green leafy "
        "plant in a terracotta pot on the right, in front of a plain cream wall",
    },
}


# --------------------------------------------------------------------------------------------
# toy_robot: yellow brick wall, grey concrete floor, red rubber ball. Non-square (112x96).
# --------------------------------------------------------------------------------------------
ROBOT_LAYOUT = {
    # cx: robot centre x, bottom: feet y, s: scale, ball: side, ball_cx, ball_r
    "01": {"cx": 70, "bottom": 86, "s": 1.0, "ball": "left", "ball_cx": 24, "ball_r": 9},
    "02": {"cx": 40, "bottom": 90, "s": 1.1, "ball": "right", "ball_cx": 90, "ball_r": 10},
    "03": {"cx": 58, "bottom": 94, "s": 1.35, "ball": "right", "ball_cx": 107, "ball_r": 11},
    "04": {"cx": 76, "bottom": 80, "s": 0.85, "ball": "left", "ball_cx": 30, "ball_r": 8},
}


def draw_toy_robot(stem: str, rng: np.random.RandomState) -> Canvas:
    lay = ROBOT_LAYOUT[stem]
    width, height = 112, 96
    floor_y = 60
    cv = Canvas((width, height), (150, 150, 145))  # grey concrete floor
    mortar = (175, 140, 40)
    cv.detail("rectangle", [0, 0, width, floor_y], fill=mortar)
    brick_w, brick_h = 14, 7
    for row, y in enumerate(range(0, floor_y, brick_h)):
        offset = 0 if row % 2 == 0 else -brick_w // 2
        for x in range(offset, width, brick_w):
            tone = int(rng.randint(-12, 13))
            cv.detail(
                "rectangle",
                [x + 1, y + 1, x + brick_w - 1, min(y + brick_h - 1, floor_y - 1)],
                fill=_shade((235, 195, 45), tone),
            )
    cv.detail("line", [(0, floor_y), (width, floor_y)], fill=(120, 120, 115), width=2)

    # Red rubber ball resting on the floor.
    bx, r = lay["ball_cx"] + int(rng.randint(-2, 3)), lay["ball_r"]
    by = lay["bottom"] - r - int(rng.randint(0, 4))
    cv.detail("ellipse", [bx - r, by - r, bx + r, by + r], fill=(215, 30, 35))
    cv.detail(
        "ellipse", [bx - r // 2, by - r // 2 - 1, bx - r // 6, by - r // 6], fill=(250, 150, 150)
    )

    s, cx, bottom = lay["s"], lay["cx"], lay["bottom"]
    silver, dark = (180, 185, 195), (110, 115, 125)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [cx + x0 * s, bottom - y1 * s, cx + x1 * s, bottom - y0 * s]

    cv.subject("rectangle", box(-9, 0, -3, 14), fill=dark)  # legs (y measured upward)
    cv.subject("rectangle", box(3, 0, 9, 14), fill=dark)
    cv.subject("rectangle", box(-17, 20, -12, 36), fill=dark)  # arms
    cv.subject("rectangle", box(12, 20, 17, 36), fill=dark)
    cv.subject("rectangle", box(-12, 13, 12, 39), fill=silver)  # torso
    cv.detail("rectangle", box(-6, 20, 6, 31), fill=(60, 90, 200))  # blue chest panel
    cv.subject("rectangle", box(-2, 38, 2, 42), fill=dark)  # neck
    cv.subject("rectangle", box(-10, 41, 10, 58), fill=silver)  # square head
    cv.detail("rectangle", box(-7, 49, -2, 54), fill=(0, 225, 235))  # cyan eyes
    cv.detail("rectangle", box(2, 49, 7, 54), fill=(0, 225, 235))
    cv.detail("rectangle", box(-5, 44, 5, 46), fill=dark)  # mouth grille
    cv.subject("rectangle", box(-1, 57, 1, 65), fill=dark)  # antenna
    cv.subject("ellipse", box(-3, 63, 3, 69), fill=(40, 90, 230))  # blue antenna tip
    return cv


ROBOT_TEXT = {
    "01": {
        "case2": "a [V] robot in front of a brick wall with a ball on the floor",
        "case3": "a [V] robot on a grey concrete floor in front of a yellow brick wall, with a "
        "shiny red rubber ball on the left",
        "case4": "a silver-grey boxy toy [V] robot with a square head, glowing cyan eyes, a "
        "blue chest panel and a blue-tipped antenna, standing on a grey concrete floor in "
        "front of a yellow brick wall, with a shiny red rubber ball on the left",
    },
    "02": {
        "case2": "a [V] robot in front of a brick wall with a ball on the floor",
        "case3": "a [V] robot on a grey concrete floor in front of a yellow brick wall, with a "
        "shiny red rubber ball on the right",
        "case4": "a silver-grey boxy toy [V] robot with a square head, glowing cyan eyes, a "
        "blue chest panel and a blue-tipped antenna, standing on a grey concrete floor in "
        "front of a yellow brick wall, with a shiny red rubber ball on the right",
    },
    "03": {
        "case2": "a [V] robot in front of a brick wall with a ball on the floor",
        "case3": "a [V] robot on a grey concrete floor in front of a yellow brick wall, with a "
        "shiny red rubber ball cut off at the edge on the right",
        "case4": "a close-up of a silver-grey boxy toy [V] robot with a square head, glowing "
        "cyan eyes, a blue chest panel and a blue-tipped antenna, on a grey concrete floor in "
        "front of a yellow brick wall, with a shiny red rubber ball cut off at the edge on the "
        "right",
    },
    "04": {
        "case2": "a [V] robot in front of a brick wall with a ball on the floor",
        "case3": "a [V] robot on a grey concrete floor in front of a yellow brick wall, with a "
        "shiny red rubber ball on the left",
        "case4": "a small silver-grey boxy toy [V] robot with a square head, glowing cyan "
        "eyes, a blue chest panel and a blue-tipped antenna, standing further back on a grey "
        "concrete floor in front of a yellow brick wall, with a shiny red rubber ball on the left",
    },
}


# --------------------------------------------------------------------------------------------
# spotted_dog: green grass, brown wooden picket fence, blue sky, orange frisbee.
# --------------------------------------------------------------------------------------------
DOG_LAYOUT = {
    # cx: body centre x, feet: feet y, s: scale, facing, frisbee: side, frisbee_cx
    "01": {"cx": 56, "feet": 82, "s": 1.0, "facing": "left", "frisbee": "left", "frisbee_cx": 14},
    "02": {"cx": 38, "feet": 86, "s": 1.1, "facing": "right", "frisbee": "right", "frisbee_cx": 82},
    "03": {"cx": 54, "feet": 92, "s": 1.4, "facing": "right", "frisbee": "left", "frisbee_cx": 7},
    "04": {"cx": 44, "feet": 76, "s": 0.85, "facing": "left", "frisbee": "right", "frisbee_cx": 80},
}


def draw_spotted_dog(stem: str, rng: np.random.RandomState) -> Canvas:
    lay = DOG_LAYOUT[stem]
    size = 96
    grass_y = 52
    cv = Canvas((size, size), (165, 210, 240))  # pale blue sky
    wood = (150, 100, 55)
    plank = 10
    for x in range(-3, size, plank):  # picket fence with pointed tops
        top = 12 + int(rng.randint(0, 3))
        cv.detail(
            "polygon",
            [
                (x, top + 4),
                (x + (plank - 2) / 2, top),
                (x + plank - 2, top + 4),
                (x + plank - 2, grass_y),
                (x, grass_y),
            ],
            fill=_shade(wood, int(rng.randint(-15, 16))),
        )
    for rail_y in (22, 40):
        cv.detail("rectangle", [0, rail_y, size, rail_y + 3], fill=_shade(wood, -30))
    cv.detail("rectangle", [0, grass_y, size, size], fill=(75, 155, 55))
    for _ in range(110):  # grass blades
        gx, gy = rng.uniform(0, size), rng.uniform(grass_y - 2, size)
        tone = (50, 125, 40) if rng.rand() < 0.5 else (105, 185, 75)
        cv.detail("line", [(gx, gy), (gx + rng.uniform(-2, 2), gy - rng.uniform(2, 5))], fill=tone)

    # Orange plastic frisbee lying flat on the grass.
    fx = lay["frisbee_cx"] + int(rng.randint(-2, 3))
    fy = lay["feet"] - int(rng.randint(0, 5))
    cv.detail("ellipse", [fx - 10, fy - 4, fx + 10, fy + 4], fill=(245, 130, 20))
    cv.detail("ellipse", [fx - 6, fy - 2, fx + 6, fy + 2], outline=(200, 95, 10))

    s, cx, feet = lay["s"], lay["cx"], lay["feet"]
    d = -1 if lay["facing"] == "left" else 1  # head side
    white, black = (248, 248, 244), (20, 20, 20)

    def pt(x: float, y: float) -> tuple[float, float]:  # dog coords: x forward, y upward
        return (cx + d * x * s, feet - y * s)

    def bbox(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        (ax, ay), (bx, by) = pt(x0, y0), pt(x1, y1)
        return [min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)]

    cv.subject("line", [pt(-17, 22), pt(-25, 31)], fill=white, width=max(2, int(3 * s)))  # tail
    for lx in (-14, -8, 8, 13):  # legs
        cv.subject("rectangle", bbox(lx - 2, 0, lx + 2, 16), fill=white)
    cv.subject("ellipse", bbox(-19, 13, 19, 29), fill=white)  # body
    cv.subject("rectangle", bbox(12, 22, 19, 34), fill=white)  # neck
    cv.subject("ellipse", bbox(12, 28, 26, 42), fill=white)  # head
    cv.subject("ellipse", bbox(22, 28, 31, 35), fill=white)  # snout
    cv.detail("ellipse", bbox(29, 32, 32, 35), fill=black)  # nose
    cv.detail("ellipse", bbox(19, 36, 21, 38), fill=black)  # eye
    cv.subject("polygon", [pt(14, 41), pt(19, 41), pt(13, 31)], fill=black)  # floppy ear
    for _ in range(7):  # black spots inside the body ellipse
        sx, sy = rng.uniform(-14, 13), rng.uniform(17, 26)
        r = rng.uniform(1.6, 2.6)
        cv.detail("ellipse", bbox(sx - r, sy - r, sx + r, sy + r), fill=black)
    return cv


DOG_TEXT = {
    "01": {
        "case2": "a [V] dog on the grass in front of a fence with a frisbee",
        "case3": "a [V] dog on short green grass in front of a brown wooden picket fence under "
        "a pale blue sky, with an orange plastic frisbee on the left",
        "case4": "a white [V] dog with black spots, a black floppy ear and a thin tail, facing "
        "left, on short green grass in front of a brown wooden picket fence under a pale blue "
        "sky, with an orange plastic frisbee on the left",
    },
    "02": {
        "case2": "a [V] dog on the grass in front of a fence with a frisbee",
        "case3": "a [V] dog on short green grass in front of a brown wooden picket fence under "
        "a pale blue sky, with an orange plastic frisbee on the right",
        "case4": "a white [V] dog with black spots, a black floppy ear and a thin tail, facing "
        "right, on short green grass in front of a brown wooden picket fence under a pale blue "
        "sky, with an orange plastic frisbee on the right",
    },
    "03": {
        "case2": "a [V] dog on the grass in front of a fence with a frisbee",
        "case3": "a [V] dog on short green grass in front of a brown wooden picket fence, with "
        "an orange plastic frisbee cut off at the edge on the left",
        "case4": "a close-up of a white [V] dog with black spots, a black floppy ear and a "
        "thin tail, facing right, on short green grass in front of a brown wooden picket "
        "fence, with an orange plastic frisbee cut off at the edge on the left",
    },
    "04": {
        "case2": "a [V] dog on the grass in front of a fence with a frisbee",
        "case3": "a [V] dog on short green grass in front of a brown wooden picket fence under "
        "a pale blue sky, with an orange plastic frisbee on the right",
        "case4": "a small white [V] dog with black spots, a black floppy ear and a thin tail, "
        "facing left, further back on short green grass in front of a brown wooden picket "
        "fence under a pale blue sky, with an orange plastic frisbee on the right",
    },
}


# --------------------------------------------------------------------------------------------
SUBJECTS: dict[str, dict] = {
    "red_mug": {
        "class": "mug",
        "draw": draw_red_mug,
        "layout": MUG_LAYOUT,
        "side_key": "plant",
        "text": MUG_TEXT,
    },
    "toy_robot": {
        "class": "robot",
        "draw": draw_toy_robot,
        "layout": ROBOT_LAYOUT,
        "side_key": "ball",
        "text": ROBOT_TEXT,
    },
    "spotted_dog": {
        "class": "dog",
        "draw": draw_spotted_dog,
        "layout": DOG_LAYOUT,
        "side_key": "frisbee",
        "text": DOG_TEXT,
    },
}


def descriptions(name: str) -> dict[str, dict[str, str]]:
    """Case 1-4 texts per stem, checked against the layout the images are drawn from."""
    spec = SUBJECTS[name]
    out: dict[str, dict[str, str]] = {}
    for stem, texts in spec["text"].items():
        entry = {"case1": f"a [V] {spec['class']}", **texts}
        side = spec["layout"][stem][spec["side_key"]]
        other = "right" if side == "left" else "left"
        for case in CASES:
            text = entry[case]
            assert text.count("[V]") == 1 and f"[V] {spec['class']}" in text, (name, stem, case)
            assert '"' not in text and "\\" not in text, (name, stem, case)
            assert len(text.split()) <= MAX_WORDS, (name, stem, case, len(text.split()))
        counts = [len(entry[case].split()) for case in CASES]
        assert counts == sorted(set(counts)), (name, stem, counts)  # each case adds detail
        for case in ("case3", "case4"):
            assert f"on the {side}" in entry[case], (name, stem, case, side)
            assert f"on the {other}" not in entry[case], (name, stem, case, side)
        if "facing" in spec["layout"][stem]:
            assert f"facing {spec['layout'][stem]['facing']}" in entry["case4"], (name, stem)
        out[stem] = {case: entry[case] for case in CASES}
    return out


def descriptions_yaml(name: str) -> str:
    lines = [
        f"# Hand-written SID descriptions of tests/data/tiny_demo/subjects/{name}/ (written by "
        "tests/data/tiny_demo/make_demo_subjects.py).",
        "# case1: a [V] class | case2: + classes of the other elements | case3: + their "
        "specifications | case4: + the subject's own details.",
    ]
    for stem, entry in descriptions(name).items():
        lines.append(f'"{stem}":')
        lines.extend(f'  {case}: "{entry[case]}"' for case in CASES)
    return "\n".join(lines) + "\n"


def write_subject(out_dir: Path, name: str, seed: int) -> Path:
    """Render one subject into a temporary sibling folder, then rename it into place."""
    spec = SUBJECTS[name]
    draw: Callable[[str, np.random.RandomState], Canvas] = spec["draw"]
    final = out_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir))
    try:
        os.chmod(tmp, 0o755)
        rng = np.random.RandomState(seed)
        for stem in spec["layout"]:
            canvas = draw(stem, rng)
            canvas.image.save(tmp / f"{stem}.png", format="PNG")
            canvas.mask.save(tmp / f"{stem}.mask.png", format="PNG")
        (tmp / "descriptions.yaml").write_text(descriptions_yaml(name), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=out_dir))
        os.replace(final, old / name)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "subjects",
        help="folder that receives one sub-folder per subject (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(SUBJECTS):
        path = write_subject(args.out, name, SEED + index)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
