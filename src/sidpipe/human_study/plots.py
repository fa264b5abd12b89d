"""The human study's figure: Table B.2 as bars with intervals (the paper's values as
diamonds), and how often the human majority and the metrics' direction agree."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from sidpipe.plots import _save

COLORS = ("#4c72b0", "#dd8452", "#8c8c8c")  # arm A, arm B, undecided


def plot_study(
    table: pd.DataFrame, metric_agreement: pd.DataFrame, arms: Sequence[str], out: Path
) -> list[Path]:
    """Write `out` .svg and .png (same stem)."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[2.2, 1])
    questions = list(dict.fromkeys(table["question"]))
    categories = [*arms, "undecided"]
    width = 0.26
    x = np.arange(len(questions))
    for i, category in enumerate(categories):
        rows = table[table["preferred"] == category].set_index("question").reindex(questions)
        share = rows["share"].to_numpy(float)
        err = np.vstack([share - rows["ci_low"], rows["ci_high"] - share])
        pos = x + (i - 1) * width
        left.bar(pos, 100 * share, width, color=COLORS[i], label=category)
        left.errorbar(pos, 100 * share, yerr=100 * err, fmt="none", ecolor="black", capsize=3)
        paper = rows["paper_share"].to_numpy(float)
        if np.isfinite(paper).any():
            left.scatter(pos, 100 * paper, marker="D", s=28, color="black", zorder=3)
    left.set_xticks(x, [q.replace("_", "\n") for q in questions])
    left.set_ylabel("judgements preferring (%)")
    left.set_ylim(0, 100)
    left.set_title("Table B.2: preference per question (95 % CI, participants resampled)")
    handles = [Patch(color=COLORS[i], label=c) for i, c in enumerate(categories)]
    if table["paper_share"].notna().any():
        handles.append(Line2D([], [], marker="D", color="black", ls="", label="paper"))
    left.legend(handles=handles, fontsize="small", loc="upper left", frameon=False)

    compared = metric_agreement.dropna(subset=["agree"]) if len(metric_agreement) else None
    if compared is None or compared.empty:
        right.text(0.5, 0.5, "no subject with a decided\nhuman majority and metric", ha="center")
        right.set_axis_off()
    else:
        summary = compared.groupby(["question", "metric"], sort=False)["agree"]
        shares = summary.agg(lambda s: float(np.mean(s.astype(bool))))
        counts = summary.agg(lambda s: f"{int(s.astype(bool).sum())}/{len(s)}")
        labels = [f"{q.replace('_', ' ')}\nvs {m}" for q, m in shares.index]
        ypos = np.arange(len(shares))
        right.barh(ypos, 100 * shares.to_numpy(), color="#55a868")
        for y, share, text in zip(ypos, shares.to_numpy(), counts.to_numpy(), strict=True):
            right.text(100 * share + 2, y, text, va="center", fontsize="small")
        right.set_yticks(ypos, labels, fontsize="small")
        right.invert_yaxis()
        right.set_xlim(0, 115)
        right.axvline(50, color="0.6", ls="--", lw=1)
        right.set_xlabel("subjects where human majority and metric agree (%)")
        right.set_title("Humans vs the metrics' direction")
    return _save(fig, out)


__all__ = ["plot_study"]
