"""Table B.2 and what backs it, from the responses of a study.

- `table_b2`: per question, the share of judgements preferring arm A, arm B, or neither
  ("undecided"), with percentile bootstrap intervals that resample participants (a participant
  drawn twice counts twice), beside the paper's values when the study is the paper's
  (DreamBooth vs SID-DreamBooth on the paper's four questions);
- `agreement_table`: Fleiss' kappa and Krippendorff's alpha (nominal: A, B, undecided) per
  question and over all; a unit is one pair of images and one question, its raters the
  participants who judged it;
- `subject_table`: the same shares per subject (intervals resample that subject's participants);
- `metric_agreement`: per subject and question with a metric, whether the human majority (more
  judgements for B than for A, or the reverse; undecided ones do not vote) and the metric's
  direction (the sign of the per-subject mean of B minus that of A, higher being better) point
  to the same arm.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sidpipe.human_study.agreement import fleiss_kappa, krippendorff_alpha_nominal
from sidpipe.human_study.responses import check_against_plan, read_responses
from sidpipe.io import SidpipeError, atomic_file, log

UNDECIDED = "undecided"
# Table B.2 of the paper (App. B): DreamBooth (A) vs DreamBooth + SID (B).
PAPER_ARMS = ("dreambooth/case1/standard", "dreambooth/sid/standard")
PAPER_TABLE_B2 = {
    "subject_alignment": {"A": 0.362, "B": 0.406, UNDECIDED: 0.232},
    "non_subject_disentanglement": {"A": 0.109, "B": 0.688, UNDECIDED: 0.203},
    "text_alignment": {"A": 0.078, "B": 0.597, UNDECIDED: 0.325},
    "overall": {"A": 0.155, "B": 0.709, UNDECIDED: 0.136},
}
TABLE_COLUMNS = ["question", "preferred", "share", "ci_low", "ci_high", "n", "n_judgements"]
TABLE_COLUMNS += ["n_participants", "paper_share"]
AGREEMENT_COLUMNS = ["question", "statistic", "value", "n_units", "n_judgements", "mean_raters"]
SUBJECT_COLUMNS = ["subject", "question", "preferred", "share", "ci_low", "ci_high", "n"]
SUBJECT_COLUMNS += ["n_judgements", "n_participants"]
METRIC_COLUMNS = ["subject", "question", "metric", "mean_a", "mean_b", "diff", "metric_favours"]
METRIC_COLUMNS += ["n_a", "n_b", "n_undecided", "human_favours", "agree"]


def read_site(site: str | Path) -> tuple[dict, pd.DataFrame]:
    """study.json and plan.csv of a built study."""
    site = Path(site)
    try:
        info = json.loads((site / "study.json").read_text())
        plan = pd.read_csv(site / "plan.csv", dtype={"participant": str, "subject": str})
    except FileNotFoundError as err:
        raise SidpipeError(f"{site} is not a built study ({err.filename} is missing)") from None
    return info, plan


def judgements(records: Sequence[dict], arms: Sequence[str]) -> pd.DataFrame:
    """One row per judgement with `preferred`: the arm chosen, or "undecided"."""
    df = pd.DataFrame(list(records))
    if df.empty:
        raise SidpipeError("no judgements recorded yet: nothing to analyse")
    side = {"left": df["left_arm"], "right": df["right_arm"]}
    preferred = np.select(
        [df["choice"] == "left", df["choice"] == "right"], [side["left"], side["right"]], UNDECIDED
    )
    df["preferred"] = preferred
    unknown = set(df["preferred"]) - {*arms, UNDECIDED}
    if unknown:
        raise SidpipeError(
            f"judgements name arms {sorted(unknown)} that the study does not compare"
        )
    return df


def _rng(seed: int, *what: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32("|".join(what).encode())])


def _counts_by_participant(df: pd.DataFrame, categories: Sequence[str]) -> np.ndarray:
    table = pd.crosstab(df["participant"], df["preferred"])
    return table.reindex(columns=list(categories), fill_value=0).to_numpy(float)


def share_intervals(
    counts: np.ndarray, n_boot: int, rng: np.random.Generator, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(share, ci_low, ci_high) per category of a participants x categories count table; the
    bootstrap resamples participants with replacement and pools their judgements."""
    counts = np.asarray(counts, float)
    share = counts.sum(axis=0) / counts.sum()
    if n_boot < 1:
        raise SidpipeError(f"the bootstrap needs at least one resample, got {n_boot}")
    draws = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    sums = counts[draws].sum(axis=1)
    shares = sums / sums.sum(axis=1, keepdims=True)
    alpha = (1 - level) / 2
    low, high = np.quantile(shares, [alpha, 1 - alpha], axis=0)
    return share, low, high


