"""Chosen arms compared on the same images' conditions (`metrics.comparisons`): arm A minus arm
B, paired by (subject, prompt, seed), with two-stage bootstrap CIs, over all subjects and per
bias type.

`stats.paired_improvement` compares SID with Case 1 within every method, `method_pairs` every two
methods within a description set; this compares the arms a researcher names, of any method,
description set or inference setting: SID against Case 2 and Case 4 (paper Table E.3), against
the negative prompt and masked DreamBooth (Sec. 7.1), or against another VLM's SID (Table E.4).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from sidpipe.io import log
from sidpipe.method_pairs import DIFFERENCE_COLUMNS, check_metric_columns, paired_difference
from sidpipe.stats import (
    ARM_KEYS,
    bias_groups,
    bias_subsets,
)

COLUMNS = ["arm_a", "arm_b", "metric", "bias", *DIFFERENCE_COLUMNS, "subjects_a_better"]
COLUMNS += ["higher_is_better"]


def comparison_label(arm_a: str, arm_b: str) -> str:
    """A short name of a pair for a figure: the parts the two arms share dropped, an inference
    setting left out where it is `standard` and something else tells them apart ("sid - case2"
    for two DreamBooth arms, "standard - negative_prompt" where only the inference differs)."""
    a, b = arm_a.split("/"), arm_b.split("/")
    keep = [i for i in range(3) if a[i] != b[i]] or [0, 1, 2]

    def short(parts: list[str]) -> str:
        shown = [
            parts[i] for i in keep if not (i == 2 and parts[i] == "standard" and len(keep) > 1)
        ]
        return "/".join(shown)

    return f"{short(a)} \u2212 {short(b)}"


def comparison_labels(pairs: Sequence[Sequence[str]]) -> list[str]:
    """`comparison_label` of each pair, or the full "A - B" for every pair where two short
    labels would be the same (e.g. SID - Case 2 of two methods)."""
    short = [comparison_label(a, b) for a, b in pairs]
    if len(set(short)) == len(short):
        return short
    return [f"{a} \u2212 {b}" for a, b in pairs]


def _rows_of(all_df: pd.DataFrame, arm: str) -> pd.Series:
    """The rows of `arm` (method/descriptions/inference, as `stats.arm_name` writes it)."""
    mask = pd.Series(True, index=all_df.index)
    for column, part in zip(ARM_KEYS, arm.split("/"), strict=True):
        mask &= all_df[column].astype(str) == part
    return mask


def paired_arms(
    all_df: pd.DataFrame,
    comparisons: Sequence[Sequence[str]],
    subjects_df: pd.DataFrame | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """For each [A, B] of `comparisons` (arms as method/descriptions/inference), per metric and
    bias ("all", or a bias type of `subjects_df`): mean(A - B) over the images both arms drew
    with the same subject, prompt and seed, with a two-stage bootstrap CI (`COLUMNS`). A pair
    without such images (an arm not run yet) gives no rows."""
    check_metric_columns(all_df)
    keys = ["subject", "prompt_id", "seed", "metric"]
    biases = bias_groups(subjects_df)
    out = []
    for arm_a, arm_b in comparisons:
        sides = [all_df.loc[_rows_of(all_df, arm), keys + ["value"]] for arm in (arm_a, arm_b)]
        pairs = sides[0].merge(sides[1], on=keys, suffixes=("_a", "_b"))
        if pairs.empty:
            log.info("comparison %s vs %s: no images in common, skipped", arm_a, arm_b)
            continue
        pairs["diff"] = pairs["value_a"] - pairs["value_b"]
        for metric, rows in pairs.groupby("metric", sort=True):
            for bias, sub in bias_subsets(rows, biases):
                summary = paired_difference(sub, metric, n_boot, seed, level)
                per_subject = sub.groupby("subject")["diff"].mean()
                better = summary["higher_is_better"]
                favour = (per_subject > 0) if better else (per_subject < 0)
                row = {"arm_a": arm_a, "arm_b": arm_b, "metric": metric, "bias": bias}
                out.append(row | summary | {"subjects_a_better": int(favour.sum())})
    return pd.DataFrame(out, columns=COLUMNS)
