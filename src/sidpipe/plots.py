"""Report figures from `sidpipe.stats` tables, each written as SVG and PNG (same stem).

Figures are built on `matplotlib.figure.Figure` (Agg / SVG canvases), never pyplot, so no
global backend or GUI state is touched. SVGs carry no date and a fixed hash salt, so re-running
on the same numbers gives byte-identical files.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from pathlib import Path

import matplotlib
import matplotlib.patches
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sidpipe.agreement import IDENTITY_PROXIES
from sidpipe.io import SidpipeError, atomic_file
from sidpipe.stats import arm_name, pareto_front

PARETO_PAIRS = (("SA", "TA"), ("NSD", "TA"), ("SA", "NSD"))
LABELS = {
    "SA": "SA (subject alignment)",
    "NSD": "NSD (non-subject disentanglement)",
    "TA": "TA (text alignment)",
    "CLIP-I": "CLIP-I",
    "DINO": "DINO",
}
_MARKERS = {"case1": "o", "case2": "s", "sid": "*", "case4": "D", "sid_llava": "P"}
_MARKERS |= {"sid_blip2": "X"}
_SPARE_MARKERS = ("v", "^", "<", ">", "h", "p", "d", "8")
# Arms without training (the base model, encoders): a reference point, not on the Pareto front.
UNTRAINED_MARKER = "x"
DPI = 150
_METRIC_ORDER = ("TA", "SA", "NSD", "CLIP-I", "DINO")


def _save(fig: Figure, out: Path) -> list[Path]:
    """Write `out` as .svg and .png (atomically); return both paths."""
    out = Path(out)
    paths = [out.with_suffix(".svg"), out.with_suffix(".png")]
    with matplotlib.rc_context({"svg.hashsalt": "sidpipe"}):
        for path in paths:
            fmt = path.suffix[1:]
            metadata = {"Date": None} if fmt == "svg" else {"Software": None}
            with atomic_file(path, "wb") as handle:
                fig.savefig(handle, format=fmt, dpi=DPI, bbox_inches="tight", metadata=metadata)
    return paths


def _styles(methods: Sequence[str], descriptions: Sequence[str]) -> tuple[dict, dict]:
    palette = matplotlib.colormaps["tab10"].colors
    colors = {m: palette[i % len(palette)] for i, m in enumerate(sorted(set(methods)))}
    spare = itertools.cycle(_SPARE_MARKERS)
    markers = {d: _MARKERS.get(d) or next(spare) for d in sorted(set(descriptions))}
    return colors, markers


def _legend(
    fig: Figure, colors: dict, markers: dict, front: bool = False, untrained: bool = False
) -> None:
    handles = [Line2D([], [], color=c, marker="o", ls="", label=m) for m, c in colors.items()]
    handles += [Line2D([], [], color="0.3", marker=k, ls="", label=d) for d, k in markers.items()]
    if untrained:
        label = "untrained (reference)"
        handles += [Line2D([], [], color="0.3", marker=UNTRAINED_MARKER, ls="", label=label)]
    hollow = "open marker: inference \u2260 standard"
    handles += [Line2D([], [], color="0.3", marker="o", ls="", mfc="none", label=hollow)]
    arrow = {"marker": r"$\rightarrow$", "ms": 12, "ls": "", "label": "baseline \u2192 SID"}
    handles += [Line2D([], [], color="0.3", **arrow)]
    if front:
        ring = {"marker": "o", "ms": 14, "mfc": "none", "ls": "--", "label": "Pareto front"}
        handles += [Line2D([], [], color="0.3", **ring)]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)


def _empty(out: Path, message: str) -> list[Path]:
    """A placeholder figure, so a workflow with too few arms still gets its report files."""
    fig = Figure(figsize=(4, 1.5))
    fig.text(0.5, 0.5, message, ha="center", va="center")
    return _save(fig, out)


def _points(summary: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Per arm: method, descriptions, inference and mean / ci_low / ci_high of x and y."""
    need = ["arm", "method", "descriptions", "inference", "metric", "mean", "ci_low", "ci_high"]
    missing = [c for c in need if c not in summary.columns]
    if missing:
        raise SidpipeError(f"the arm summary lacks column(s) {', '.join(missing)}")
    rows = summary[summary["metric"].isin([x, y])]
    wide = rows.pivot_table(
        index=["arm", "method", "descriptions", "inference"],
        columns="metric",
        values=["mean", "ci_low", "ci_high"],
        aggfunc="first",
    )
    if wide.empty or x not in wide["mean"] or y not in wide["mean"]:
        return pd.DataFrame()
    wide.columns = [f"{stat}_{metric}" for stat, metric in wide.columns]
    return wide.dropna(subset=[f"mean_{x}", f"mean_{y}"]).reset_index()