def _share_rows(
    df: pd.DataFrame, categories: Sequence[str], n_boot: int, rng: np.random.Generator
) -> list[dict]:
    counts = _counts_by_participant(df, categories)
    share, low, high = share_intervals(counts, n_boot, rng)
    totals = counts.sum(axis=0)
    return [
        {
            "preferred": category,
            "share": float(share[i]),
            "ci_low": float(low[i]),
            "ci_high": float(high[i]),
            "n": int(totals[i]),
            "n_judgements": int(counts.sum()),
            "n_participants": int(len(counts)),
        }
        for i, category in enumerate(categories)
    ]


def table_b2(
    df: pd.DataFrame, arms: Sequence[str], questions: Sequence[str], n_boot: int, seed: int
) -> pd.DataFrame:
    categories = [*arms, UNDECIDED]
    paper = tuple(arms) == PAPER_ARMS
    rows = []
    for question in questions:
        part = df[df["question"] == question]
        if part.empty:
            continue
        for row in _share_rows(part, categories, n_boot, _rng(seed, "table", question)):
            label = {arms[0]: "A", arms[1]: "B"}.get(row["preferred"], UNDECIDED)
            value = PAPER_TABLE_B2.get(question, {}).get(label) if paper else None
            rows.append({"question": question, **row, "paper_share": value})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def subject_table(
    df: pd.DataFrame, arms: Sequence[str], questions: Sequence[str], n_boot: int, seed: int
) -> pd.DataFrame:
    categories = [*arms, UNDECIDED]
    rows = []
    for (subject, question), part in df.groupby(["subject", "question"], sort=True):
        if question not in questions:
            continue
        rng = _rng(seed, "subject", subject, question)
        rows += [
            {"subject": subject, "question": question, **row}
            for row in _share_rows(part, categories, n_boot, rng)
        ]
    return pd.DataFrame(rows, columns=SUBJECT_COLUMNS)


def agreement_table(
    df: pd.DataFrame, arms: Sequence[str], questions: Sequence[str]
) -> pd.DataFrame:
    categories = [*arms, UNDECIDED]
    units = ["subject", "prompt_id", "seed", "question"]
    rows = []
    for question in [*questions, "all"]:
        part = df if question == "all" else df[df["question"] == question]
        if part.empty:
            continue
        table = pd.crosstab([part[u] for u in units], part["preferred"])
        counts = table.reindex(columns=categories, fill_value=0).to_numpy(float)
        rated = counts[counts.sum(axis=1) >= 2]
        common = {
            "question": question,
            "n_units": int(len(rated)),
            "n_judgements": int(rated.sum()),
            "mean_raters": float(rated.sum(axis=1).mean()) if len(rated) else float("nan"),
        }
        rows.append({**common, "statistic": "fleiss_kappa", "value": fleiss_kappa(counts)})
        alpha = krippendorff_alpha_nominal(counts)
        rows.append({**common, "statistic": "krippendorff_alpha", "value": alpha})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def metric_agreement(
    df: pd.DataFrame,
    metrics: pd.DataFrame,
    arms: Sequence[str],
    question_metrics: dict[str, str],
) -> pd.DataFrame:
    """Per subject and question with a metric: the metric's direction and the human majority.

    `metrics`: the per-subject summary of the metrics stage (`results/metrics/subjects.csv`:
    arm, subject, metric, mean, ...): the mean over every prompt and seed the arm sampled."""
    from sidpipe.stats import HIGHER_IS_BETTER

    missing = {"arm", "subject", "metric", "mean"} - set(metrics.columns)
    if missing:
        raise SidpipeError(f"the metrics' subject summary lacks column(s) {sorted(missing)}")
    means = metrics.set_index(["arm", "subject", "metric"])["mean"]
    rows = []
    for (subject, question), part in df.groupby(["subject", "question"], sort=True):
        metric = question_metrics.get(question)
        if not metric:
            continue
        votes = part["preferred"].value_counts()
        n_a, n_b = int(votes.get(arms[0], 0)), int(votes.get(arms[1], 0))
        human = arms[1] if n_b > n_a else arms[0] if n_a > n_b else "tie"
        mean_a = means.get((arms[0], subject, metric), np.nan)
        mean_b = means.get((arms[1], subject, metric), np.nan)
        diff = float(mean_b - mean_a)
        sign = np.sign(diff) * (1 if HIGHER_IS_BETTER.get(metric, True) else -1)
        favours = "" if np.isnan(diff) else {1: arms[1], -1: arms[0]}.get(sign, "tie")
        decided = human != "tie" and favours not in ("", "tie")
        rows.append(
            {
                "subject": subject,
                "question": question,
                "metric": metric,
                "mean_a": float(mean_a),
                "mean_b": float(mean_b),
                "diff": diff,
                "metric_favours": favours,
                "n_a": n_a,
                "n_b": n_b,
                "n_undecided": int(votes.get(UNDECIDED, 0)),
                "human_favours": human,
                "agree": (human == favours) if decided else None,
            }
        )
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def wide_table_b2(table: pd.DataFrame, arms: Sequence[str]) -> pd.DataFrame:
    """Table B.2's shape: rows arm A, arm B, undecided (then the paper's), columns questions."""
    labels = {arms[0]: f"A: {arms[0]}", arms[1]: f"B: {arms[1]}", UNDECIDED: "undecided"}
    out = {}
    for question, part in table.groupby("question", sort=False):
        cells = {}
        for row in part.itertuples():
            cells[labels[row.preferred]] = (
                f"{100 * row.share:.1f} % [{100 * row.ci_low:.1f}, {100 * row.ci_high:.1f}]"
            )
            if pd.notna(row.paper_share):
                cells[f"paper: {labels[row.preferred]}"] = f"{100 * row.paper_share:.1f} %"
        n = part["n_judgements"].iloc[0]
        cells["judgements (participants)"] = f"{n} ({part['n_participants'].iloc[0]})"
        out[question] = cells
    wide = pd.DataFrame(out)
    return wide.rename_axis("preferred").reset_index()


