"""The world's vocabulary and its scenes: what can be in an image, as structured truth.

A scene is one subject (class, colour, pattern, accent colour, facing, upside down, hat) on one
background with up to two non-subject elements (kind, colour, size, side). Everything is drawn
from a seeded numpy generator, so a scene is a pure function of its seed and constraints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

RGB = tuple[int, int, int]

# Colours a subject (or an element) can have; names are the words captions and prompts use.
COLOURS: dict[str, RGB] = {
    "red": (214, 38, 38),
    "orange": (244, 132, 24),
    "yellow": (246, 212, 34),
    "green": (44, 160, 60),
    "blue": (38, 84, 214),
    "purple": (136, 52, 186),
    "pink": (244, 126, 178),
    "white": (238, 238, 238),
}

SUBJECT_CLASSES = ("mug", "robot", "dog", "car", "ball", "lamp")
# The DreamBooth prompt set a class gets ("live": accessorisation prompts, as for pets).
CLASS_KIND = {
    "mug": "object",
    "robot": "object",
    "dog": "live",
    "car": "object",
    "ball": "object",
    "lamp": "object",
}
# Classes whose silhouette has a left/right (a handle, a head, a bonnet): "facing" is visible.
FACING_CLASSES = ("mug", "dog", "car")
# Classes a hat can sit on (it needs a head).
HAT_CLASSES = ("dog", "robot")

# Subject patterns: the accent colour paints the stripes, spots or the upper half.
PATTERNS = ("plain", "striped", "spotted", "two-tone")

# Backgrounds. noun: the Case 2 word; spec: the Case 3 specification; phrases: how a caption or a
# prompt places the subject there (the first is the DreamBooth prompt's wording).
BACKGROUNDS: dict[str, dict[str, Any]] = {
    "jungle": {
        "noun": "jungle",
        "spec": "a dense green jungle with big leaves",
        "phrases": ["in the jungle", "in a jungle"],
    },
    "beach": {
        "noun": "beach",
        "spec": "a sandy beach under a blue sky",
        "phrases": ["on the beach", "on a sandy beach"],
    },
    "snow": {
        "noun": "snow",
        "spec": "white snow under a pale grey sky",
        "phrases": ["in the snow", "on snowy ground"],
    },
    "city": {
        "noun": "city",
        "spec": "grey city buildings with lit windows",
        "phrases": ["with a city in the background", "in a city"],
    },
    "grass": {
        "noun": "grass",
        "spec": "green grass under a light blue sky",
        "phrases": ["on top of green grass", "on the grass"],
    },
    "water": {
        "noun": "water",
        "spec": "blue water with small waves",
        "phrases": ["floating on top of water", "on the water"],
    },
    "tablecloth": {
        "noun": "tablecloth",
        "spec": "a red and white checkered tablecloth",
        "phrases": ["on a checkered tablecloth", "on a tablecloth"],
    },
    "brick wall": {
        "noun": "wall",
        "spec": "a red brick wall with grey mortar",
        "phrases": ["in front of a brick wall", "by a brick wall"],
    },
    "wooden floor": {
        "noun": "floor",
        "spec": "a brown wooden plank floor",
        "phrases": ["on top of a wooden floor", "on a wooden floor"],
    },
    "night sky": {
        "noun": "sky",
        "spec": "a dark blue night sky full of stars",
        "phrases": ["under a night sky", "at night under the stars"],
    },
    "pink fabric": {
        "noun": "fabric",
        "spec": "soft pink fabric with folds",
        "phrases": ["on top of pink fabric", "on pink fabric"],
    },
    "dirt road": {
        "noun": "road",
        "spec": "a brown dirt road with tyre tracks",
        "phrases": ["on top of a dirt road", "on a dirt road"],
    },
    "wheat field": {
        "noun": "field",
        "spec": "a golden wheat field under a blue sky",
        "phrases": ["with a wheat field in the background", "in a wheat field"],
    },
    "mountain": {
        "noun": "mountain",
        "spec": "grey mountains with snowy peaks",
        "phrases": ["with a mountain in the background", "in the mountains"],
    },
}
BACKGROUND_NAMES = tuple(BACKGROUNDS)

# Non-subject elements. colours: what it may be painted; sides: where it may stand relative to
# the subject ("behind": a fence across the scene; "tied": a balloon on a string to the subject).
ELEMENTS: dict[str, dict[str, Any]] = {
    "plant": {
        "noun": "plant",
        "what": "potted plant",
        "colours": ("orange", "blue", "white"),
        "colour_of": "pot",
        "sides": ("left", "right"),
    },
    "box": {
        "noun": "box",
        "what": "cardboard box",
        "colours": ("orange", "yellow", "white"),
        "colour_of": "",
        "sides": ("left", "right"),
    },
    "frisbee": {
        "noun": "frisbee",
        "what": "frisbee",
        "colours": ("orange", "yellow", "pink", "green"),
        "colour_of": "",
        "sides": ("left", "right"),
    },
    "book": {
        "noun": "book",
        "what": "stack of books",
        "colours": ("blue", "red", "green"),
        "colour_of": "",
        "sides": ("left", "right"),
    },
    "fence": {
        "noun": "fence",
        "what": "picket fence",
        "colours": ("white", "orange"),
        "colour_of": "",
        "sides": ("behind",),
    },
    "balloon": {
        "noun": "balloon",
        "what": "balloon",
        "colours": ("red", "yellow", "blue", "pink"),
        "colour_of": "",
        "sides": ("tied",),
    },
}
ELEMENT_NAMES = tuple(ELEMENTS)
SIZES = ("small", "large")


@dataclass(frozen=True)
class Element:
    kind: str
    colour: str
    size: str
    side: str


@dataclass(frozen=True)
class Subject:
    cls: str
    colour: str
    pattern: str = "plain"
    accent: str | None = None  # the pattern's colour; None for plain
    facing: str = "right"
    upside_down: bool = False
    hat: str | None = None  # hat colour, or None


@dataclass(frozen=True)
class Scene:
    subject: Subject
    background: str
    elements: tuple[Element, ...] = field(default_factory=tuple)
    # Placement jitter (fractions of the canvas): where and how large the subject stands.
    x: float = 0.5
    scale: float = 1.0

    def truth(self) -> dict[str, Any]:
        """JSON-ready structured truth."""
        data = asdict(self)
        data["subject"]["class"] = data["subject"].pop("cls")
        return data

    @staticmethod
    def from_truth(data: dict[str, Any]) -> Scene:
        subject = dict(data["subject"])
        subject["cls"] = subject.pop("class")
        return Scene(
            subject=Subject(**subject),
            background=data["background"],
            elements=tuple(Element(**e) for e in data.get("elements", ())),
            x=float(data.get("x", 0.5)),
            scale=float(data.get("scale", 1.0)),
        )

    def with_(self, **changes: Any) -> Scene:
        return replace(self, **changes)


def _choice(rng: np.random.Generator, options: tuple | list) -> Any:
    return options[int(rng.integers(len(options)))]


def sample_subject(
    rng: np.random.Generator,
    cls: str | None = None,
    colour: str | None = None,
    hat_rate: float = 0.1,
    upside_down_rate: float = 0.05,
) -> Subject:
    cls = cls or _choice(rng, SUBJECT_CLASSES)
    colour = colour or _choice(rng, tuple(COLOURS))
    # Half the subjects are plain; the rest carry a pattern in another colour.
    pattern = "plain" if rng.random() < 0.5 else _choice(rng, PATTERNS[1:])
    accent = None
    if pattern != "plain":
        accent = _choice(rng, tuple(c for c in COLOURS if c != colour))
    facing = _choice(rng, ("left", "right")) if cls in FACING_CLASSES else "right"
    hat = None
    if cls in HAT_CLASSES and rng.random() < hat_rate:
        hat = _choice(rng, ("red", "yellow", "blue", "purple"))
    return Subject(cls, colour, pattern, accent, facing, bool(rng.random() < upside_down_rate), hat)


def sample_elements(rng: np.random.Generator, forbidden_colours: tuple = ()) -> tuple[Element, ...]:
    count = int(rng.choice(3, p=(0.4, 0.4, 0.2)))
    kinds = rng.permutation(len(ELEMENT_NAMES))[:count]
    out, sides_used = [], set()
    for k in sorted(int(i) for i in kinds):
        spec = ELEMENTS[ELEMENT_NAMES[k]]
        sides = tuple(s for s in spec["sides"] if s not in sides_used) or spec["sides"]
        side = _choice(rng, sides)
        sides_used.add(side)
        out.append(
            Element(ELEMENT_NAMES[k], _choice(rng, spec["colours"]), _choice(rng, SIZES), side)
        )
    # At most one element per side: a second one on a taken side is dropped.
    seen, kept = set(), []
    for element in out:
        if element.side in seen:
            continue
        seen.add(element.side)
        kept.append(element)
    return tuple(kept)


def sample_scene(
    rng: np.random.Generator,
    cls: str | None = None,
    colour: str | None = None,
    background: str | None = None,
    held_out: frozenset = frozenset(),
) -> Scene:
    """A random scene; `held_out` (class, colour, background) triples are never drawn."""
    for _ in range(1000):
        subject = sample_subject(rng, cls, colour)
        bg = background or _choice(rng, BACKGROUND_NAMES)
        if (subject.cls, subject.colour, bg) not in held_out:
            break
    else:
        raise ValueError(f"every scene of class {cls} / colour {colour} / {background} is held out")
    return Scene(
        subject,
        bg,
        sample_elements(rng),
        x=float(rng.uniform(0.42, 0.58)),
        scale=float(rng.uniform(0.85, 1.1)),
    )


def held_out_triples(seed: int, fraction: float = 0.1) -> frozenset:
    """(class, colour, background) triples kept out of pretraining (compositional test set)."""
    rng = np.random.default_rng(seed)
    triples = [(c, k, b) for c in SUBJECT_CLASSES for k in COLOURS for b in BACKGROUND_NAMES]
    chosen = rng.permutation(len(triples))[: int(round(fraction * len(triples)))]
    return frozenset(triples[int(i)] for i in chosen)
