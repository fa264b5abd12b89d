"""The world's caption writer.

`describe` renders a scene's truth at the SID paper's four detail levels for a subject's
reference images (Case 1 "a [V] class"; Case 2 + the non-subject elements' classes; Case 3 +
their specifications, the SID; Case 4 + the subject's own details). `pretraining_caption`
mixes levels and phrasings per component, so the base model learns every wording the cases
and the prompts use. `read_prompt` recovers what an evaluation prompt asks for.
"""

from __future__ import annotations

import numpy as np

from sidpipe.world.grammar import (
    BACKGROUNDS,
    ELEMENTS,
    Element,
    Scene,
    Subject,
)

PLACEHOLDER = "[V]"
# The preposition that places a subject on a background's Case 2 noun or Case 3 specification.
_WHERE = {
    "jungle": "in",
    "beach": "on",
    "snow": "on",
    "city": "in front of",
    "grass": "on",
    "water": "on",
    "tablecloth": "on",
    "brick wall": "in front of",
    "wooden floor": "on",
    "night sky": "under",
    "pink fabric": "on",
    "dirt road": "on",
    "wheat field": "in",
    "mountain": "in front of",
}
_PATTERN_WORDS = {
    "striped": "{accent} stripes",
    "spotted": "{accent} spots",
    "two-tone": "a {accent} top",
}
_POSITION = {
    "left": "on its left",
    "right": "on its right",
    "behind": "behind it",
    "tied": "tied to it",
}


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def subject_details(subject: Subject) -> tuple[str, str]:
    """(words before the class noun, words after it) describing the subject itself."""
    before = []
    if subject.upside_down:
        before.append("upside down")
    before.append(subject.colour)
    after = ""
    if subject.pattern != "plain" and subject.accent:
        after = "with " + _PATTERN_WORDS[subject.pattern].format(accent=subject.accent)
    return " ".join(before), after


def background_phrase(name: str, level: str) -> str:
    """Where the subject is: level 'noun' (Case 2), 'spec' (Case 3) or 'prompt' wording."""
    entry = BACKGROUNDS[name]
    if level == "prompt":
        return entry["phrases"][0]
    if level == "alt":
        return entry["phrases"][-1]
    words = entry["noun"] if level == "noun" else entry["spec"]
    if level == "noun" and name not in ("snow", "grass", "water", "pink fabric"):
        words = _article(words)
    return f"{_WHERE[name]} {words}"


def element_phrase(element: Element, level: str) -> str:
    """A non-subject element: its class ('noun', Case 2) or its specification ('spec')."""
    spec = ELEMENTS[element.kind]
    if level == "noun":
        return _article(spec["noun"])
    size, colour = element.size, element.colour
    if element.kind == "plant":
        text = f"a {size} potted plant in {_article(colour)} pot"
    elif element.kind == "book":
        text = f"a {size} stack of {colour} books"
    elif element.kind == "fence":
        text = f"{_article(('low ' if size == 'small' else 'tall ') + colour)} picket fence"
    else:
        text = _article(f"{size} {colour} {spec['what']}")
    return f"{text} {_POSITION[element.side]}"


def _join(subject: str, where: str, elements: list[str]) -> str:
    text = f"{subject} {where}".strip()
    if elements:
        text += ", with " + " and ".join(elements)
    return " ".join(text.split())


def describe(scene: Scene, case: int, placeholder: str = PLACEHOLDER) -> str:
    """A reference image's training description at Case 1-4 (the placeholder marks [V])."""
    cls = scene.subject.cls
    if case == 1:
        return f"a {placeholder} {cls}"
    if case not in (2, 3, 4):
        raise ValueError(f"case must be 1-4, got {case}")
    level = "noun" if case == 2 else "spec"
    subject = f"a {placeholder} {cls}"
    if case == 4:
        before, after = subject_details(scene.subject)
        subject = f"{_article(before + ' ' + placeholder)} {cls} {after}".strip()
    where = background_phrase(scene.background, level)
    elements = [element_phrase(e, level) for e in scene.elements]
    return _join(subject, where, elements)


def pretraining_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption of a pretraining scene, each component at a random level of detail."""
    return pretraining_caption_naming(scene, rng)[0]


def pretraining_caption_naming(
    scene: Scene, rng: np.random.Generator
) -> tuple[str, frozenset[str]]:
    """`pretraining_caption` (the same draws from `rng`) and which of the subject's class,
    colour, pattern, accent and the background it names: the text tower's attribute targets."""
    subject = scene.subject
    before, after = subject_details(subject)
    roll = rng.random()
    named = {"class"}
    if roll < 0.25 and not subject.upside_down:
        words = _article(subject.cls)
    elif roll < 0.55:
        words = _article(f"{before} {subject.cls}")
        named.add("colour")
    else:
        words = _article(f"{before} {subject.cls} {after}".strip())
        named.update(("colour", "pattern", "accent") if after else ("colour",))
    if subject.upside_down and "upside down" not in words and rng.random() < 0.9:
        words = _article(f"upside down {subject.cls}")
        named = {"class"}
    if subject.hat and rng.random() < 0.9:
        words += f" wearing {_article(subject.hat)} hat"
    roll = rng.random()
    if roll < 0.12:
        where = ""
    else:
        level = ("noun", "spec", "prompt", "alt")[int(rng.choice(4, p=(0.2, 0.3, 0.35, 0.15)))]
        where = background_phrase(scene.background, level)
        named.add("background")
    elements = []
    for element in scene.elements:
        roll = rng.random()
        if roll < 0.15:
            continue
        elements.append(element_phrase(element, "noun" if roll < 0.45 else "spec"))
    text = _join(words, where, elements)
    if rng.random() < 0.15:
        text = "a photo of " + text
    return text, frozenset(named)
