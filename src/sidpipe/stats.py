"""Summaries of the long metrics table (`results/metrics/all.csv`): hierarchical bootstrap CIs
per arm, paired SID-vs-baseline improvements, the paper's tables and Pareto fronts.

Estimand: the mean over subjects of the mean over prompts of the mean over seeds. With the
paper's balanced grid (every subject has the same prompts and seeds) that is the plain mean of
all images. Its uncertainty comes from the choice of subjects and of prompts, so the bootstrap
resamples both (two-stage): subjects with replacement, then prompts with replacement within
each drawn subject; seeds are averaged, not resampled. Intervals are percentile intervals.
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sidpipe.io import SidpipeError, atomic_file, log
from sidpipe.subsets import SEPARATOR as SUBSET_SEPARATOR

# Higher is better for every metric scored by sidpipe.metrics and for the world's subject_kept
# and prompt_followed; a metric missing here is too. The world's leaks are better lower.
HIGHER_IS_BETTER: dict[str, bool] = {m: True for m in ("SA", "NSD", "TA", "CLIP-I", "DINO")}
HIGHER_IS_BETTER |= {
    m: False for m in ("leak_background", "leak_object", "leak_pose", "leak_subject")
}
PAPER_METRICS = ("TA", "SA", "NSD")  # the paper's column order
ARM_KEYS = ["method", "descriptions", "inference"]
SUMMARY_COLUMNS = ["arm", *ARM_KEYS, "metric", "mean", "ci_low", "ci_high", "n_images"]
SUMMARY_COLUMNS += ["n_subjects"]
TABLE_COLUMNS = ["table", "method", "setting", "descriptions", "inference", "source", "metric"]
TABLE_COLUMNS += ["mean", "ci_low", "ci_high", "n_subjects"]

# DreamBooth + SD, TA / SA / NSD as printed in the paper's appendix.
PAPER_VALUES: dict[str, dict[str, dict[str, float]]] = {
    "Table E.3": {  # description cases; Case 3 is SID
        "case1": {"TA": 0.290, "SA": 0.686, "NSD": 0.299},
        "case2": {"TA": 0.311, "SA": 0.685, "NSD": 0.342},
        "sid": {"TA": 0.317, "SA": 0.686, "NSD": 0.352},
        "case4": {"TA": 0.325, "SA": 0.659, "NSD": 0.348},
    },
    "Table E.4": {  # the VLM that wrote the SID descriptions
        "sid": {"TA": 0.317, "SA": 0.684, "NSD": 0.354},
        "sid_llava": {"TA": 0.311, "SA": 0.681, "NSD": 0.340},
        "sid_blip2": {"TA": 0.311, "SA": 0.683, "NSD": 0.343},
    },
}


def arm_name(method: str, descriptions: str, inference: str) -> str:
    return f"{method}/{descriptions}/{inference}"


def read_metrics(path: Path) -> pd.DataFrame:
    """Load all.csv with the types the summaries expect."""
    try:
        df = pd.read_csv(path, dtype={"subject": str, "method": str, "descriptions": str})
    except (OSError, pd.errors.ParserError) as exc:
        raise SidpipeError(f"{path}: cannot read the metrics table ({exc})") from exc
    _check_columns(df, ["subject", *ARM_KEYS, "prompt_id", "seed", "metric", "value"], str(path))
    return df


def _check_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SidpipeError(f"{what} lacks column(s) {', '.join(missing)}")


# --- hierarchical bootstrap ----------------------------------------------------------------


def _prompt_means(df: pd.DataFrame, value: str = "value") -> list[np.ndarray]:
    """Per subject, the array of its prompts' means over seeds."""
    cells = df.groupby(["subject", "prompt_id"], sort=True)[value].mean()
    return [group.to_numpy(float) for _, group in cells.groupby(level=0, sort=True)]


def _estimate(groups: list[np.ndarray]) -> float:
    return float(np.mean([g.mean() for g in groups]))


