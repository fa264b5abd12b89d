"""Tests for sidpipe.comparisons: chosen arms paired image by image (metrics.comparisons)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sidpipe.comparisons import COLUMNS, comparison_label, comparison_labels, paired_arms
from sidpipe.io import SidpipeError

SID = "dreambooth/sid/standard"
CASE2 = "dreambooth/case2/standard"
NEGATIVE = "dreambooth/case1/negative_prompt"
MASKED = "dreambooth_masked/case1/standard"

# arm -> (shift of every image, shift on subject s2 instead); leak_background: lower is better
SHIFTS = {SID: (0.0, 0.0), CASE2: (-0.1, 0.05), NEGATIVE: (-0.3, -0.3), MASKED: (0.2, 0.2)}


def metrics_df(skip=lambda arm, subject, seed: False) -> pd.DataFrame:
    """Every arm on subjects s0-s3, 3 prompts x 2 seeds, NSD and leak_background; an image's
    values are a shared draw plus its arm's shift, so A - B is the planted shift difference."""
    rng = np.random.default_rng(0)
    rows = []
    for subject in ("s0", "s1", "s2", "s3"):
        for prompt in range(3):
            for seed in range(2):
                base = rng.normal()
                for arm, (shift, on_s2) in SHIFTS.items():
                    if skip(arm, subject, seed):
                        continue
                    method, descriptions, inference = arm.split("/")
                    for metric in ("NSD", "leak_background"):
                        rows.append(
                            {"subject": subject, "method": method, "descriptions": descriptions}
                            | {"inference": inference, "prompt_id": prompt, "seed": seed}
                            | {
                                "metric": metric,
                                "value": base + (on_s2 if subject == "s2" else shift),
                            }
                        )
    return pd.DataFrame(rows)


def test_a_minus_b_is_paired_by_image_with_subjects_favouring_a() -> None:
    out = paired_arms(metrics_df(), [[SID, CASE2], [SID, MASKED]], n_boot=200)
    assert list(out.columns) == COLUMNS
    assert set(out["bias"]) == {"all"} and len(out) == 2 * 2
    row = out.set_index(["arm_b", "metric"]).loc[(CASE2, "NSD")]
    # SID - Case 2: +0.1 on three subjects, -0.05 on s2
    assert row["diff"] == pytest.approx((3 * 0.1 - 0.05) / 4)
    assert row["mean_a"] - row["mean_b"] == pytest.approx(row["diff"])
    assert row["ci_low"] <= row["diff"] <= row["ci_high"] and row["ci_low"] < row["ci_high"]
    assert (row["n_pairs"], row["n_subjects"], row["subjects"]) == (24, 4, "s0,s1,s2,s3")
    assert row["subjects_a_better"] == 3 and row["higher_is_better"]
    # a leak is better lower: the same +0.1 counts against SID on those three subjects
    leak = out.set_index(["arm_b", "metric"]).loc[(CASE2, "leak_background")]
    assert leak["diff"] == pytest.approx(row["diff"])
    assert leak["subjects_a_better"] == 1 and not leak["higher_is_better"]
    # a constant shift has a zero-width interval, across methods too
    masked = out.set_index(["arm_b", "metric"]).loc[(MASKED, "NSD")]
    assert masked["diff"] == pytest.approx(-0.2)
    assert masked["ci_low"] == pytest.approx(-0.2) and masked["ci_high"] == pytest.approx(-0.2)
    # the order of a pair is its sign
    back = paired_arms(metrics_df(), [[CASE2, SID]], n_boot=200).set_index("metric")
    assert back.loc["NSD", "diff"] == pytest.approx(-row["diff"])
    assert back.loc["NSD", "subjects_a_better"] == 1


def test_only_images_both_arms_drew_are_paired() -> None:
    """The negative prompt lacks seed 1 everywhere and subject s3: those images of SID are
    left out; an arm that drew nothing gives no rows (and no error)."""

    def skip(arm, subject, seed):
        return arm == NEGATIVE and (seed == 1 or subject == "s3")

    df = metrics_df(skip)
    out = paired_arms(df, [[SID, NEGATIVE], [SID, "svdiff/sid/standard"]], n_boot=50)
    assert set(out["arm_b"]) == {NEGATIVE}
    row = out.set_index("metric").loc["NSD"]
    assert (row["n_pairs"], row["subjects"]) == (3 * 3, "s0,s1,s2")
    assert row["diff"] == pytest.approx(0.3)


def test_pairs_break_down_by_bias_type() -> None:
    subjects = pd.DataFrame(
        {"subject": ["s0", "s1", "s2", "s3"], "bias": ["pose", "background", "background", None]}
    )
    out = paired_arms(metrics_df(), [[SID, CASE2]], subjects_df=subjects, n_boot=50)
    nsd = out[out["metric"] == "NSD"].set_index("bias")
    assert list(nsd.index) == ["all", "background", "pose"]
    assert nsd.loc["background", "subjects"] == "s1,s2"
    assert nsd.loc["background", "diff"] == pytest.approx((0.1 - 0.05) / 2)
    assert nsd.loc["pose", "n_pairs"] == 6


def test_a_table_without_arm_columns_is_an_error() -> None:
    with pytest.raises(SidpipeError, match="inference"):
        paired_arms(metrics_df().drop(columns="inference"), [[SID, CASE2]])


def test_labels_keep_what_tells_the_arms_apart() -> None:
    assert comparison_label(SID, CASE2) == "sid \u2212 case2"
    assert comparison_label(SID, NEGATIVE) == "sid \u2212 case1/negative_prompt"
    assert comparison_label(SID, MASKED) == "dreambooth/sid \u2212 dreambooth_masked/case1"
    # only the inference setting differs: it is what the label shows
    assert comparison_label("dreambooth/case1/standard", NEGATIVE) == (
        "standard \u2212 negative_prompt"
    )


def test_labels_that_would_repeat_are_the_full_arm_names() -> None:
    """SID - Case 2 of two methods would both read "sid - case2": each gets its arms' names."""
    pairs = [(SID, CASE2), ("svdiff/sid/standard", "svdiff/case2/standard"), (SID, MASKED)]
    assert comparison_labels(pairs) == [f"{a} \u2212 {b}" for a, b in pairs]
    assert comparison_labels(pairs[::2]) == ["sid \u2212 case2", comparison_label(SID, MASKED)]
