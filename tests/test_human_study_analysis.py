"""The human study's analysis (paper Table B.2): agreement statistics against textbook values,
the table, the bootstrap and the metrics' direction on synthetic responses with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_human_study import (
    ARMS,
    QUESTIONS,
    SUBJECTS,
    _record,
    analysis_outputs,
    build_fixture_study,
    plan_of,
    write_subject_metrics,
)

from sidpipe.human_study.agreement import fleiss_kappa, krippendorff_alpha_nominal
from sidpipe.human_study.analysis import (
    agreement_table,
    analyze_study,
    judgements,
    metric_agreement,
    share_intervals,
    table_b2,
)
from sidpipe.human_study.design import DEFAULT_QUESTIONS
from sidpipe.human_study.responses import ResponseLog
from sidpipe.io import SidpipeError

# --- agreement statistics ------------------------------------------------------------------

# Wikipedia's worked example of Fleiss' kappa: 10 subjects, 14 raters, 5 categories.
FLEISS_EXAMPLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]
# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", the nominal example: 4
# observers, 12 units, values 1-5, missing values as None (alpha = 0.743).
KRIPPENDORFF_EXAMPLE = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


def test_fleiss_kappa_matches_the_textbook_and_hand_values():
    assert fleiss_kappa(FLEISS_EXAMPLE) == pytest.approx(0.20993, abs=5e-5)  # 0.210
    assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
    # two units, two raters: P = (1 + 0) / 2, Pe = (3/4)^2 + (1/4)^2 -> (0.5 - 0.625) / 0.375
    assert fleiss_kappa([[2, 0], [1, 1]]) == pytest.approx(-1 / 3)
    assert np.isnan(fleiss_kappa([[2, 0], [3, 0]]))  # one category throughout
    assert fleiss_kappa([[2, 0], [1, 1], [1, 0]]) == fleiss_kappa([[2, 0], [1, 1]])


def test_krippendorff_alpha_matches_krippendorffs_example_and_hand_values():
    counts = np.zeros((12, 5))
    for observer in KRIPPENDORFF_EXAMPLE:
        for unit, value in enumerate(observer):
            if value is not None:
                counts[unit, value - 1] += 1
    assert krippendorff_alpha_nominal(counts) == pytest.approx(0.743, abs=5e-4)
    # o_aa = 2, o_ab = o_ba = 1, n_a = 3, n_b = 1: 1 - 3 * 2 / (2 * 3 * 1) = 0
    assert krippendorff_alpha_nominal([[2, 0], [1, 1]]) == pytest.approx(0.0)
    assert krippendorff_alpha_nominal([[3, 0], [0, 2]]) == pytest.approx(1.0)
    assert np.isnan(krippendorff_alpha_nominal([[2, 0], [3, 0]]))
    # complete data, n raters per unit and N units: alpha = kappa + (1 - kappa) / (n N)
    kappa, total = fleiss_kappa(FLEISS_EXAMPLE), 14 * 10
    assert krippendorff_alpha_nominal(FLEISS_EXAMPLE) == pytest.approx(kappa + (1 - kappa) / total)


# --- the analysis --------------------------------------------------------------------------


def synthetic_responses(study: Path, answer) -> list[dict]:
    """Every screen of the plan answered by `answer(row) -> "A" | "B" | "undecided"`."""
    records = []
    for row in plan_of(study):
        wanted = answer(row)
        arm = {"A": ARMS[0], "B": ARMS[1]}.get(wanted)
        choice = "undecided" if arm is None else "left" if row["left_arm"] == arm else "right"
        records.append(_record(row, choice))
    log = ResponseLog(study / "responses.jsonl")
    for record in records:
        assert log.append(record)
    return records


def test_table_b2_on_responses_with_a_known_answer(tmp_path):
    study = build_fixture_study(tmp_path, participants=36)  # each pair judged by 4

    def answer(row):  # everyone: B on disentanglement, A on subject alignment, undecided on TA
        return {"non_subject_disentanglement": "B", "subject_alignment": "A"}.get(
            row["question"], "undecided" if row["question"] == "text_alignment" else "left-ish"
        )

    records = synthetic_responses(study, answer)
    df = judgements(records, ARMS)
    table = table_b2(df, ARMS, QUESTIONS, n_boot=200, seed=0).set_index(["question", "preferred"])
    assert table.loc[("non_subject_disentanglement", ARMS[1]), "share"] == 1.0
    assert table.loc[("non_subject_disentanglement", ARMS[1]), ["ci_low", "ci_high"]].tolist() == [
        1.0,
        1.0,
    ]
    assert table.loc[("subject_alignment", ARMS[0]), "share"] == 1.0
    assert table.loc[("text_alignment", "undecided"), "share"] == 1.0
    # "left-ish" is no arm: undecided (the overall question)
    assert table.loc[("overall", "undecided"), "n"] == 36 * 2
    assert (table["n_participants"] == 36).all() and (table["n_judgements"] == 72).all()
    # the paper's column: the default arms and questions
    assert table.loc[("overall", ARMS[1]), "paper_share"] == pytest.approx(0.709)
    agreement = agreement_table(df, ARMS, QUESTIONS).set_index(["question", "statistic"])
    # unanimous within every unit, one category per question: nothing expected by chance
    assert np.isnan(agreement.loc[("non_subject_disentanglement", "fleiss_kappa"), "value"])
    # over all questions the categories differ across units and never within: perfect
    assert agreement.loc[("all", "fleiss_kappa"), "value"] == pytest.approx(1.0)
    assert agreement.loc[("all", "krippendorff_alpha"), "value"] == pytest.approx(1.0)
    assert agreement.loc[("all", "fleiss_kappa"), ["n_units", "mean_raters"]].tolist() == [72, 4]


def test_left_clickers_split_evenly_by_the_balanced_sides(tmp_path):
    study = build_fixture_study(tmp_path, participants=6)  # 4 viewers per subject: even
    records = []
    log = ResponseLog(study / "responses.jsonl")
    for row in plan_of(study):
        records.append(_record(row, "left"))
        log.append(records[-1])
    table = table_b2(judgements(records, ARMS), ARMS, QUESTIONS, n_boot=100, seed=0)
    shares = table.set_index(["question", "preferred"])["share"]
    for question in QUESTIONS:
        assert shares[question, ARMS[0]] == shares[question, ARMS[1]] == 0.5


def test_bootstrap_resamples_participants_reproducibly():
    counts = np.array([[3, 1, 0], [0, 4, 0], [1, 1, 2], [2, 2, 0]], float)
    share, low, high = share_intervals(counts, 2000, np.random.default_rng(0))
    assert share == pytest.approx(counts.sum(0) / counts.sum())
    assert (low <= share).all() and (share <= high).all() and (low < high).all()
    again = share_intervals(counts, 2000, np.random.default_rng(0))
    assert np.array_equal(again[1], low) and np.array_equal(again[2], high)
    # resampling participants: one participant holds every judgement -> no spread
    single = share_intervals(counts[:1], 100, np.random.default_rng(0))
    assert np.array_equal(single[1], single[2])


def test_share_interval_has_the_nominal_width():
    """400 participants with one judgement each, 30 % for A: a 95 % interval is about
    2 x 1.96 binomial standard errors wide."""
    counts = np.zeros((400, 2))
    counts[:120, 0] = counts[120:, 1] = 1
    share, low, high = share_intervals(counts, 4000, np.random.default_rng(0))
    assert share[0] == pytest.approx(0.3)
    assert high[0] - low[0] == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 400), rel=0.1)


def test_metric_agreement_compares_the_human_majority_with_the_metric_sign(tmp_path):
    study = build_fixture_study(tmp_path, participants=6)
    records = synthetic_responses(
        study, lambda row: "B" if row["question"] != "subject_alignment" else "A"
    )
    rows = []
    for subject in SUBJECTS:
        for metric, a, b in (("SA", 0.7, 0.6), ("NSD", 0.3, 0.4), ("TA", 0.30, 0.28)):
            rows += [
                {"arm": ARMS[0], "subject": subject, "metric": metric, "mean": a},
                {"arm": ARMS[1], "subject": subject, "metric": metric, "mean": b},
            ]
    metrics = pd.DataFrame(rows)
    question_metrics = {q["id"]: q["metric"] for q in DEFAULT_QUESTIONS if "metric" in q}
    table = metric_agreement(judgements(records, ARMS), metrics, ARMS, question_metrics)
    assert len(table) == len(SUBJECTS) * 3  # no metric for the overall question
    by_question = table.groupby("question")
    assert by_question["agree"].apply(list).to_dict() == {
        "subject_alignment": [True] * 3,  # humans A, SA favours A
        "non_subject_disentanglement": [True] * 3,  # humans B, NSD favours B
        "text_alignment": [False] * 3,  # humans B, TA favours A
    }
    assert set(table.loc[table["question"] == "text_alignment", "metric_favours"]) == {ARMS[0]}
    assert table["diff"].tolist()[0] == pytest.approx(0.4 - 0.3)  # B - A, sorted by question


def test_analyze_study_writes_every_output(tmp_path):
    study = build_fixture_study(tmp_path, participants=6)
    synthetic_responses(study, lambda row: "B" if row["participant"] < "p004" else "undecided")
    metrics = write_subject_metrics(tmp_path / "subjects.csv")
    out = analysis_outputs(study, study / "plots/hs")
    tables = analyze_study(study / "responses.jsonl", study / "site", metrics, out, n_boot=50)
    for name in ("table", "agreement", "subjects", "metric_agreement"):
        assert pd.read_csv(out[name]).shape == tables[name].shape
    assert "paper: B: dreambooth/sid/standard" in (study / "t.md").read_text()
    assert "<table" in (study / "t.html").read_text()
    assert (study / "plots/hs.png").stat().st_size > 10_000
    assert (study / "plots/hs.svg").stat().st_size > 10_000
    table = tables["table"].set_index(["question", "preferred"])
    assert table.loc[("overall", ARMS[1]), "share"] == pytest.approx(0.5)  # 3 of 6 participants
    # the analysis refuses responses that are not this study's
    (study / "responses.jsonl").write_text(
        json.dumps(_record(plan_of(study)[0], "left", participant="intruder")) + "\n"
    )
    with pytest.raises(SidpipeError, match="not in the study's plan"):
        analyze_study(study / "responses.jsonl", study / "site", metrics, out, n_boot=50)