def _bootstrap(groups: list[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """`n_boot` two-stage bootstrap replicates of `_estimate`, vectorised in blocks."""
    counts = np.array([len(g) for g in groups])
    n_subjects, width = len(groups), int(counts.max())
    table = np.zeros((n_subjects, width))
    for i, g in enumerate(groups):
        table[i, : len(g)] = g
    # Blocks keep the (block, subjects, prompts) arrays to a few million entries.
    block = max(1, 2_000_000 // (n_subjects * width))
    out = np.empty(n_boot)
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        subj = rng.integers(0, n_subjects, size=(b, n_subjects))
        n = counts[subj][..., None]  # prompts of each drawn subject
        # Draw `width` prompt slots per subject and keep the first n: a subject with fewer
        # prompts than the widest still contributes n draws, as in a ragged bootstrap.
        idx = np.floor(rng.random((b, n_subjects, width)) * n).astype(np.int64)
        vals = table[subj[..., None], idx]
        keep = np.arange(width) < n
        out[start : start + b] = (np.where(keep, vals, 0.0).sum(-1) / n[..., 0]).mean(-1)
    return out


def _ci(
    groups: list[np.ndarray], n_boot: int, seed: int, level: float
) -> tuple[float, float, float]:
    if not 0 < level < 1:
        raise SidpipeError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise SidpipeError(f"n_boot must be at least 1, got {n_boot}")
    reps = _bootstrap(groups, n_boot, np.random.default_rng(seed))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(reps, [alpha, 1 - alpha])
    return _estimate(groups), float(lo), float(hi)


def bootstrap_ci(
    df: pd.DataFrame, metric: str, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high) of `metric` over the rows of `df` (one arm's long rows)."""
    _check_columns(df, ["subject", "prompt_id", "metric", "value"], "the metrics table")
    rows = df[df["metric"] == metric]
    if rows.empty:
        raise SidpipeError(f"no rows for metric {metric!r}")
    return _ci(_prompt_means(rows), n_boot, seed, level)


def arm_summary(
    all_df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> pd.DataFrame:
    """One row per arm and metric: mean, bootstrap CI, n_images, n_subjects (`SUMMARY_COLUMNS`)."""
    _check_columns(all_df, ["subject", *ARM_KEYS, "prompt_id", "seed", "metric", "value"], "all")
    out = []
    for (method, desc, inf, metric), rows in all_df.groupby([*ARM_KEYS, "metric"], sort=True):
        mean, lo, hi = _ci(_prompt_means(rows), n_boot, seed, level)
        out.append(
            {
                "arm": arm_name(method, desc, inf),
                "method": method,
                "descriptions": desc,
                "inference": inf,
                "metric": metric,
                "mean": mean,
                "ci_low": lo,
                "ci_high": hi,
                "n_images": int(rows[["subject", "prompt_id", "seed"]].drop_duplicates().shape[0]),
                "n_subjects": int(rows["subject"].nunique()),
            }
        )
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def subject_summary(all_df: pd.DataFrame) -> pd.DataFrame:
    """Per arm, subject and metric: the mean over its images and n_images (small multiples)."""
    keys = [*ARM_KEYS, "subject", "metric"]
    out = all_df.groupby(keys, sort=True)["value"].agg(mean="mean", n_images="size").reset_index()
    out.insert(0, "arm", out["method"] + "/" + out["descriptions"] + "/" + out["inference"])
    return out


# --- paired comparison ---------------------------------------------------------------------


def bias_groups(subjects_df: pd.DataFrame | None) -> dict[str, set[str]]:
    """Bias type -> subjects; a `bias` cell may list several types separated by commas."""
    if subjects_df is None:
        return {}
    _check_columns(subjects_df, ["subject", "bias"], "the subjects table")
    groups: dict[str, set[str]] = {}
    for subject, cell in zip(subjects_df["subject"], subjects_df["bias"], strict=True):
        if pd.isna(cell):
            continue
        for bias in (b.strip() for b in str(cell).split(",")):
            if bias:
                groups.setdefault(bias, set()).add(str(subject))
    return dict(sorted(groups.items()))


def bias_subsets(
    rows: pd.DataFrame, biases: dict[str, set[str]]
) -> Iterator[tuple[str, pd.DataFrame]]:
    """("all", rows), then (bias type, its subjects' rows) for each type with rows."""
    yield "all", rows
    for bias, subjects in biases.items():
        sub = rows[rows["subject"].isin(subjects)]
        if not sub.empty:
            yield bias, sub


def paired_improvement(
    all_df: pd.DataFrame,
    baseline: tuple[str, str] = ("case1", "standard"),
    treatment: tuple[str, str] = ("sid", "standard"),
    subjects_df: pd.DataFrame | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Per method and metric, treatment - baseline paired by (subject, prompt_id, seed).

    `baseline` / `treatment` are (descriptions, inference). Columns: method, metric, bias
    ("all", or a bias type of `subjects_df`), baseline, treatment, mean_baseline,
    mean_treatment, diff, ci_low, ci_high (two-stage bootstrap of the paired differences),
    n_pairs, n_subjects, subjects_improved, share_improved (subjects whose mean moved in the
    metric's better direction), higher_is_better.
    """
    _check_columns(all_df, ["subject", *ARM_KEYS, "prompt_id", "seed", "metric", "value"], "all")
    pair_keys = ["method", "metric", "subject", "prompt_id", "seed"]
    sides = []
    for name, (desc, inf) in (("baseline", baseline), ("treatment", treatment)):
        side = all_df[(all_df["descriptions"] == desc) & (all_df["inference"] == inf)]
        sides.append(side[pair_keys + ["value"]].rename(columns={"value": name}))
    pairs = sides[0].merge(sides[1], on=pair_keys, how="outer", indicator=True)
    unpaired = pairs["_merge"] != "both"
    if unpaired.any():
        # Arms that exist on one side only (e.g. a method run with SID alone) are expected.
        log.info("paired_improvement: %d image(s) without a partner skipped", int(unpaired.sum()))
    pairs = pairs[~unpaired].drop(columns="_merge")
    pairs["diff"] = pairs["treatment"] - pairs["baseline"]

    biases = bias_groups(subjects_df)
    out = []
    for (method, metric), rows in pairs.groupby(["method", "metric"], sort=True):
        better = HIGHER_IS_BETTER.get(str(metric), True)
        for bias, sub in bias_subsets(rows, biases):
            diff, lo, hi = _ci(_prompt_means(sub, "diff"), n_boot, seed, level)
            per_subject = sub.groupby("subject")["diff"].mean()
            improved = int((per_subject > 0).sum() if better else (per_subject < 0).sum())
            out.append(
                {
                    "method": method,
                    "metric": metric,
                    "bias": bias,
                    "baseline": arm_name(method, *baseline),
                    "treatment": arm_name(method, *treatment),
                    "mean_baseline": _estimate(_prompt_means(sub, "baseline")),
                    "mean_treatment": _estimate(_prompt_means(sub, "treatment")),
                    "diff": diff,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n_pairs": len(sub),
                    "n_subjects": len(per_subject),
                    "subjects_improved": improved,
                    "share_improved": improved / len(per_subject),
                    "higher_is_better": better,
                }
            )
    columns = ["method", "metric", "bias", "baseline", "treatment", "mean_baseline"]
    columns += ["mean_treatment", "diff", "ci_low", "ci_high", "n_pairs", "n_subjects"]
    columns += ["subjects_improved", "share_improved", "higher_is_better"]
    return pd.DataFrame(out, columns=columns)


# --- paper-style tables --------------------------------------------------------------------


def _table(
    summary: pd.DataFrame,
    name: str,
    settings: list[tuple[str, str, str, str | None]],
    methods: Sequence[str] | None,
    inference: str,
    metrics: Sequence[str],
) -> pd.DataFrame:
    """Long table rows for (setting label, method, descriptions, paper table) cells present in
    `summary`; a present cell with paper values also gets its "paper" rows."""
    _check_columns(summary, SUMMARY_COLUMNS, "the arm summary")
    rows = []
    present = summary[summary["inference"] == inference]
    wanted = methods if methods is not None else sorted(present["method"].unique())
    for method in wanted:
        for label, desc, only_method, paper in settings:
            if only_method is not None and method != only_method:
                continue
            cell = present[(present["method"] == method) & (present["descriptions"] == desc)]
            if cell.empty:
                continue
            base = {"table": name, "method": method, "setting": label, "descriptions": desc}
            base["inference"] = inference
            for metric in metrics:
                hit = cell[cell["metric"] == metric]
                if not hit.empty:
                    r = hit.iloc[0]
                    rows.append(
                        {
                            **base,
                            "source": "ours",
                            "metric": metric,
                            "mean": r["mean"],
                            "ci_low": r["ci_low"],
                            "ci_high": r["ci_high"],
                            "n_subjects": r["n_subjects"],
                        }
                    )
            # The paper's numbers are DreamBooth's: shown beside our DreamBooth arms only.
            values = PAPER_VALUES.get(paper or "", {}).get(desc) if method == "dreambooth" else None
            for metric in metrics:
                if values and metric in values:
                    rows.append(
                        {**base, "source": f"paper ({paper})", "metric": metric}
                        | {"mean": values[metric], "ci_low": np.nan, "ci_high": np.nan}
                        | {"n_subjects": np.nan}
                    )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def main_table(
    summary: pd.DataFrame,
    methods: Sequence[str] | None = None,
    baseline: str = "case1",
    sid: str = "sid",
    inference: str = "standard",
    metrics: Sequence[str] = PAPER_METRICS,
) -> pd.DataFrame:
    """Every method x {baseline, SID} (paper Table 1's layout); DreamBooth's paper rows are
    Table E.3's Case 1 and Case 3."""
    settings = [("baseline", baseline, None, "Table E.3"), ("SID", sid, None, "Table E.3")]
    if methods is None:  # reference-subset methods have their own table
        methods = sorted(m for m in summary["method"].unique() if SUBSET_SEPARATOR not in m)
    return _table(summary, "main", settings, methods, inference, metrics)


def single_reference_table(
    summary: pd.DataFrame,
    baseline: str = "case1",
    sid: str = "sid",
    inference: str = "standard",
    metrics: Sequence[str] = PAPER_METRICS,
) -> pd.DataFrame:
    """The single-reference experiment (paper Fig. 6 and 9): every reference-subset method
    (`<method>--first1`, see `sidpipe.subsets`) x {baseline, SID}."""
    methods = sorted(m for m in summary["method"].unique() if SUBSET_SEPARATOR in m)
    settings = [("baseline", baseline, None, None), ("SID", sid, None, None)]
    return _table(summary, "single_reference", settings, methods, inference, metrics)


def cases_table(
    summary: pd.DataFrame, inference: str = "standard", metrics: Sequence[str] = PAPER_METRICS
) -> pd.DataFrame:
    """DreamBooth x description cases 1-4 (Table E.3); Case 3 is SID (set `sid`)."""
    settings = [
        ("Case 1", "case1", "dreambooth", "Table E.3"),
        ("Case 2", "case2", "dreambooth", "Table E.3"),
        ("Case 3 (SID)", "sid", "dreambooth", "Table E.3"),
        ("Case 4", "case4", "dreambooth", "Table E.3"),
    ]
    return _table(summary, "cases", settings, ["dreambooth"], inference, metrics)


def vlms_table(
    summary: pd.DataFrame, inference: str = "standard", metrics: Sequence[str] = PAPER_METRICS
) -> pd.DataFrame:
    """DreamBooth x the VLM that wrote the SID descriptions (Table E.4; the paper's GPT-4 row
    is compared with set `sid`, written by the config's GPT model)."""
    settings = [
        ("GPT", "sid", "dreambooth", "Table E.4"),
        ("LLaVA", "sid_llava", "dreambooth", "Table E.4"),
        ("BLIP-2", "sid_blip2", "dreambooth", "Table E.4"),
    ]
    return _table(summary, "vlms", settings, ["dreambooth"], inference, metrics)


def wide_table(long: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """One row per (method, setting, source), one column per metric: "mean [lo, hi]"."""
    if long.empty:
        return pd.DataFrame(columns=["method", "setting", "source"])

    def cell(r: pd.Series) -> str:
        text = f"{r['mean']:.{digits}f}"
        if pd.notna(r["ci_low"]):
            text += f" [{r['ci_low']:.{digits}f}, {r['ci_high']:.{digits}f}]"
        return text

    long = long.assign(cell=long.apply(cell, axis=1))
    order = list(dict.fromkeys(long["metric"]))
    wide = long.pivot_table(
        index=["method", "setting", "source"], columns="metric", values="cell", aggfunc="first"
    )
    # pivot_table sorts the index; restore the table's own row order (method, setting, source).
    rows = list(dict.fromkeys(zip(long["method"], long["setting"], long["source"], strict=True)))
    wide = wide.reindex(pd.MultiIndex.from_tuples(rows, names=wide.index.names))[order]
    wide.columns.name = None
    return wide.reset_index().fillna("")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (pandas' to_markdown needs `tabulate`)."""
    cells = [[str(c) for c in df.columns]] + [[str(v) for v in row] for row in df.to_numpy()]
    cells = [[c.replace("|", "\\|") for c in row] for row in cells]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join(lines) + "\n"


def write_table(
    long: pd.DataFrame,
    csv_path: Path,
    md_path: Path | None = None,
    html_path: Path | None = None,
    digits: int = 3,
) -> pd.DataFrame:
    """Write the tidy long table as CSV and, optionally, its wide form as markdown / HTML."""
    with atomic_file(csv_path, newline="") as handle:
        long.to_csv(handle, index=False)
    wide = wide_table(long, digits)
    if md_path is not None:
        with atomic_file(md_path) as handle:
            handle.write(to_markdown(wide) if len(wide) else "_No arms of this table were run._\n")
    if html_path is not None:
        with atomic_file(html_path) as handle:
            if len(wide):
                handle.write(wide.to_html(index=False, border=0, escape=True))
            else:
                handle.write(f"<p>{html.escape('No arms of this table were run.')}</p>")
            handle.write("\n")
    return wide


# --- Pareto front --------------------------------------------------------------------------


def pareto_front(
    points: Sequence[tuple[float, float]], maximize: tuple[bool, bool] = (True, True)
) -> list[int]:
    """Indices (ascending) of the non-dominated points. A point is dominated when another is at
    least as good in both coordinates and strictly better in one; equal points are all kept;
    points with a NaN coordinate are never on the front."""
    arr = np.asarray(points, dtype=float).reshape(-1, 2)
    if not len(arr):
        return []
    signs = np.where(np.asarray(maximize, bool), 1.0, -1.0)
    arr = arr * signs  # now both coordinates are maximised
    valid = ~np.isnan(arr).any(axis=1)
    good = arr[valid]
    geq = (good[:, None, :] >= good[None, :, :]).all(-1)  # [j, i]: j at least as good as i
    gt = (good[:, None, :] > good[None, :, :]).any(-1)
    dominated = (geq & gt).any(axis=0)
    return [int(i) for i in np.flatnonzero(valid)[~dominated]]


__all__ = [
    "HIGHER_IS_BETTER",
    "PAPER_METRICS",
    "PAPER_VALUES",
    "SUMMARY_COLUMNS",
    "TABLE_COLUMNS",
    "arm_name",
    "arm_summary",
    "bootstrap_ci",
    "cases_table",
    "main_table",
    "paired_improvement",
    "pareto_front",
    "read_metrics",
    "subject_summary",
    "to_markdown",
    "vlms_table",
    "wide_table",
    "write_table",
]