def _csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_file(path, newline="") as handle:
        df.to_csv(handle, index=False)


def analyze_study(
    responses: str | Path,
    site: str | Path,
    metrics_subjects: str | Path | None,
    out: dict[str, str | Path],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Write the tables and the figure: `out` maps table, table_md, table_html, agreement,
    subjects, metric_agreement and plot (a stem: .svg and .png) to paths."""
    from sidpipe.human_study.plots import plot_study
    from sidpipe.stats import to_markdown

    info, plan = read_site(site)
    records = read_responses(responses)
    check_against_plan(records, plan.to_dict("records"), str(responses))
    arms = list(info["arms"])
    questions = [q["id"] for q in info["questions"]]
    df = judgements(records, arms)
    tables = {
        "table": table_b2(df, arms, questions, n_boot, seed),
        "agreement": agreement_table(df, arms, questions),
        "subjects": subject_table(df, arms, questions, n_boot, seed),
    }
    question_metrics = {q["id"]: q.get("metric") for q in info["questions"] if q.get("metric")}
    if metrics_subjects is not None:
        metrics = pd.read_csv(metrics_subjects, dtype={"subject": str})
        tables["metric_agreement"] = metric_agreement(df, metrics, arms, question_metrics)
    else:
        tables["metric_agreement"] = pd.DataFrame(columns=METRIC_COLUMNS)
    for name in ("table", "agreement", "subjects", "metric_agreement"):
        _csv(tables[name], Path(out[name]))
    wide = wide_table_b2(tables["table"], arms)
    with atomic_file(out["table_md"]) as handle:
        handle.write(to_markdown(wide))
    with atomic_file(out["table_html"]) as handle:
        handle.write(wide.to_html(index=False, border=0, escape=True) + "\n")
    plot_study(tables["table"], tables["metric_agreement"], arms, Path(out["plot"]))
    log.info(
        "%d judgements of %d participants on %d screens of the plan",
        len(df),
        df["participant"].nunique(),
        len(plan),
    )
    return tables


__all__ = [
    "PAPER_ARMS",
    "PAPER_TABLE_B2",
    "UNDECIDED",
    "agreement_table",
    "analyze_study",
    "judgements",
    "metric_agreement",
    "read_site",
    "share_intervals",
    "subject_table",
    "table_b2",
    "wide_table_b2",
]
