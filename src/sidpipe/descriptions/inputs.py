"""The stage's inputs: the prepared reference images (checked against their manifest) and a
subject's hand-written descriptions file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io import SidpipeError, read_csv, read_yaml, sha256_file


@dataclass(frozen=True)
class Reference:
    image_id: str
    path: Path
    sha256: str
    stem: str  # the source image's stem: the key in a hand-written descriptions file


def read_references(references_dir: Path, subject: str) -> list[Reference]:
    """The prepared images of manifest.csv, each checked against its recorded sha256."""
    manifest = Path(references_dir) / "manifest.csv"
    if not manifest.is_file():
        raise SidpipeError(f"{manifest} does not exist; run stage prepare_references first")
    references = []
    for row in read_csv(manifest):
        missing = [c for c in ("image_id", "path", "sha256") if not row.get(c)]
        if missing:
            raise SidpipeError(f"{manifest}: a row lacks {', '.join(missing)}")
        if row.get("subject") and row["subject"] != subject:
            raise SidpipeError(f"{manifest}: row for subject {row['subject']!r}, not {subject!r}")
        path = Path(references_dir) / row["path"]
        if not path.is_file() or sha256_file(path) != row["sha256"]:
            raise SidpipeError(
                f"{path} is missing or differs from {manifest}; rerun prepare_references"
            )
        stem = Path(row.get("source_path") or row["image_id"]).stem
        references.append(Reference(row["image_id"], path, row["sha256"], stem))
    if not references:
        raise SidpipeError(f"{manifest} lists no images")
    return references


MANUAL_CASES = ("case1", "case2", "case3", "case4")


def load_manual(path: Path) -> dict[str, dict[str, str]]:
    """A hand-written descriptions file: image stem -> {case1: text, ..., case4: text}."""
    data = read_yaml(path, "descriptions file") or {}
    if not isinstance(data, dict):
        raise SidpipeError(f"{path}: expected a mapping of image stem -> {{case1: ..., ...}}")
    manual: dict[str, dict[str, str]] = {}
    for stem, entry in data.items():
        if not isinstance(stem, str):
            raise SidpipeError(
                f"{path}: key {stem!r} ({type(stem).__name__}) is no image stem: YAML reads "
                'unquoted 00 as 0, 010 as 8, yes as True; quote the stems, e.g. "00":'
            )
        if not isinstance(entry, dict):
            raise SidpipeError(f"{path}: entry {stem!r} must map case1..case4 to descriptions")
        for case, text in entry.items():
            if case not in MANUAL_CASES:
                # A mistyped case would leave its image to the template or the VLM unnoticed.
                raise SidpipeError(
                    f"{path}: entry {stem!r} has the key {case!r}; its keys are the cases "
                    f"{', '.join(MANUAL_CASES)} (lower case): rename it"
                )
            if not isinstance(text, str):
                raise SidpipeError(f"{path}: {stem}.{case} must be a string, not {text!r}")
        manual[str(stem)] = {str(k): v for k, v in entry.items()}
    return manual
