"""Tests for sidpipe.plots: every figure is written as non-empty SVG + PNG, reproducibly."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Annotation

from sidpipe import plots
from sidpipe.io import SidpipeError
from sidpipe.plots import interval_colours, plot_improvements, plot_pareto, plot_subjects
from sidpipe.stats import arm_summary, paired_improvement, subject_summary

ARMS = [
    ("dreambooth", "case1", "standard"),
    ("dreambooth", "sid", "standard"),
    ("dreambooth", "case1", "negative_prompt"),
    ("svdiff", "case1", "standard"),
    ("svdiff", "sid", "standard"),
    ("textual_inversion", "sid", "standard"),  # SID only: no arrow, no improvement bar
]
METRICS = ("SA", "NSD", "TA", "CLIP-I")


@pytest.fixture(scope="module")
def metrics_df() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for a, (method, desc, inf) in enumerate(ARMS):
        for metric in METRICS:
            for s in range(4):
                for p in range(3):
                    for k in range(2):
                        shift = 0.03 if desc == "sid" else 0.0
                        rows.append(
                            {"subject": f"subj{s}", "method": method, "descriptions": desc}
                            | {"inference": inf, "prompt_id": p, "seed": k, "metric": metric}
                            | {"value": 0.4 + shift + 0.01 * a + rng.normal(0, 0.02)}
                        )
    return pd.DataFrame(rows)


def assert_figures(paths: list[Path]) -> None:
    assert [p.suffix for p in paths] == [".svg", ".png"]
    svg, png = paths
    assert svg.stat().st_size > 1000 and svg.read_text().lstrip().startswith("<?xml")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_plot(metrics_df: pd.DataFrame, tmp_path: Path) -> None:
    summary = arm_summary(metrics_df, n_boot=20)
    paths = plot_pareto(summary, tmp_path / "pareto")
    assert_figures(paths)
    first = paths[0].read_bytes()
    plot_pareto(summary, tmp_path / "pareto")
    assert paths[0].read_bytes() == first  # no date, fixed ids: reproducible SVG
    # A metric name that is no identifier (CLIP-I) works as an axis.
    assert_figures(plot_pareto(summary, tmp_path / "clip_i", pairs=[("CLIP-I", "TA")]))


def test_subject_small_multiples(metrics_df: pd.DataFrame, tmp_path: Path) -> None:
    per_subject = subject_summary(metrics_df)
    assert_figures(plot_subjects(per_subject, tmp_path / "subjects", ncols=3))
    assert_figures(plot_subjects(per_subject, tmp_path / "subjects_sa", x="SA", y="CLIP-I"))
    with pytest.raises(SidpipeError, match="subject"):
        plot_subjects(per_subject.drop(columns="subject"), tmp_path / "bad")


def test_improvements_bar_chart(metrics_df: pd.DataFrame, tmp_path: Path) -> None:
    subjects = pd.DataFrame({"subject": ["subj0", "subj1"], "bias": ["clothing", "background"]})
    imp = paired_improvement(metrics_df, subjects_df=subjects, n_boot=20)
    assert_figures(plot_improvements(imp, tmp_path / "improvements"))
    assert_figures(plot_improvements(imp, tmp_path / "clothing", bias="clothing", metrics=["SA"]))


def drawn_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures the plot functions save from now on (then nothing is written)."""
    figures: list[Figure] = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figures.append(fig) or [])
    return figures


def test_bars_are_the_differences_and_arrows_go_from_baseline_to_sid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = drawn_figures(monkeypatch)
    imp = pd.DataFrame({"method": ["a", "b"], "metric": "SA", "bias": "all", "diff": [0.1, -0.2]})
    imp = imp.assign(ci_low=imp["diff"] - 0.05, ci_high=imp["diff"] + 0.05)
    imp = imp.assign(subjects_improved=[2, 0], n_subjects=2, higher_is_better=True)
    plot_improvements(imp, tmp_path / "bars")
    bars = figures[0].axes[0].patches
    assert [bar.get_height() for bar in bars] == pytest.approx([0.1, -0.2])

    means = {("a", "case1"): (0.3, 0.6), ("a", "sid"): (0.5, 0.7)}
    means |= {("b", "case1"): (0.6, 0.4), ("b", "sid"): (0.4, 0.5)}  # SID costs b some SA
    summary = pd.DataFrame(
        [
            {"arm": f"{m}/{d}/standard", "method": m, "descriptions": d, "inference": "standard"}
            | {"metric": metric, "mean": v, "ci_low": v - 0.01, "ci_high": v + 0.01}
            for (m, d), xy in means.items()
            for metric, v in zip(("SA", "TA"), xy, strict=True)
        ]
    )
    plot_pareto(summary, tmp_path / "pareto", pairs=[("SA", "TA")])
    arrows = [t for t in figures[1].axes[0].texts if isinstance(t, Annotation)]
    assert sorted((tuple(a.xyann), tuple(a.xy)) for a in arrows) == [
        (means["a", "case1"], means["a", "sid"]),
        (means["b", "case1"], means["b", "sid"]),
    ]


