"""The evidence of a run: statistics, the paper's tables and the plots, from metrics/all.csv."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import pandas as pd

from sidpipe import agreement, comparisons, concepts, method_pairs, plots, stats
from sidpipe.io import atomic_file, log
from sidpipe.subsets import SEPARATOR as SUBSET_SEPARATOR

TABLES = {
    "main": stats.main_table,
    "cases": stats.cases_table,
    "vlms": stats.vlms_table,
    "single_reference": stats.single_reference_table,
}


def _csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_file(path, newline="") as handle:
        df.to_csv(handle, index=False)


def _pair_labels(chosen: pd.DataFrame) -> list[str]:
    """Each row's figure label of its arm pair (unique across the pairs)."""
    pairs = list(dict.fromkeys(zip(chosen["arm_a"], chosen["arm_b"], strict=True)))
    labels = dict(zip(pairs, comparisons.comparison_labels(pairs), strict=True))
    return [labels[pair] for pair in zip(chosen["arm_a"], chosen["arm_b"], strict=True)]


def analyze(
    all_csv: Path,
    out_dir: Path,
    subjects: list[dict],
    n_boot: int = 1000,
    seed: int = 0,
    untrained: Collection[str] = (),
    arm_pairs: Sequence[Sequence[str]] = (),
) -> dict[str, Path]:
    """Write summary.csv (arm means with bootstrap CIs), subjects.csv, improvements.csv (SID minus
    baseline, paired), method_pairs.csv (method A minus method B, paired), comparisons.csv
    (arm A minus arm B of each `arm_pairs` entry, paired), agreement.csv
    (proxies vs ground truth), concepts.csv and concept_pairs.csv (concept subjects: carrier vs
    transfer prompts, per arm and as paired method differences),
    tables/{main,cases,vlms,single_reference}.{csv,md,html} and plots/{pareto,
    pareto_single_reference,subjects,improvements,comparisons,agreement}.{svg,png} under
    `out_dir`; return the written paths by name. `untrained`: the methods without a training
    job (the base model, encoders), whose rows the tables label `untrained`, not `baseline`."""
    out_dir = Path(out_dir)
    all_df = stats.read_metrics(all_csv)
    subjects_df = pd.DataFrame(subjects) if subjects else None
    if subjects_df is not None and "bias" not in subjects_df.columns:
        subjects_df = None
    summary = stats.arm_summary(all_df, n_boot=n_boot, seed=seed)
    per_subject = stats.subject_summary(all_df)
    improvements = stats.paired_improvement(
        all_df, subjects_df=subjects_df, n_boot=n_boot, seed=seed
    )
    agree = agreement.agreement(all_df, n_boot=min(n_boot, 200), seed=seed)
    between = method_pairs.paired_methods(all_df, n_boot=n_boot, seed=seed)
    chosen = comparisons.paired_arms(
        all_df, arm_pairs, subjects_df=subjects_df, n_boot=n_boot, seed=seed
    )
    concept = concepts.carrier_transfer_summary(all_df, subjects, n_boot=n_boot, seed=seed)
    concept_pairs = concepts.carrier_transfer_pairs(all_df, subjects, n_boot=n_boot, seed=seed)
    paths = {
        "summary": out_dir / "summary.csv",
        "subjects": out_dir / "subjects.csv",
        "improvements": out_dir / "improvements.csv",
        "agreement": out_dir / "agreement.csv",
        "method_pairs": out_dir / "method_pairs.csv",
        "comparisons": out_dir / "comparisons.csv",
        "concepts": out_dir / "concepts.csv",
        "concept_pairs": out_dir / "concept_pairs.csv",
    }
    _csv(summary, paths["summary"])
    _csv(per_subject, paths["subjects"])
    _csv(improvements, paths["improvements"])
    _csv(agree, paths["agreement"])
    _csv(between, paths["method_pairs"])
    _csv(chosen, paths["comparisons"])
    _csv(concept, paths["concepts"])
    _csv(concept_pairs, paths["concept_pairs"])
    # The paper's columns, then the world's ground-truth measures where they were scored.
    measured = set(summary["metric"])
    metrics = [*stats.PAPER_METRICS, *(m for m in agreement.TRUTHS if m in measured)]
    for name, build in TABLES.items():
        base = out_dir / "tables" / name
        base.parent.mkdir(parents=True, exist_ok=True)
        table = build(summary, metrics=metrics)
        # An arm without training has no captions to be a baseline of: it is the reference
        # (named by its description set if it ran with another than the baseline's).
        rows = table["method"].isin(list(untrained))
        table.loc[rows, "setting"] = [
            "untrained" if s == "baseline" else f"untrained ({s})"
            for s in table.loc[rows, "setting"]
        ]
        stats.write_table(
            table,
            base.with_suffix(".csv"),
            base.with_suffix(".md"),
            base.with_suffix(".html"),
        )
        paths[f"table_{name}"] = base.with_suffix(".html")
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    full, subsets = (
        summary[~summary["method"].str.contains(SUBSET_SEPARATOR, regex=False)],
        summary[summary["method"].str.contains(SUBSET_SEPARATOR, regex=False)],
    )
    plots.plot_pareto(full, plot_dir / "pareto", untrained=untrained)
    # The single-reference experiment's own figure (paper Fig. 9).
    plots.plot_pareto(subsets, plot_dir / "pareto_single_reference", untrained=untrained)
    plots.plot_subjects(per_subject, plot_dir / "subjects", untrained=untrained)
    plots.plot_improvements(improvements, plot_dir / "improvements")
    plots.plot_improvements(
        chosen.assign(
            method=_pair_labels(chosen),
            subjects_improved=chosen["subjects_a_better"],
        ),
        plot_dir / "comparisons",
        difference="A \u2212 B",
        counted="subjects favouring A",
        empty="no pair of metrics.comparisons has images in common",
    )
    plots.plot_agreement(agree, plot_dir / "agreement")
    for name in (
        "pareto",
        "pareto_single_reference",
        "subjects",
        "improvements",
        "comparisons",
        "agreement",
    ):
        paths[f"plot_{name}"] = plot_dir / f"{name}.png"
    log.info("%d metric rows -> %d arm summaries", len(all_df), len(summary))
    return paths
