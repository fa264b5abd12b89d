"""Tests for sidpipe.stats: hierarchical bootstrap, arm summaries, paired improvements, the
paper-style tables and the Pareto front."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sidpipe.io import SidpipeError
from sidpipe.stats import (
    PAPER_VALUES,
    SUMMARY_COLUMNS,
    TABLE_COLUMNS,
    arm_summary,
    bootstrap_ci,
    cases_table,
    main_table,
    paired_improvement,
    pareto_front,
    subject_summary,
    to_markdown,
    vlms_table,
    wide_table,
    write_table,
)


def long_df(
    arms: list[tuple[str, str, str]],
    subjects: int,
    prompts: int,
    seeds: int,
    metrics: tuple[str, ...] = ("SA", "NSD", "TA"),
    value=None,
    rng_seed: int = 0,
) -> pd.DataFrame:
    """A long metrics table; `value(arm, metric, subject, prompt, seed)` or random noise."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for method, desc, inf in arms:
        for metric in metrics:
            for s in range(subjects):
                for p in range(prompts):
                    for k in range(seeds):
                        v = (
                            value((method, desc, inf), metric, s, p, k)
                            if value
                            else float(rng.normal(0.5, 0.05))
                        )
                        rows.append(
                            {"subject": f"s{s}", "method": method, "descriptions": desc}
                            | {"inference": inf, "prompt_id": p, "seed": k}
                            | {"metric": metric, "value": v}
                        )
    return pd.DataFrame(rows)


ARMS = [
    ("dreambooth", "case1", "standard"),
    ("dreambooth", "sid", "standard"),
    ("svdiff", "case1", "standard"),
    ("svdiff", "sid", "standard"),
]


# --- bootstrap -----------------------------------------------------------------------------


def test_bootstrap_constant_data_has_a_zero_width_interval() -> None:
    df = long_df(ARMS[:1], 3, 4, 2, value=lambda *a: 0.25)
    assert bootstrap_ci(df, "SA", n_boot=50) == pytest.approx((0.25, 0.25, 0.25))


def test_bootstrap_estimate_weights_subjects_equally_and_is_seeded() -> None:
    df = long_df(ARMS[:1], 2, 4, 2, metrics=("SA",), value=lambda a, m, s, p, k: float(s))
    df = df[~((df["subject"] == "s1") & (df["prompt_id"] > 0))]  # s1 keeps one prompt only
    mean, lo, hi = bootstrap_ci(df, "SA", n_boot=300, seed=1)
    assert mean == pytest.approx(0.5)  # mean of subject means, not of rows (which is 0.2)
    assert 0 <= lo <= mean <= hi <= 1
    assert bootstrap_ci(df, "SA", n_boot=300, seed=1) == (mean, lo, hi)
    noisy = long_df(ARMS[:1], 5, 4, 2, metrics=("SA",))
    assert bootstrap_ci(noisy, "SA", n_boot=50, seed=1) != bootstrap_ci(noisy, "SA", n_boot=50)
    with pytest.raises(SidpipeError, match="no rows"):
        bootstrap_ci(df, "TA")


def test_bootstrap_ci_covers_the_true_mean_about_95_percent() -> None:
    """Hierarchical data (subject + prompt + seed noise) with a known mean of 0.3."""
    rng = np.random.default_rng(12345)
    n_sub, n_prompt, n_seed, true = 12, 8, 3, 0.3
    sub_ids = np.repeat(np.arange(n_sub), n_prompt * n_seed)
    prompt_ids = np.tile(np.repeat(np.arange(n_prompt), n_seed), n_sub)
    base = pd.DataFrame({"subject": sub_ids.astype(str), "prompt_id": prompt_ids, "metric": "SA"})
    covered, widths = 0, []
    for i in range(200):
        subject_eff = rng.normal(0, 0.03, n_sub)[sub_ids]
        prompt_eff = rng.normal(0, 0.03, n_sub * n_prompt)[sub_ids * n_prompt + prompt_ids]
        values = true + subject_eff + prompt_eff + rng.normal(0, 0.02, len(sub_ids))
        _, lo, hi = bootstrap_ci(base.assign(value=values), "SA", n_boot=200, seed=i)
        covered += lo <= true <= hi
        widths.append(hi - lo)
    # Nominal 95 %; percentile intervals with 12 subjects run a little narrow, the two-stage
    # resampling a little wide: a tolerant band (200 datasets: binomial s.e. 1.5 points).
    assert 0.88 <= covered / 200 <= 0.995
    # And the width matches the analytic s.e. of a mean of 12 subject means (within 30 %).
    se = np.sqrt((0.03**2 + (0.03**2 + 0.02**2 / n_seed) / n_prompt) / n_sub)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * se, rel=0.3)


