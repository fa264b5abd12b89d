"""Methods compared with each other on the same images' conditions: method A minus method B,
paired by (subject, description set, inference, prompt, seed), with bootstrap CIs.

`stats.paired_improvement` compares description sets within a method (SID vs Case 1); this
compares methods within a description set (e.g. SeFi-IDE vs Textual Inversion, both on SID
captions), on exactly the subjects both ran on.
"""

from __future__ import annotations

from itertools import combinations

import pandas as pd

from sidpipe.io import SidpipeError
from sidpipe.stats import ARM_KEYS, HIGHER_IS_BETTER, bootstrap_ci

# What `paired_difference` gives of one metric's pairs, in the tables' column order.
DIFFERENCE_COLUMNS = ["mean_a", "mean_b", "diff", "ci_low", "ci_high", "n_pairs", "n_subjects"]
DIFFERENCE_COLUMNS += ["subjects"]
COLUMNS = ["method_a", "method_b", "descriptions", "inference", "metric", *DIFFERENCE_COLUMNS]
COLUMNS += ["higher_is_better"]


def subject_mean(rows: pd.DataFrame, column: str) -> float:
    """The estimate `stats` reports: the mean over subjects of their prompts' means."""
    prompts = rows.groupby(["subject", "prompt_id"])[column].mean()
    return float(prompts.groupby(level=0).mean().mean())


def check_metric_columns(all_df: pd.DataFrame) -> None:
    """A paired table needs the long metrics table's arm, image and value columns."""
    lacking = sorted({"subject", *ARM_KEYS, "prompt_id", "seed", "metric", "value"} - set(all_df))
    if lacking:
        raise SidpipeError(f"the metrics table lacks column(s) {', '.join(lacking)}")


def paired_difference(
    rows: pd.DataFrame, metric: str, n_boot: int, seed: int, level: float
) -> dict:
    """One metric's paired rows (`value_a`, `value_b`, `diff`) summarised: each side's mean,
    mean(A - B) with its two-stage bootstrap CI, the pairs and the subjects they cover."""
    diff, lo, hi = bootstrap_ci(rows.assign(value=rows["diff"]), metric, n_boot, seed, level)
    subjects = sorted(rows["subject"].unique())
    return {
        "mean_a": subject_mean(rows, "value_a"),
        "mean_b": subject_mean(rows, "value_b"),
        "diff": diff,
        "ci_low": lo,
        "ci_high": hi,
        "n_pairs": len(rows),
        "n_subjects": len(subjects),
        "subjects": ",".join(map(str, subjects)),
        "higher_is_better": HIGHER_IS_BETTER.get(str(metric), True),
    }


def paired_methods(
    all_df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> pd.DataFrame:
    """For every two methods with images under the same (subject, descriptions, inference,
    prompt, seed): per description set, inference and metric, mean(A - B) with a two-stage
    bootstrap CI (`COLUMNS`). Methods are ordered by name (A < B)."""
    check_metric_columns(all_df)
    keys = ["subject", "descriptions", "inference", "prompt_id", "seed", "metric"]
    by_method = {m: rows[keys + ["value"]] for m, rows in all_df.groupby("method", sort=True)}
    out = []
    for a, b in combinations(sorted(by_method), 2):
        pairs = by_method[a].merge(by_method[b], on=keys, suffixes=("_a", "_b"))
        if pairs.empty:
            continue
        pairs["diff"] = pairs["value_a"] - pairs["value_b"]
        for (desc, inf, metric), rows in pairs.groupby(
            ["descriptions", "inference", "metric"], sort=True
        ):
            row = {"method_a": a, "method_b": b, "descriptions": desc, "inference": inf}
            out.append(
                row | {"metric": metric} | paired_difference(rows, metric, n_boot, seed, level)
            )
    return pd.DataFrame(out, columns=COLUMNS)
