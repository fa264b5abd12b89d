"""The metrics' long table: its columns, the keys naming one generated image, and the gather of
every (arm, subject) CSV into `results/metrics/all.csv`. Plain pandas, so that the gather job
and the world's truth measures load no torch (the scoring itself is `sidpipe.metrics`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sidpipe.io import SidpipeError, atomic_file

METRICS = ("SA", "NSD", "TA", "CLIP-I", "DINO")
FIELDS = [
    "subject",
    "method",
    "descriptions",
    "inference",
    "prompt_id",
    "prompt",
    "seed",
    "image",
    "metric",
    "value",
]


def image_keys(
    row: dict, path: Path, subject: str, method: str, descriptions: str, inference: str
) -> dict:
    """The `FIELDS` that name one generated image (a samples manifest row) of one arm."""
    return {
        "subject": subject,
        "method": method,
        "descriptions": descriptions,
        "inference": inference,
        "prompt_id": int(row["prompt_id"]),
        "prompt": row["prompt"],
        "seed": int(row["seed"]),
        "image": str(path),
    }


def gather_metrics(csvs: Sequence[Path], out_csv: Path) -> pd.DataFrame:
    """Concatenate per-(arm, subject) metric CSVs into one long table (`FIELDS` columns)."""
    frames = []
    for path in csvs:
        try:
            frame = pd.read_csv(path, dtype={"subject": str, "prompt": str})
        except (OSError, pd.errors.ParserError) as exc:
            raise SidpipeError(f"{path}: cannot read the metrics CSV ({exc})") from exc
        missing = [c for c in FIELDS if c not in frame.columns]
        if missing:
            raise SidpipeError(f"{path} lacks column(s) {', '.join(missing)}; re-run scoring")
        frames.append(frame[FIELDS])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=FIELDS)
    keys = ["method", "descriptions", "inference", "subject", "prompt_id", "seed", "metric"]
    dupes = table.duplicated(keys)
    if dupes.any():
        first = table[dupes].iloc[0]
        raise SidpipeError(
            f"{int(dupes.sum())} repeated (arm, subject, prompt, seed, metric) rows, e.g. "
            f"{first['method']}/{first['descriptions']}/{first['inference']} "
            f"{first['subject']} prompt {first['prompt_id']} seed {first['seed']}: "
            "a metrics CSV was passed twice"
        )
    with atomic_file(out_csv, newline="") as handle:
        table.to_csv(handle, index=False)
    return table