def test_arm_summary_shape_and_counts() -> None:
    df = long_df(ARMS, 3, 4, 2)
    summary = arm_summary(df, n_boot=50)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert len(summary) == len(ARMS) * 3
    assert set(summary["arm"]) == {"/".join(a) for a in ARMS}
    assert (summary["n_images"] == 3 * 4 * 2).all() and (summary["n_subjects"] == 3).all()
    assert (summary["ci_low"] <= summary["mean"]).all()
    assert (summary["mean"] <= summary["ci_high"]).all()
    grand = df.groupby(["method", "descriptions", "metric"])["value"].mean()
    row = summary.iloc[0]
    assert row["mean"] == pytest.approx(grand[(row.method, row.descriptions, row.metric)])
    per_subject = subject_summary(df)
    assert len(per_subject) == len(ARMS) * 3 * 3 and (per_subject["n_images"] == 8).all()


# --- paired improvements -------------------------------------------------------------------


def planted(arm, metric, s, p, k) -> float:
    """SID adds +0.1 for every subject but s3, where it costs -0.05; TA is unchanged for all."""
    base = 0.4 + 0.01 * s + 0.001 * p + 0.0001 * k
    if arm[1] != "sid" or metric == "TA":
        return base
    return base + (-0.05 if s == 3 else 0.1)


def test_paired_improvement_sign_and_share_of_subjects() -> None:
    df = long_df(ARMS, 5, 4, 2, value=planted)
    df = df[~((df["method"] == "svdiff") & (df["descriptions"] == "sid") & (df["seed"] == 1))]
    imp = paired_improvement(df, n_boot=200)
    assert len(imp) == 2 * 3 and set(imp["bias"]) == {"all"}
    sa_db = imp[(imp["method"] == "dreambooth") & (imp["metric"] == "SA")].iloc[0]
    assert sa_db["diff"] == pytest.approx((4 * 0.1 - 0.05) / 5)
    assert sa_db["mean_treatment"] - sa_db["mean_baseline"] == pytest.approx(sa_db["diff"])
    assert sa_db["subjects_improved"] == 4 and sa_db["share_improved"] == pytest.approx(0.8)
    assert sa_db["ci_low"] <= sa_db["diff"] <= sa_db["ci_high"]
    assert sa_db["baseline"] == "dreambooth/case1/standard"
    assert sa_db["treatment"] == "dreambooth/sid/standard"
    assert sa_db["n_pairs"] == 5 * 4 * 2
    # Unpaired images (svdiff's SID lacks seed 1) are left out.
    sa_sv = imp[(imp["method"] == "svdiff") & (imp["metric"] == "SA")].iloc[0]
    assert sa_sv["n_pairs"] == 5 * 4
    ta_row = imp[imp["metric"] == "TA"].iloc[0]
    assert ta_row["diff"] == pytest.approx(0) and ta_row["subjects_improved"] == 0
    # Swapping the arms flips the sign.
    back = paired_improvement(df, ("sid", "standard"), ("case1", "standard"), n_boot=50)
    back_sa = back[(back["method"] == "dreambooth") & (back["metric"] == "SA")].iloc[0]
    assert back_sa["diff"] == pytest.approx(-sa_db["diff"])
    assert back_sa["subjects_improved"] == 1


def test_a_falling_leak_counts_as_an_improvement() -> None:
    """For a lower-is-better measure (a leak) the subjects whose mean fell are the improved."""

    def leak(arm, metric, s, p, k) -> float:
        return -planted(arm, metric, s, p, k)  # SID lowers the leak on every subject but s3

    df = long_df(ARMS[:2], 5, 4, 2, metrics=("leak_background",), value=leak)
    row = paired_improvement(df, n_boot=50).iloc[0]
    assert not row["higher_is_better"]
    assert row["diff"] == pytest.approx(-(4 * 0.1 - 0.05) / 5)
    assert row["subjects_improved"] == 4 and row["share_improved"] == pytest.approx(0.8)