def _draw_arrows(
    ax: Axes, pts: pd.DataFrame, xcol: str, ycol: str, colors: dict, baseline, treatment
) -> None:
    """An arrow from each method's baseline arm to its SID arm."""
    where = dict(zip(pts["arm"], zip(pts[xcol], pts[ycol], strict=True), strict=True))
    for method in pts["method"].unique():
        start, end = where.get(arm_name(method, *baseline)), where.get(arm_name(method, *treatment))
        if start and end:
            ax.annotate(
                "",
                xy=end,
                xytext=start,
                arrowprops={"arrowstyle": "->", "color": colors[method], "lw": 1.2},
            )


def front_points(
    pts: pd.DataFrame, xcol: str, ycol: str, untrained: Collection[str] = ()
) -> pd.DataFrame:
    """The Pareto front's arms (both columns maximised), sorted by x; an untrained method's
    arm is a reference point and never on it."""
    trained = pts[~pts["method"].isin(list(untrained))]
    front = trained.iloc[pareto_front(list(zip(trained[xcol], trained[ycol], strict=True)))]
    return front.sort_values(xcol)


def _marker(record: dict, markers: dict, untrained: Collection[str]) -> str:
    return UNTRAINED_MARKER if record["method"] in untrained else markers[record["descriptions"]]


def _draw_pareto(
    ax: Axes,
    pts: pd.DataFrame,
    x: str,
    y: str,
    colors: dict,
    markers: dict,
    baseline,
    treatment,
    untrained: Collection[str] = (),
) -> None:
    for r in pts.to_dict("records"):  # records, not itertuples: "CLIP-I" is no identifier
        mx, my = r[f"mean_{x}"], r[f"mean_{y}"]
        xerr = [[mx - r[f"ci_low_{x}"]], [r[f"ci_high_{x}"] - mx]]
        yerr = [[my - r[f"ci_low_{y}"]], [r[f"ci_high_{y}"] - my]]
        hollow = r["inference"] != "standard"  # non-standard inference: open marker
        ax.errorbar(
            mx,
            my,
            xerr=np.nan_to_num(xerr),
            yerr=np.nan_to_num(yerr),
            fmt=_marker(r, markers, untrained),
            color=colors[r["method"]],
            markerfacecolor="none" if hollow else colors[r["method"]],
            ms=9 if r["descriptions"] == "sid" else 6,
            elinewidth=0.8,
            capsize=2,
            zorder=3,
        )
    _draw_arrows(ax, pts, f"mean_{x}", f"mean_{y}", colors, baseline, treatment)
    front = front_points(pts, f"mean_{x}", f"mean_{y}", untrained)
    ax.plot(front[f"mean_{x}"], front[f"mean_{y}"], "--", color="0.4", lw=1, zorder=2)
    ax.scatter(
        front[f"mean_{x}"],
        front[f"mean_{y}"],
        s=260,
        facecolors="none",
        edgecolors="0.2",
        linewidths=1,
        zorder=4,
        label="Pareto front",
    )
    ax.set_xlabel(LABELS.get(x, x) + " \u2191")
    ax.set_ylabel(LABELS.get(y, y) + " \u2191")
    ax.grid(alpha=0.3)


