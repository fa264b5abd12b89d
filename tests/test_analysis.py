"""analyze(): every table, plot and CSV of a run from all.csv, without Snakemake."""

from __future__ import annotations

import numpy as np
import pandas as pd

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