def test_paired_improvement_breaks_down_by_bias() -> None:
    df = long_df(ARMS[:2], 5, 3, 1, metrics=("NSD",), value=planted)
    subjects = pd.DataFrame(
        {"subject": ["s0", "s1", "s2", "s3", "s4"], "bias": ["clothing", "", "bg", "bg", None]}
    )
    subjects.loc[0, "bias"] = "clothing, bg"  # several bias types per subject
    imp = paired_improvement(df, subjects_df=subjects, n_boot=50)
    by = imp.set_index("bias")
    assert list(imp["bias"]) == ["all", "bg", "clothing"]
    assert by.loc["bg", "n_subjects"] == 3 and by.loc["bg", "subjects_improved"] == 2
    assert by.loc["bg", "diff"] == pytest.approx((0.1 + 0.1 - 0.05) / 3)
    assert by.loc["clothing", "share_improved"] == 1.0
    with pytest.raises(SidpipeError, match="bias"):
        paired_improvement(df, subjects_df=subjects.drop(columns="bias"))


# --- tables --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def summary() -> pd.DataFrame:
    arms = ARMS + [("dreambooth", d, "standard") for d in ("case4", "sid_llava")]
    arms += [("dreambooth", "case1", "negative_prompt")]
    return arm_summary(long_df(arms, 2, 3, 2), n_boot=20)


def test_main_table(summary: pd.DataFrame) -> None:
    table = main_table(summary)
    assert list(table.columns) == TABLE_COLUMNS
    ours = table[table["source"] == "ours"]
    assert len(ours) == 2 * 2 * 3  # methods x {baseline, SID} x {TA, SA, NSD}
    assert set(ours["inference"]) == {"standard"}
    paper = table[table["source"] != "ours"]
    assert set(paper["method"]) == {"dreambooth"} and len(paper) == 2 * 3
    sid_ta = paper[(paper["setting"] == "SID") & (paper["metric"] == "TA")]["mean"]
    assert sid_ta.item() == PAPER_VALUES["Table E.3"]["sid"]["TA"]
    wide = wide_table(table)
    assert list(wide.columns) == ["method", "setting", "source", "TA", "SA", "NSD"]
    assert len(wide) == 6  # 4 ours + 2 paper rows
    assert wide.iloc[0]["TA"].count("[") == 1  # "mean [lo, hi]"


def test_cases_and_vlms_tables_skip_missing_arms(summary: pd.DataFrame, tmp_path: Path) -> None:
    cases = cases_table(summary)
    assert list(dict.fromkeys(cases["setting"])) == ["Case 1", "Case 3 (SID)", "Case 4"]
    assert len(cases) == 3 * 3 * 2  # settings x metrics x {ours, paper}
    vlms = vlms_table(summary)
    assert list(dict.fromkeys(vlms["setting"])) == ["GPT", "LLaVA"]
    llava_nsd = vlms[(vlms["source"] != "ours") & (vlms["setting"] == "LLaVA")]
    assert llava_nsd[llava_nsd["metric"] == "NSD"]["mean"].item() == 0.340

    wide = write_table(vlms, tmp_path / "vlms.csv", tmp_path / "vlms.md", tmp_path / "vlms.html")
    assert pd.read_csv(tmp_path / "vlms.csv").shape == vlms.shape
    md = (tmp_path / "vlms.md").read_text()
    assert md.count("\n") == 2 + len(wide) and "| LLaVA |" in md and "0.340" in md
    assert "<table" in (tmp_path / "vlms.html").read_text()
    empty = vlms_table(summary[summary["descriptions"] == "case1"])
    write_table(empty, tmp_path / "e.csv", tmp_path / "e.md", tmp_path / "e.html")
    assert "No arms" in (tmp_path / "e.md").read_text()


def test_to_markdown_escapes_pipes() -> None:
    md = to_markdown(pd.DataFrame({"a": ["x|y"], "b": [1]}))
    assert md.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


# --- Pareto front --------------------------------------------------------------------------


def brute_front(points: np.ndarray, maximize: tuple[bool, bool]) -> list[int]:
    signs = np.where(maximize, 1, -1)
    keep = []
    for i, p in enumerate(points * signs):
        if np.isnan(p).any():
            continue
        dominated = False
        for j, q in enumerate(points * signs):
            if j != i and not np.isnan(q).any() and (q >= p).all() and (q > p).any():
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(8))
def test_pareto_front_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    points = rng.random((n, 2))
    if seed % 2:  # coarse grid: ties and duplicates
        points = np.round(points * 4) / 4
    if seed % 3 == 0:
        points[rng.integers(0, n)] = np.nan
    for maximize in [(True, True), (True, False), (False, False)]:
        got = pareto_front([tuple(p) for p in points], maximize)
        assert got == brute_front(points, maximize)