def plot_pareto(
    summary: pd.DataFrame,
    out: Path,
    pairs: Sequence[tuple[str, str]] = PARETO_PAIRS,
    baseline: tuple[str, str] = ("case1", "standard"),
    treatment: tuple[str, str] = ("sid", "standard"),
    untrained: Collection[str] = (),
) -> list[Path]:
    """One panel per metric pair (default SA-TA, NSD-TA, SA-NSD): every arm's mean with its CI
    as error bars, arrows baseline -> SID per method, the Pareto front circled and dashed; the
    `untrained` methods' arms (base model, encoders) drawn as reference points off the front."""
    panels = [(x, y, _points(summary, x, y)) for x, y in pairs]
    panels = [(x, y, p) for x, y, p in panels if len(p)]
    if not panels:
        return _empty(out, "no arm has the metrics to plot")
    every = pd.concat([p for _, _, p in panels])
    colors, markers = _styles(every["method"].tolist(), every["descriptions"].tolist())
    fig = Figure(figsize=(4.6 * len(panels) + 1.6, 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (x, y, pts) in zip(axes, panels, strict=True):
        _draw_pareto(ax, pts, x, y, colors, markers, baseline, treatment, untrained)
        ax.set_title(f"{x} vs {y}")
    _legend(fig, colors, markers, front=True, untrained=every["method"].isin(list(untrained)).any())
    return _save(fig, out)


def plot_subjects(
    subject_summary: pd.DataFrame,
    out: Path,
    x: str = "NSD",
    y: str = "TA",
    baseline: tuple[str, str] = ("case1", "standard"),
    treatment: tuple[str, str] = ("sid", "standard"),
    ncols: int = 5,
    untrained: Collection[str] = (),
) -> list[Path]:
    """Small multiples: one panel per subject, each arm a point at its (x, y) subject mean,
    arrows baseline -> SID per method. Takes `stats.subject_summary`'s table."""
    need = ["arm", "method", "descriptions", "inference", "subject", "metric", "mean"]
    missing = [c for c in need if c not in subject_summary.columns]
    if missing:
        raise SidpipeError(f"the subject summary lacks column(s) {', '.join(missing)}")
    rows = subject_summary[subject_summary["metric"].isin([x, y])]
    wide = rows.pivot_table(
        index=["subject", "arm", "method", "descriptions", "inference"],
        columns="metric",
        values="mean",
        aggfunc="first",
    )
    if wide.empty or x not in wide or y not in wide:
        return _empty(out, f"no subject has both {x} and {y}")
    wide = wide.dropna(subset=[x, y]).reset_index()
    colors, markers = _styles(wide["method"].tolist(), wide["descriptions"].tolist())
    subjects = sorted(wide["subject"].unique())
    ncols = max(1, min(ncols, len(subjects)))
    nrows = -(-len(subjects) // ncols)
    fig = Figure(figsize=(2.8 * ncols + 1.6, 2.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, subject in zip(axes, subjects, strict=False):
        pts = wide[wide["subject"] == subject]
        for r in pts.to_dict("records"):
            color = colors[r["method"]]
            ax.plot(
                r[x],
                r[y],
                _marker(r, markers, untrained),
                color=color,
                ms=8 if r["descriptions"] == "sid" else 5,
                markerfacecolor="none" if r["inference"] != "standard" else color,
            )
        _draw_arrows(ax, pts, x, y, colors, baseline, treatment)
        ax.set_title(subject, fontsize="medium")
        ax.tick_params(labelsize="x-small")
        ax.grid(alpha=0.3)
    for ax in axes[len(subjects) :]:
        ax.set_visible(False)
    fig.supxlabel(LABELS.get(x, x) + " \u2191")
    fig.supylabel(LABELS.get(y, y) + " \u2191")
    _legend(fig, colors, markers, untrained=wide["method"].isin(list(untrained)).any())
    return _save(fig, out)


def interval_colours(rows: pd.DataFrame) -> list[str]:
    """Per row of a difference table: green when its CI (`ci_low`, `ci_high`) excludes 0 on
    the metric's better side (`higher_is_better`; below 0 for a leak), red on the worse side,
    grey when it holds 0."""
    up = rows["higher_is_better"].astype(bool).to_numpy()
    low, high = rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float)
    # the interval in the better direction: a leak's [lo, hi] is [-hi, -lo] there
    low_better, high_better = np.where(up, low, -high), np.where(up, high, -low)
    return list(np.where(low_better > 0, "tab:green", np.where(high_better < 0, "tab:red", "0.6")))


def plot_improvements(
    improvements: pd.DataFrame,
    out: Path,
    bias: str = "all",
    metrics: Sequence[str] | None = None,
    difference: str = "SID \u2212 baseline",
    counted: str = "subjects improved",
    empty: str = "no method has both a baseline and a SID arm",
) -> list[Path]:
    """One panel per metric (at most 5 a row): a bar per `method` with its paired difference
    and CI (by default SID - baseline), green / red when the CI excludes 0 in the better /
    worse direction (`interval_colours`), grey otherwise; the label over a bar is
    `subjects_improved` of `n_subjects`. `difference`, `counted` and `empty` say what the bars,
    the k/n labels and an empty figure mean when `method` holds other differences (A - B of
    `comparisons.paired_arms`, one bar per pair)."""
    need = ["method", "metric", "bias", "diff", "ci_low", "ci_high", "subjects_improved"]
    need += ["n_subjects", "higher_is_better"]
    missing = [c for c in need if c not in improvements.columns]
    if missing:
        raise SidpipeError(f"the improvements table lacks column(s) {', '.join(missing)}")
    rows = improvements[improvements["bias"] == bias]
    present = set(rows["metric"])
    if metrics is None:  # the paper's order first, then anything else
        metrics = [m for m in _METRIC_ORDER if m in present] + sorted(present - set(_METRIC_ORDER))
    metrics = [m for m in metrics if m in present]
    if not metrics:
        return _empty(out, empty)
    # At most 5 panels a row: a figure of a dozen metrics stays readable in the report.
    ncols = min(len(metrics), 5)
    nrows = -(-len(metrics) // ncols)
    width = max(3.0, 1.0 + 0.6 * rows["method"].nunique())
    fig = Figure(figsize=(width * ncols, 3.8 * nrows))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(metrics) :]:
        ax.set_axis_off()
    for ax, metric in zip(axes, metrics, strict=False):
        sub = rows[rows["metric"] == metric].sort_values("method")
        colors = interval_colours(sub)
        xs = np.arange(len(sub))
        err = np.vstack([sub["diff"] - sub["ci_low"], sub["ci_high"] - sub["diff"]])
        ax.bar(xs, sub["diff"], color=list(colors), yerr=err, capsize=3, width=0.6)
        ax.axhline(0, color="0.2", lw=0.8)
        for xpos, r in zip(xs, sub.itertuples(index=False), strict=True):
            top = max(r.ci_high, 0) if np.isfinite(r.ci_high) else max(r.diff, 0)
            ax.annotate(
                f"{r.subjects_improved}/{r.n_subjects}",
                (xpos, top),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                fontsize="x-small",
            )
        ax.set_xticks(xs, sub["method"], rotation=30, ha="right", fontsize="small")
        arrow = "\u2191" if bool(sub["higher_is_better"].all()) else "\u2193"
        ax.set_title(f"\u0394{metric} ({difference}) {arrow}", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.12)  # room for the k/n labels
    title = f"paired difference with bootstrap CI; k/n = {counted}"
    fig.suptitle(title if bias == "all" else f"{title}; subjects with bias: {bias}", size="small")
    return _save(fig, out)


def plot_agreement(agreement: pd.DataFrame, out: Path) -> list[Path]:
    """Heatmaps of Spearman's rho between each proxy (rows) and each ground-truth measure
    (columns), across images and across arms; a cell with the sign a faithful proxy should
    have is outlined."""
    if agreement.empty:
        return _empty(out, "no ground-truth measures (no world subjects or no judge)")
    levels = [lv for lv in ("images", "arms") if lv in set(agreement["level"])]
    proxies = list(dict.fromkeys(agreement["proxy"]))
    truths = list(dict.fromkeys(agreement["truth"]))
    # Square cells of a fixed size: the panels' width follows the measures, the height the
    # proxies, with no blank band between the panels.
    cell = 0.8
    fig = Figure(figsize=(3.2 + cell * len(truths) * len(levels), 1.6 + cell * len(proxies)))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, len(levels), squeeze=False)[0]
    for ax, level in zip(axes, levels, strict=True):
        sub = agreement[agreement["level"] == level]
        grid = np.full((len(proxies), len(truths)), np.nan)
        for r in sub.itertuples(index=False):
            grid[proxies.index(r.proxy), truths.index(r.truth)] = r.spearman
        image = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1)
        for r in sub.itertuples(index=False):
            i, j = proxies.index(r.proxy), truths.index(r.truth)
            if np.isfinite(r.spearman):
                ax.text(
                    j,
                    i,
                    f"{r.spearman:+.2f}\nn={r.n}",
                    ha="center",
                    va="center",
                    fontsize="x-small",
                    color="white" if abs(r.spearman) > 0.7 else "black",  # legible on dark
                )
            agrees = np.isfinite(r.spearman) and np.sign(r.spearman) == r.expected_sign
            if r.expected_sign and agrees:
                ax.add_patch(
                    matplotlib.patches.Rectangle(
                        (j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5, ec="black"
                    )
                )
        paper = [i for i, p in enumerate(proxies) if p not in IDENTITY_PROXIES]
        if paper and len(paper) < len(proxies):  # the paper's proxies above, CLIP-I/DINO below
            ax.axhline(max(paper) + 0.5, color="grey", lw=1, ls="--")
        ax.set_xticks(range(len(truths)), truths, rotation=30, ha="right", fontsize="small")
        ax.set_yticks(range(len(proxies)), proxies)
        ax.set_title(f"across {level}", fontsize="medium")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="Spearman's rho")
    return _save(fig, out)


__all__ = [
    "LABELS",
    "PARETO_PAIRS",
    "plot_agreement",
    "plot_improvements",
    "plot_pareto",
    "plot_subjects",
]