def test_empty_inputs_still_write_placeholders(tmp_path: Path) -> None:
    empty = pd.DataFrame(columns=["subject", "method", "descriptions", "inference", "prompt_id"])
    empty = empty.assign(seed=[], metric=[], value=[])
    for paths in (
        plot_pareto(arm_summary(empty), tmp_path / "p"),
        plot_improvements(paired_improvement(empty), tmp_path / "i"),
        plot_subjects(subject_summary(empty), tmp_path / "s"),
    ):
        assert all(p.stat().st_size > 0 for p in paths)


def test_an_untrained_arm_is_a_reference_point_off_the_front(tmp_path: Path) -> None:
    """The base model (or an encoder) is drawn with its own marker and never on the Pareto
    front, even where it dominates every trained arm."""
    from sidpipe.plots import front_points

    pts = pd.DataFrame(
        {
            "method": ["base_model", "dreambooth", "dreambooth", "svdiff"],
            "descriptions": ["case1", "case1", "sid", "case1"],
            "mean_x": [0.9, 0.3, 0.5, 0.6],
            "mean_y": [0.9, 0.6, 0.5, 0.2],
        }
    )
    assert front_points(pts, "mean_x", "mean_y")["method"].tolist() == ["base_model"]
    front = front_points(pts, "mean_x", "mean_y", untrained=["base_model"])
    assert list(zip(front["method"], front["descriptions"], strict=True)) == [
        ("dreambooth", "case1"),
        ("dreambooth", "sid"),
        ("svdiff", "case1"),
    ]
    rows = [
        {"subject": "s", "method": m, "descriptions": d, "inference": "standard"}
        | {"prompt_id": 0, "seed": 0, "metric": metric, "value": v}
        for m, d, v in (("base_model", "case1", 0.9), ("dreambooth", "case1", 0.4))
        for metric in ("SA", "NSD", "TA")
    ]
    summary = arm_summary(pd.DataFrame(rows), n_boot=5)
    plain = plot_pareto(summary, tmp_path / "plain")[0].read_text()
    marked = plot_pareto(summary, tmp_path / "marked", untrained=["base_model"])[0].read_text()
    assert "untrained (reference)" in marked and "untrained (reference)" not in plain


def test_a_bar_is_coloured_by_which_side_of_0_its_interval_lies_on() -> None:
    """Green / red only when the interval excludes 0 on the better / worse side; for a
    lower-is-better measure (a leak) the better side is below 0."""
    rows = pd.DataFrame(
        [
            (True, 0.01, 0.2),  # higher is better, above 0: green
            (True, -0.2, -0.01),  # below 0: red
            (True, -0.1, 0.1),  # holds 0: grey
            (False, -0.3, -0.1),  # a leak that fell: green
            (False, 0.1, 0.3),  # a leak that rose: red
            (False, -0.107, 0.0),  # a leak's interval touching 0: grey
            (False, 0.0, 0.089),  # the same on the other side: grey
            (False, -0.2, 0.05),  # holds 0: grey
        ],
        columns=["higher_is_better", "ci_low", "ci_high"],
    )
    assert interval_colours(rows) == ["tab:green", "tab:red", "0.6", "tab:green"] + [
        "tab:red",
        "0.6",
        "0.6",
        "0.6",
    ]


def test_difference_panels_wrap_and_say_what_they_show(tmp_path: Path) -> None:
    """A dozen metrics wrap into rows of at most five panels; the titles and the k/n note carry
    `difference` and `counted`."""
    rows = pd.DataFrame(
        {"method": "sid \u2212 case2", "metric": [f"m{i}" for i in range(12)], "bias": "all"}
    ).assign(diff=0.1, ci_low=0.05, ci_high=0.2, subjects_improved=2, n_subjects=3)
    rows["higher_is_better"] = True
    heights = {}
    for n in (5, 12):
        svg, _ = plot_improvements(
            rows[rows["metric"].isin([f"m{i}" for i in range(n)])],
            tmp_path / f"d{n}",
            difference="A \u2212 B",
            counted="subjects favouring A",
        )
        text = svg.read_text()
        heights[n] = float(re.search(r'height="([\d.]+)pt"', text).group(1))
        assert "<!-- \u0394m0 (A \u2212 B) \u2191 -->" in text
        assert "k/n = subjects favouring A" in text and "<!-- sid \u2212 case2 -->" in text
    assert 2.6 < heights[12] / heights[5] < 3.4  # three rows against one
