"""What a prompt in the world's language asks for (`read_prompt`): the measures' reading of an
evaluation prompt. Kept apart from the caption writer (`captions.py`), whose code decides the
world's weights (`pretrain.code_digest`): teaching the reader a new prompt form (a concept's
transfer prompts, say) needs no retraining of the world.
"""

from __future__ import annotations

import re
from typing import Any

from sidpipe.world.grammar import BACKGROUNDS, COLOURS, ELEMENTS, SUBJECT_CLASSES

# A colour, at most one word, then the class ("a red sks dog"); not a hat's colour ("a wearing
# a red hat dog": a hat concept's words in place of its tokens).
_COLOUR_BEFORE = re.compile(
    r"\b(" + "|".join(COLOURS) + r")\s+(?:(?!hat\b)\S+\s+)?(" + "|".join(SUBJECT_CLASSES) + r")\b"
)
_HAT = re.compile(r"wearing an? (" + "|".join(COLOURS) + r") hat")


def read_prompt(prompt: str, class_name: str) -> dict[str, Any]:
    """What a prompt in the world's language asks for: background (name or None), colour of
    the subject, hat colour, upside down, and the non-subject elements it names."""
    text = " ".join(prompt.lower().split())
    background = None
    for name, entry in BACKGROUNDS.items():
        phrases = [*entry["phrases"], entry["spec"]]
        if any(p in text for p in phrases):
            background = name
            break
    colour = None
    for match in _COLOUR_BEFORE.finditer(text):
        if match.group(2) == class_name:
            colour = match.group(1)
    hat = _HAT.search(text)
    elements = sorted(
        k
        for k, spec in ELEMENTS.items()
        if re.search(rf"\b{spec['noun']}s?\b", text) and spec["noun"] != class_name
    )
    return {
        "background": background,
        "colour": colour,
        "hat": hat.group(1) if hat else None,
        "upside_down": "upside down" in text,
        "elements": elements,
    }