def test_pareto_front_small_cases() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(0.1, 0.2)]) == [0]
    assert pareto_front([(1, 1), (1, 1), (0, 2), (0, 0.5)]) == [0, 1, 2]
    assert pareto_front([(1, 1), (2, 2)], maximize=(False, False)) == [0]


def test_method_pairs_pair_the_same_images_and_only_shared_subjects() -> None:
    """A - B per (subject, prompt, seed): a planted +0.2 everywhere; a subject only A ran on is
    left out; the single-reference table takes only subset methods."""
    from sidpipe.method_pairs import paired_methods

    rng = np.random.default_rng(0)
    rows = []
    for subject in ("s0", "s1", "s2"):
        for prompt in range(4):
            for seed in range(3):
                base = rng.normal()
                for method, shift in (("a", 0.2), ("b", 0.0)):
                    if method == "b" and subject == "s2":
                        continue
                    rows.append(
                        {"subject": subject, "method": method, "descriptions": "sid"}
                        | {"inference": "standard", "prompt_id": prompt, "seed": seed}
                        | {"metric": "TA", "value": base + shift}
                    )
    out = paired_methods(pd.DataFrame(rows), n_boot=200)
    assert len(out) == 1
    row = out.iloc[0]
    assert (row["method_a"], row["method_b"], row["subjects"]) == ("a", "b", "s0,s1")
    assert row["diff"] == pytest.approx(0.2) and row["n_pairs"] == 2 * 4 * 3
    assert row["ci_low"] == pytest.approx(0.2) and row["ci_high"] == pytest.approx(0.2)
    assert row["mean_a"] - row["mean_b"] == pytest.approx(0.2)


def test_single_reference_table_holds_the_subset_methods_only(summary: pd.DataFrame) -> None:
    from sidpipe.stats import main_table, single_reference_table

    subset = summary.copy()
    subset["method"] = subset["method"] + "--first1"
    both = pd.concat([summary, subset])
    assert not single_reference_table(summary).shape[0]
    table = single_reference_table(both)
    assert table.shape[0] and set(table["method"]) <= set(subset["method"])
    assert not main_table(both)["method"].str.contains("--").any()


def test_concept_subjects_are_summarised_by_carrier_and_transfer_prompts():
    """SA on the carrier's prompts (keeping the carrier) and on the transfer prompts (the
    carrier leaking into the concept) get their own means; other subjects stay out."""
    from sidpipe.concepts import carrier_transfer_summary, prompt_group

    assert prompt_group("a <sks_1> <sks_2> robot on the beach", "robot") == "carrier"
    assert prompt_group("a <sks_1> <sks_2> dog", "robot") == "transfer"
    assert prompt_group("a <sks_1> robots", "robot") == "transfer"  # the class as a word only
    prompts = {0: "a <sks_1> robot", 1: "a <sks_1> robot on the beach", 2: "a <sks_1> dog"}
    prompts |= {3: "a <sks_1> mug in the snow"}
    sa = {0: 0.8, 1: 0.6, 2: 0.1, 3: 0.3}
    rows = [
        {
            "subject": subject,
            "method": "lego",
            "descriptions": "case1",
            "inference": "standard",
            "prompt_id": pid,
            "prompt": prompts[pid],
            "seed": seed,
            "image": f"{subject}/{pid}_{seed}.png",
            "metric": "SA",
            "value": sa[pid] + (0.5 if subject == "blue_mug" else 0.0),
        }
        for subject in ("pose", "blue_mug")
        for pid in prompts
        for seed in (0, 1)
    ]
    subjects = [
        {"subject": "pose", "class": "robot", "kind": "concept"},
        {"subject": "blue_mug", "class": "mug", "kind": "object"},
    ]
    out = carrier_transfer_summary(pd.DataFrame(rows), subjects, n_boot=50)
    means = dict(zip(out["prompts"], out["mean"], strict=True))
    assert means == pytest.approx({"carrier": 0.7, "transfer": 0.2})
    assert set(out["n_images"]) == {4}  # the concept subject's 2 prompts x 2 seeds each
    assert carrier_transfer_summary(pd.DataFrame(rows), subjects[1:]).empty


