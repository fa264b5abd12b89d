"""What a vision-language model is asked: the instruction templates of Cases 2-4
(data/instructions.yaml), filled per class, and the retry that quotes a rejected answer."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from ..io import SidpipeError, read_yaml

INSTRUCTIONS_FILE = Path(__file__).parents[1] / "data" / "instructions.yaml"


@functools.cache
def load_instructions(path: Path = INSTRUCTIONS_FILE) -> dict[str, Any]:
    """The instruction templates (cached); checked for the keys the stage fills."""
    data = read_yaml(path, "instructions file")
    if not isinstance(data, dict):
        raise SidpipeError(f"{path}: expected a mapping with keys version, cases, style, ...")
    for key in ("version", "cases", "style", "expression", "retry"):
        if key not in data:
            raise SidpipeError(f"{path}: missing key {key!r}")
    for group in ("cases", "style"):
        missing = sorted({2, 3, 4} - set(data[group]))
        if missing:
            raise SidpipeError(f"{path}: {group} lacks case(s) {missing}")
    return data


def fill_instruction(
    case: int, class_name: str, style: bool = False, expression: bool = False
) -> str:
    """The exact instruction text for Cases 2-4 (its sha256 is recorded with the description)."""
    if case not in (2, 3, 4):
        raise SidpipeError(f"case {case} has no instruction (Case 1 is a template; use 1-4)")
    data = load_instructions()
    text = data["style" if style else "cases"][case].format(**{"class": class_name})
    if expression:
        text += "\n" + data["expression"].format(**{"class": class_name})
    return text


def retry_instruction(instruction: str, response: str, reason: str) -> str:
    """The instruction again, followed by the rejected answer and why it was rejected."""
    retry = load_instructions()["retry"].format(
        response=response.strip() or "(empty)", reason=reason
    )
    return f"{instruction}\n\n{retry}"
