"""analyze(): every table, plot and CSV of a run from all.csv, without Snakemake."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sidpipe.analysis import analyze

ARMS = [("dreambooth", "case1"), ("dreambooth", "sid"), ("base_model", "case1")]


def _all_csv(path):
    rng = np.random.default_rng(0)
    rows = [
        {
            "subject": subject,
            "method": method,
            "descriptions": descriptions,
            "inference": "standard",
            "prompt_id": prompt_id,
            "prompt": f"prompt {prompt_id}",
            "seed": seed,
            "image": f"{method}/{descriptions}/{subject}/{prompt_id}_{seed}.png",
            "metric": metric,
            "value": float(rng.uniform()),
        }
        for subject in ("mug", "dog")
        for method, descriptions in ARMS
        for prompt_id in range(3)
        for seed in range(2)
        for metric in ("SA", "NSD", "TA")
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_untrained_arms_are_the_tables_reference_not_a_baseline(tmp_path):
    subjects = [
        {"subject": "mug", "class": "mug", "kind": "object", "bias": "background"},
        {"subject": "dog", "class": "dog", "kind": "live", "bias": "background"},
    ]
    paths = analyze(
        _all_csv(tmp_path / "all.csv"),
        tmp_path / "m",
        subjects,
        n_boot=20,
        untrained=["base_model"],
    )
    main = pd.read_csv(tmp_path / "m/tables/main.csv")
    settings = main.groupby("method")["setting"].unique().map(sorted).to_dict()
    assert settings == {"base_model": ["untrained"], "dreambooth": ["SID", "baseline"]}
    assert "| base_model | untrained |" in (tmp_path / "m/tables/main.md").read_text()
    # no concept subjects: the split table has its header and no rows
    concepts = pd.read_csv(paths["concepts"])
    assert concepts.empty and "prompts" in concepts.columns
    concept_pairs = pd.read_csv(paths["concept_pairs"])
    assert concept_pairs.empty and {"prompts", "method_a", "diff"} <= set(concept_pairs.columns)
    # SID minus Case 1 pairs only within a method: the base model has no SID arm
    assert set(pd.read_csv(paths["improvements"])["method"]) == {"dreambooth"}
    for name in ("pareto", "subjects", "improvements"):
        assert paths[f"plot_{name}"].stat().st_size > 1000


def test_chosen_arm_pairs_are_written_and_drawn(tmp_path):
    """metrics.comparisons reaches comparisons.csv (A - B per pair, per bias type) and its
    figure; a pair with an arm that drew nothing has no rows."""
    subjects = [
        {"subject": "mug", "class": "mug", "kind": "object", "bias": "background"},
        {"subject": "dog", "class": "dog", "kind": "live", "bias": "pose"},
    ]
    all_csv = _all_csv(tmp_path / "all.csv")
    pairs = [["dreambooth/sid/standard", "base_model/case1/standard"]]
    pairs += [["dreambooth/sid/standard", "dreambooth/case2/standard"]]
    paths = analyze(all_csv, tmp_path / "m", subjects, n_boot=20, arm_pairs=pairs)
    chosen = pd.read_csv(paths["comparisons"])
    assert set(chosen["arm_b"]) == {"base_model/case1/standard"}
    assert set(chosen["bias"]) == {"all", "background", "pose"}
    assert set(chosen["metric"]) == {"SA", "NSD", "TA"}
    df = pd.read_csv(all_csv)
    for metric in ("SA", "NSD", "TA"):
        rows = df[df["metric"] == metric]
        sid = rows[rows["descriptions"] == "sid"]["value"].mean()
        base = rows[rows["method"] == "base_model"]["value"].mean()
        row = chosen[(chosen["metric"] == metric) & (chosen["bias"] == "all")].iloc[0]
        # both subjects have every prompt and seed, so the two-stage mean is the plain mean
        assert row["diff"] == pytest.approx(sid - base) and row["n_pairs"] == 12
    # the figure draws the pair (its label; the empty placeholder would not have it)
    figure = paths["plot_comparisons"].with_suffix(".svg").read_text()
    assert "<!-- dreambooth/sid \u2212 base_model/case1 -->" in figure
    assert "no pair of metrics.comparisons" not in figure
    # without pairs: the table's header, and a figure saying there is nothing to draw
    empty = analyze(all_csv, tmp_path / "e", subjects, n_boot=20)
    assert pd.read_csv(empty["comparisons"]).empty
    placeholder = empty["plot_comparisons"].with_suffix(".svg").read_text()
    assert "no pair of metrics.comparisons has images in common" in placeholder