def test_concept_methods_are_paired_within_each_prompt_group():
    """Lego minus multi-vector Textual Inversion on the same prompts and seeds, separately on
    the carrier's prompts and the transfer prompts; other subjects stay out."""
    from sidpipe.concepts import carrier_transfer_pairs

    prompts = {0: "a <t> robot", 1: "a <t> robot on the beach", 2: "a <t> dog", 3: "a <t> mug"}
    # lego keeps the carrier as well as TI on its prompts, and leaks 0.3 less on the others
    values = {
        "textual_inversion_multi": {0: 0.8, 1: 0.6, 2: 0.5, 3: 0.7},
        "lego": {0: 0.8, 1: 0.6, 2: 0.2, 3: 0.4},
    }
    rows = [
        {
            "subject": subject,
            "method": method,
            "descriptions": "case1",
            "inference": "standard",
            "prompt_id": pid,
            "prompt": prompts[pid],
            "seed": seed,
            "metric": "SA",
            # blue_mug is no concept subject: its lego rows would pull the difference up
            "value": values[method][pid]
            + (0.9 if subject == "blue_mug" and method == "lego" else 0),
        }
        for subject in ("pose", "blue_mug")
        for method in values
        for pid in prompts
        for seed in (0, 1)
    ]
    subjects = [
        {"subject": "pose", "class": "robot", "kind": "concept"},
        {"subject": "blue_mug", "class": "mug", "kind": "object"},
    ]
    out = carrier_transfer_pairs(pd.DataFrame(rows), subjects, n_boot=50)
    assert list(out["prompts"]) == ["carrier", "transfer"]
    assert set(out["method_a"]) == {"lego"} and set(out["method_b"]) == {"textual_inversion_multi"}
    assert list(out["diff"]) == pytest.approx([0.0, -0.3])
    assert list(out["n_pairs"]) == [4, 4] and set(out["subjects"]) == {"pose"}
    assert carrier_transfer_pairs(pd.DataFrame(rows), subjects[1:]).empty


def test_concept_tables_keep_each_concept_apart():
    """Subjects of one concept are pooled, those of different concepts never: a pose learned
    on a robot and a dog, a hat on a dog, each get their own carrier and transfer rows."""
    from sidpipe.concepts import carrier_transfer_pairs, carrier_transfer_summary

    subjects = [
        {"subject": "pose_robot", "class": "robot", "kind": "concept", "concept": "upside down"},
        {"subject": "pose_dog", "class": "dog", "kind": "concept", "concept": "upside down"},
        {"subject": "hat_dog", "class": "dog", "kind": "concept", "concept": "wearing a hat"},
    ]
    prompts = {0: "a <t> robot", 1: "a <t> dog"}
    offset = {"pose_robot": 0.0, "pose_dog": 0.2, "hat_dog": 0.6}
    rows = [
        {
            "subject": s["subject"],
            "method": method,
            "descriptions": "case1",
            "inference": "standard",
            "prompt_id": pid,
            "prompt": prompts[pid],
            "seed": seed,
            "metric": "SA",
            "value": offset[s["subject"]] + 0.1 * pid + (0.05 if method == "lego" else 0.0),
        }
        for s in subjects
        for method in ("lego", "textual_inversion_multi")
        for pid in prompts
        for seed in (0, 1)
    ]
    out = carrier_transfer_summary(pd.DataFrame(rows), subjects, n_boot=50)
    lego = out[out["method"] == "lego"].set_index(["concept", "prompts"])
    assert lego["mean"].to_dict() == pytest.approx(
        {
            ("upside down", "carrier"): 0.05 + (0.0 + 0.3) / 2,  # robot on 0, dog on 1
            ("upside down", "transfer"): 0.05 + (0.1 + 0.2) / 2,
            ("wearing a hat", "carrier"): 0.05 + 0.7,
            ("wearing a hat", "transfer"): 0.05 + 0.6,
        }
    )
    assert lego.loc[("wearing a hat", "carrier"), "n_images"] == 2
    pairs = carrier_transfer_pairs(pd.DataFrame(rows), subjects, n_boot=50)
    assert list(zip(pairs["concept"], pairs["prompts"], strict=True)) == [
        ("upside down", "carrier"),
        ("upside down", "transfer"),
        ("wearing a hat", "carrier"),
        ("wearing a hat", "transfer"),
    ]
    assert list(pairs["diff"]) == pytest.approx([0.05] * 4)
    assert list(pairs["n_pairs"]) == [4, 4, 2, 2]
