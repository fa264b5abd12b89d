"""The human study (paper App. B): plan, site, responses log, server, command and workflow."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from sidpipe.human_study.build import build_study
from sidpipe.human_study.design import (
    DEFAULT_QUESTIONS,
    check_recorded_responses,
    make_plan,
    participant_ids,
    plan_settings,
    resolve_settings,
    study_plan,
)
from sidpipe.human_study.responses import ResponseLog, now_iso, read_responses
from sidpipe.io import SidpipeError

REPO = Path(__file__).resolve().parents[1]
ARMS = ["dreambooth/case1/standard", "dreambooth/sid/standard"]
SUBJECTS = ["blue_mug", "red_dog", "toy_car"]
QUESTIONS = [q["id"] for q in DEFAULT_QUESTIONS]
PROMPTS = ["a {} in the jungle", "a {} on the beach", "a {} in the snow"]


def make_results(root: Path, seeds: int = 2) -> Path:
    """Two arms' samples and three subjects' references in the workflow's layout."""
    rng = np.random.default_rng(0)
    for subject in SUBJECTS:
        folder = root / "results/references" / subject
        folder.mkdir(parents=True)
        rows = []
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                folder / f"0{i + 1}.png"
            )
            rows.append({"subject": subject, "image_id": f"0{i + 1}", "path": f"0{i + 1}.png"})
        _write(folder / "manifest.csv", rows)
        for a, arm in enumerate(ARMS):
            folder = root / "results/samples" / arm / subject
            folder.mkdir(parents=True)
            rows = []
            for p, template in enumerate(PROMPTS):
                for seed in range(seeds):
                    pixels = np.full((32, 32, 3), (200 * a, 40 * p, 100 * seed), dtype=np.uint8)
                    pixels[:8] = rng.integers(0, 255, 3, dtype=np.uint8)  # a stripe per image
                    name = f"{p:02d}_{seed:02d}.png"
                    Image.fromarray(pixels).save(folder / name)
                    noun = subject.split("_")[1]
                    rows.append(
                        {
                            "prompt_id": p,
                            "prompt": template.format("sks " + noun),
                            "prompt_plain": template.format(noun),
                            "seed": seed,
                            "path": name,
                            "negative_prompt": "",
                        }
                    )
            _write(folder / "manifest.csv", rows)
    return root


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def build_fixture_study(root: Path, participants: int | list[str] = 4, **overrides) -> Path:
    """A study of the fixture results under root/results/human_study/demo; returns its folder."""
    results = make_results(root) if not (root / "results/samples").exists() else root
    study = root / "results/human_study/demo"
    settings = {
        "name": "demo",
        "arms": ARMS,
        "subjects": SUBJECTS,
        "prompt_ids": [0, 1, 2],
        "seeds": [0, 1],
        "participants": participants,
        "subjects_per_participant": 2,
        "questions": DEFAULT_QUESTIONS,
        "seed": 0,
    } | overrides
    build_study(
        study / "site",
        **settings,
        sample_manifests={
            (arm, s): results / f"results/samples/{arm}/{s}/manifest.csv"
            for arm in ARMS
            for s in SUBJECTS
        },
        reference_manifests={s: results / f"results/references/{s}/manifest.csv" for s in SUBJECTS},
        design_csv=study / "design.csv",
        responses=study / "responses.jsonl",
    )
    return study


def plan_of(study: Path) -> list[dict]:
    return list(csv.DictReader(open(study / "site/plan.csv")))


# --- the plan ------------------------------------------------------------------------------


def write_subject_metrics(path: Path) -> Path:
    """A metrics summary (results/metrics/subjects.csv layout) where arm B beats arm A by 0.1
    on SA, NSD and TA for every subject."""
    pd.DataFrame(
        [
            {"arm": arm, "subject": s, "metric": m, "mean": 0.5 + 0.1 * i}
            for i, arm in enumerate(ARMS)
            for s in SUBJECTS
            for m in ("SA", "NSD", "TA")
        ]
    ).to_csv(path, index=False)
    return path


def analysis_outputs(folder: Path, plot: Path) -> dict[str, Path]:
    """The output paths analyze_study writes, under `folder`."""
    out = {
        name: folder / f"{name}.csv"
        for name in ("table", "agreement", "subjects", "metric_agreement")
    }
    return out | {"table_md": folder / "t.md", "table_html": folder / "t.html", "plot": plot}


def paper_plan(seed: int = 0, participants: int = 130) -> list[dict]:
    pools = {f"s{i:02d}": [(p, 0) for p in range(25)] for i in range(15)}
    ids = participant_ids(participants, "paper", 0)
    return make_plan(ids, pools, QUESTIONS, ARMS, 10, seed)


def test_participant_ids_are_stable_distinct_and_not_counted():
    ids = participant_ids(130, "paper", 0)
    assert ids == participant_ids(130, "paper", 0) and len(set(ids)) == 130
    assert ids[0].startswith("p001-") and ids[129].startswith("p130-")
    assert participant_ids(3, "paper", 1) != ids[:3]  # the seed changes the suffixes


def test_plan_is_balanced_as_the_paper_asks():
    plan = paper_plan()
    assert len(plan) == 130 * 10 * 4  # the paper's 5,200 judgements
    by_participant: dict[str, list[dict]] = {}
    for row in plan:
        by_participant.setdefault(row["participant"], []).append(row)
    for rows in by_participant.values():
        assert [r["position"] for r in rows] == list(range(40))
        subjects = [r["subject"] for r in rows[::4]]
        assert len(set(subjects)) == 10  # ten different subjects
        for i in range(0, 40, 4):  # the four questions of a subject: consecutive, one pair
            block = rows[i : i + 4]
            assert [r["question"] for r in block] == QUESTIONS
            assert len({(r["subject"], r["prompt_id"], r["seed"]) for r in block}) == 1
    views = Counter(r["subject"] for r in plan if r["question"] == QUESTIONS[0])
    assert max(views.values()) - min(views.values()) <= 1
    for subject in views:
        pairs = Counter(
            r["prompt_id"] for r in plan if r["subject"] == subject and r["question"] == "overall"
        )
        counts = [pairs.get(p, 0) for p in range(25)]
        assert max(counts) - min(counts) <= 1
        for question in QUESTIONS:
            left = Counter(
                r["left_arm"] for r in plan if r["subject"] == subject and r["question"] == question
            )
            assert abs(left[ARMS[0]] - left[ARMS[1]]) <= 1
            assert all({r["left_arm"], r["right_arm"]} == set(ARMS) for r in plan)
    # over the whole study each arm is on the left half the time
    left = Counter(r["left_arm"] for r in plan)
    assert abs(left[ARMS[0]] - left[ARMS[1]]) <= len(views) * len(QUESTIONS)


def test_plan_is_reproducible_seeded_and_keeps_earlier_participants():
    assert paper_plan(0) == paper_plan(0)
    assert paper_plan(0) != paper_plan(1)
    more, fewer = paper_plan(0, 130), paper_plan(0, 60)
    first = set(participant_ids(60, "paper", 0))
    # adding participants leaves the earlier ones' screens (and recorded judgements) valid
    assert [r for r in more if r["participant"] in first] == fewer


@pytest.mark.parametrize(
    "change, message",
    [
        ({"k": 4}, "subjects_per_participant is 4"),
        ({"arms": [ARMS[0], ARMS[0]]}, "two different arms"),
        ({"participants": ["a", "a"]}, "distinct"),
        ({"questions": ["q", "q"]}, "distinct"),
    ],
)
def test_plan_rejects_impossible_settings(change, message):
    args = {"participants": ["a", "b"], "questions": QUESTIONS, "arms": ARMS, "k": 2}
    args |= change
    with pytest.raises(SidpipeError, match=message):
        make_plan(
            args["participants"],
            {s: [(0, 0)] for s in SUBJECTS},
            args["questions"],
            args["arms"],
            args["k"],
            0,
        )


# The grid the workflow hands resolve_settings: both arms on every subject but toy_car, which
# only the SID arm ran; 14 prompts and 4 seeds sampled.
RAN = {ARMS[0]: {"blue_mug", "red_dog"}, ARMS[1]: {"blue_mug", "red_dog", "toy_car"}}
RAN |= {"svdiff/sid/standard": {"toy_car"}}


def _resolve(section: dict | None, where: str = "cfg.yaml: human_study") -> dict:
    return resolve_settings(section, RAN, SUBJECTS, 14, 4, where)


def test_settings_take_the_paper_defaults_and_the_subjects_both_arms_ran():
    settings = _resolve({"participants": 8, "subjects_per_participant": 2})
    assert settings["arms"] == ARMS and settings["seeds"] == [0]
    assert settings["subjects"] == ["blue_mug", "red_dog"]  # grid order; toy_car lacks an arm
    assert settings["prompt_ids"] == list(range(14))
    assert settings["responses"] == "results/human_study/dreambooth_sid/responses.jsonl"
    assert settings["questions"] == DEFAULT_QUESTIONS and settings["participants"] == 8
    chosen = _resolve(
        {"subjects": ["red_dog"], "prompt_ids": [3, 1], "subjects_per_participant": 1}
    )
    assert chosen["subjects"] == ["red_dog"] and chosen["prompt_ids"] == [1, 3]
    ids, plan = study_plan(**plan_settings(chosen))
    assert {r["subject"] for r in plan} == {"red_dog"} and len(ids) == 130


@pytest.mark.parametrize(
    "section, message",
    [
        ({"arms": ["svdiff/case2/standard", ARMS[1]]}, r"human_study\.arms: no experiment runs"),
        ({"subjects": ["toy_car"]}, r"human_study\.subjects: toy_car not run by both arms"),
        ({"arms": [ARMS[0], "svdiff/sid/standard"]}, r"human_study\.subjects: none not run"),
        ({"prompt_ids": [14]}, r"human_study\.prompt_ids: the arms sample prompt ids 0-13"),
        ({"prompt_ids": [-1]}, r"human_study\.prompt_ids"),
        ({"seeds": [4]}, r"human_study\.seeds: the arms sample seeds 0-3"),
        ({"subjects_per_participant": 3}, r"subjects_per_participant: 3 but the study has 2"),
    ],
)
def test_settings_that_do_not_fit_the_grid_name_the_key_and_the_fix(section, message):
    with pytest.raises(SidpipeError, match=message) as err:
        _resolve(section)
    assert str(err.value).startswith("cfg.yaml: human_study.")


def test_recorded_responses_must_fit_the_plan_of_the_settings(tmp_path):
    responses = tmp_path / "responses.jsonl"
    section = {"participants": 4, "subjects_per_participant": 2, "responses": str(responses)}
    settings = _resolve(section)
    assert check_recorded_responses(settings) is None  # nothing recorded yet
    _, plan = study_plan(**plan_settings(settings))
    ResponseLog(responses).append(_record(plan[0], "right"))
    assert check_recorded_responses(settings) is None  # fits
    assert check_recorded_responses(_resolve(section | {"participants": 6})) is None
    with pytest.raises(SidpipeError, match="cfg: .*another build of the study"):
        check_recorded_responses(_resolve(section | {"seed": 3}), "cfg")
    responses.write_text("not json\n{}\n")
    warning = check_recorded_responses(settings, "cfg")
    assert warning is not None and warning.startswith("cfg: ") and "line 1" in warning


# --- the site ------------------------------------------------------------------------------


def test_build_writes_a_complete_site_that_hides_the_arms(tmp_path):
    study = build_fixture_study(tmp_path)
    site = study / "site"
    info = json.loads((site / "study.json").read_text())
    assert info["arms"] == ARMS and info["screens_per_participant"] == 8
    assert [q["id"] for q in info["questions"]] == QUESTIONS
    manifest = list(csv.DictReader(open(site / "manifest.csv")))
    generated = [r for r in manifest if r["kind"] == "generated"]
    assert len(generated) == len(SUBJECTS) * 3 * 2 * 2  # subjects x prompts x seeds x arms
    assert len([r for r in manifest if r["kind"] == "reference"]) == len(SUBJECTS) * 3
    for row in manifest:
        path = site / row["path"]
        assert path.is_file()
        if row["kind"] == "generated":  # content-addressed: the name does not tell the arm
            assert row["path"] == f"images/{row['sha256'][:16]}.png"
            source = tmp_path / "results/samples" / row["arm"] / row["subject"]
            original = f"{int(row['prompt_id']):02d}_{int(row['seed']):02d}.png"
            assert path.read_bytes() == (source / original).read_bytes()
            assert "sks" not in row["prompt"] and row["subject"].split("_")[1] in row["prompt"]
    plan = plan_of(study)
    assert len(plan) == 4 * 8
    participants = list(csv.DictReader(open(site / "participants.csv")))
    assert [p["participant"] for p in participants] == info["participants"]
    assert all(p["link"] == f"p/{p['participant']}" for p in participants)
    design = list(csv.DictReader(open(study / "design.csv")))
    assert sum(int(r["screens"]) for r in design) == len(plan)
    assert not (study / "responses.jsonl").exists()  # only participants write it


def test_build_is_byte_reproducible(tmp_path):
    def tree(study: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(study)): p.read_bytes()
            for p in sorted(study.rglob("*"))
            if p.is_file()
        }

    first = tree(build_fixture_study(tmp_path / "a"))
    assert first == tree(build_fixture_study(tmp_path / "b"))


def test_build_names_missing_pairs_and_mismatched_prompts(tmp_path):
    make_results(tmp_path)
    with pytest.raises(SidpipeError, match=r"no image for \(prompt_id, seed\) \[\(0, 5\)"):
        build_fixture_study(tmp_path, seeds=[5])
    manifest = tmp_path / f"results/samples/{ARMS[1]}/toy_car/manifest.csv"
    manifest.write_text(manifest.read_text().replace("a car in the jungle", "a car in a city"))
    with pytest.raises(SidpipeError, match="prompts differ"):
        build_fixture_study(tmp_path)
    assert not (tmp_path / "results/human_study/demo/site").exists()  # nothing half-written


def test_rebuild_keeps_recorded_responses_valid_or_refuses(tmp_path):
    study = build_fixture_study(tmp_path)
    row = plan_of(study)[0]
    log = ResponseLog(study / "responses.jsonl")
    assert log.append(_record(row, "left"))
    before = (study / "site/plan.csv").read_bytes()
    build_fixture_study(tmp_path, participants=6)  # more participants: the old plan holds
    assert (study / "site/plan.csv").read_bytes() != before
    with pytest.raises(SidpipeError, match="another build of the study"):
        build_fixture_study(tmp_path, participants=6, seed=7)
    assert len(read_responses(study / "responses.jsonl")) == 1  # never touched
    assert (study / "site/study.json").is_file()  # the previous site is still whole


# --- the responses log ---------------------------------------------------------------------


def _record(row: dict, choice: str, **extra) -> dict:
    record = {
        "participant": row["participant"],
        "subject": row["subject"],
        "prompt_id": int(row["prompt_id"]),
        "seed": int(row["seed"]),
        "question": row["question"],
        "left_arm": row["left_arm"],
        "right_arm": row["right_arm"],
        "choice": choice,
        "shown_at": now_iso(),
        "answered_at": now_iso(),
    }
    return record | extra


def test_log_appends_durably_once(tmp_path, monkeypatch):
    path = tmp_path / "r" / "responses.jsonl"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    log = ResponseLog(path)
    row = {"participant": "p1", "subject": "s", "prompt_id": 0, "seed": 0, "question": "q"}
    row |= {"left_arm": ARMS[0], "right_arm": ARMS[1]}
    assert log.append(_record(row, "left"))
    assert len(synced) == 2  # the line, then the new file's directory entry
    size = path.stat().st_size
    assert not log.append(_record(row, "right"))  # the same judgement again: nothing written
    assert path.stat().st_size == size
    other = ResponseLog(path)  # another process on the same file sees it
    assert not other.append(_record(row, "undecided"))
    assert other.append(_record(row | {"question": "q2"}, "right"))
    assert log.append(_record(row | {"question": "q3"}, "left"))  # it reads the other's line
    records = read_responses(path)
    assert [r["question"] for r in records] == ["q", "q2", "q3"]
    assert path.read_text().count("\n") == 3
    assert all(list(json.loads(line)) == list(records[0]) for line in path.read_text().splitlines())


def test_log_records_a_judgement_once_under_concurrent_appends(tmp_path):
    log = ResponseLog(tmp_path / "responses.jsonl")
    row = {"participant": "p1", "subject": "s", "prompt_id": 0, "seed": 0, "question": "q"}
    row |= {"left_arm": ARMS[0], "right_arm": ARMS[1]}
    results, barrier = [], threading.Barrier(8)

    def post(choice):
        barrier.wait()
        results.append(log.append(_record(row, choice)))

    threads = [threading.Thread(target=post, args=(["left", "right"][i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    assert len(read_responses(tmp_path / "responses.jsonl")) == 1


def test_log_cuts_off_an_unfinished_line_and_reads_name_bad_lines(tmp_path):
    path = tmp_path / "responses.jsonl"
    row = {"participant": "p1", "subject": "s", "prompt_id": 0, "seed": 0, "question": "q"}
    row |= {"left_arm": ARMS[0], "right_arm": ARMS[1]}
    ResponseLog(path).append(_record(row, "left"))
    with open(path, "ab") as handle:
        handle.write(b'{"participant": "p1", "subj')  # a crash mid-write
    assert len(read_responses(path)) == 1
    log = ResponseLog(path)
    assert log.append(_record(row | {"question": "q2"}, "right"))
    assert [r["question"] for r in read_responses(path)] == ["q", "q2"]
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(SidpipeError, match=r"line 3: not JSON"):
        read_responses(path)
    bad = _record(row, "maybe")
    with pytest.raises(SidpipeError, match="choice must be one of"):
        log.append(bad)


# --- the server ----------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path):
    from sidpipe.human_study.server import create_app

    study = build_fixture_study(tmp_path)
    app = create_app(study)
    return study, app.test_client()


def _answer_body(row: dict, choice: str = "left", shown_at: str | None = None) -> dict:
    return {
        "subject": row["subject"],
        "prompt_id": int(row["prompt_id"]),
        "seed": int(row["seed"]),
        "question": row["question"],
        "choice": choice,
        "shown_at": shown_at or now_iso(),
    }


def test_server_records_answers_and_continues_after_a_restart(served):
    from sidpipe.human_study.server import create_app

    study, client = served
    plan = [r for r in plan_of(study) if r["participant"] == plan_of(study)[0]["participant"]]
    pid = plan[0]["participant"]
    page = client.get(f"/p/{pid}")
    assert page.status_code == 200 and b"study.js" in page.data
    assert page.headers["Referrer-Policy"] == "no-referrer"
    for i, row in enumerate(plan[:3]):
        item = client.get(f"/api/p/{pid}/next").get_json()
        assert item["answered"] == i and item["total"] == len(plan) and not item["done"]
        shown = item["item"]
        assert (shown["subject"], shown["question"], shown["position"]) == (
            row["subject"],
            row["question"],
            i,
        )
        assert client.get(shown["left"]).status_code == 200
        assert len(shown["references"]) == 3
        response = client.post(
            f"/api/p/{pid}/answer", json=_answer_body(row, "right", shown["shown_at"])
        )
        assert response.status_code == 200, response.get_json()
        assert response.get_json() == {"ok": True, "answered": i + 1, "total": len(plan)}
    records = read_responses(study / "responses.jsonl")
    assert [r["choice"] for r in records] == ["right"] * 3
    assert records[0]["left_arm"] == plan[0]["left_arm"]  # the sides come from the plan
    assert list(records[0]) == [
        "participant",
        "subject",
        "prompt_id",
        "seed",
        "question",
        "left_arm",
        "right_arm",
        "choice",
        "shown_at",
        "answered_at",
    ]
    # a new server on the same files continues at the fourth screen
    client = create_app(study).test_client()
    assert client.get(f"/api/p/{pid}/next").get_json()["item"]["position"] == 3
    for row in plan[3:]:
        assert client.post(f"/api/p/{pid}/answer", json=_answer_body(row)).status_code == 200
    assert client.get(f"/api/p/{pid}/next").get_json() == {
        "participant": pid,
        "total": len(plan),
        "answered": len(plan),
        "done": True,
    }


def test_server_rejects_bad_requests_and_duplicates_without_writing(served):
    study, client = served
    row = plan_of(study)[0]
    pid = row["participant"]
    responses = study / "responses.jsonl"
    assert client.post(f"/api/p/{pid}/answer", json=_answer_body(row)).status_code == 200
    before = responses.read_bytes()
    other = next(r for r in plan_of(study) if r["participant"] != pid)
    bad = [
        ("/api/p/nobody/answer", _answer_body(row), 404),
        (f"/api/p/{pid}/answer", _answer_body(row, "right"), 409),  # answered already
        (f"/api/p/{pid}/answer", _answer_body(other), 404),  # another participant's screen
        (f"/api/p/{pid}/answer", _answer_body(row | {"question": "beauty"}), 404),
        (f"/api/p/{pid}/answer", _answer_body(row | {"prompt_id": 99}), 404),
        (f"/api/p/{pid}/answer", _answer_body(row, "both"), 400),
        (f"/api/p/{pid}/answer", _answer_body(row) | {"left_arm": ARMS[1]}, 400),
        (f"/api/p/{pid}/answer", {"subject": row["subject"]}, 400),
        (f"/api/p/{pid}/answer", _answer_body(row) | {"prompt_id": "0"}, 400),
        (f"/api/p/{pid}/answer", _answer_body(row) | {"seed": True}, 400),
        (f"/api/p/{pid}/answer", _answer_body(row, shown_at="yesterday"), 400),
        (f"/api/p/{pid}/answer", _answer_body(row, shown_at="2999-01-01T00:00:00+00:00"), 400),
        (f"/api/p/{pid}/answer", [1, 2], 400),
    ]
    for url, body, status in bad:
        response = client.post(url, json=body)
        assert response.status_code == status, (body, response.get_json())
        assert "error" in response.get_json()
    raw = [
        (b"{not json", "application/json", 400),
        (json.dumps(_answer_body(row)).encode(), "text/plain", 415),
        (b'{"subject": "' + b"x" * 5000 + b'"}', "application/json", 413),
    ]
    for data, content_type, status in raw:
        response = client.post(f"/api/p/{pid}/answer", data=data, content_type=content_type)
        assert response.status_code == status
    assert client.get(f"/api/p/{pid}/answer").status_code == 405
    assert client.get("/api/p/nobody/next").status_code == 404
    assert client.get("/p/nobody").status_code == 404
    for path in ("/files/study.json", "/files/plan.csv", "/files/../site/plan.csv", "/files/x"):
        assert client.get(path).status_code == 404
    assert responses.read_bytes() == before  # nothing changed
    assert b"p001" not in client.get("/").data  # the index lists no participant


def test_server_refuses_responses_of_another_build(tmp_path):
    from sidpipe.human_study.server import create_app

    study = build_fixture_study(tmp_path)
    row = plan_of(study)[0]
    ResponseLog(study / "responses.jsonl").append(_record(row, "left"))
    swapped = tmp_path / "swapped.jsonl"
    ResponseLog(swapped).append(
        _record(row, "left", left_arm=row["right_arm"], right_arm=row["left_arm"])
    )
    with pytest.raises(SidpipeError, match="plan says otherwise"):
        create_app(study, responses=swapped)
    with pytest.raises(SidpipeError, match="not a built study"):
        create_app(tmp_path / "nowhere")
    assert create_app(study / "site").extensions["sidpipe_responses"].path == (
        study / "responses.jsonl"
    )


# --- the command, imports and the workflow -------------------------------------------------


def test_console_script_and_cli_errors(tmp_path, capsys):
    from sidpipe.cli import main

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sidpipe"] == "sidpipe.cli:main"
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "serve", "--help"])
    assert exit_info.value.code == 0
    assert "--responses" in capsys.readouterr().out
    assert main(["study", "serve", str(tmp_path)]) == 1
    assert "not a built study" in capsys.readouterr().err


def test_the_server_and_the_command_import_no_torch():
    modules = "sidpipe.cli, sidpipe.human_study.server, sidpipe.human_study.build"
    modules += ", sidpipe.human_study.analysis"
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] in "
    code += "('torch', 'transformers', 'diffusers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _dry_run(workdir: Path) -> str:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--directory", str(workdir), "--configfile", str(workdir / "config.yaml")]
    cmd += ["--dry-run", "--quiet", "rules"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    return output if result.returncode == 0 else "FAILED\n" + output


def test_workflow_builds_the_study_and_analyses_it_once_responses_exist(tmp_path):
    workdir = tmp_path / "demo"
    shutil.copytree(REPO / "demo", workdir, ignore=shutil.ignore_patterns("results", ".snakemake"))
    out = _dry_run(workdir)
    assert "human_study " in out and "analyze_human_study" not in out, out
    responses = workdir / "results/human_study/dreambooth_sid/responses.jsonl"
    responses.parent.mkdir(parents=True)
    responses.write_text("")
    assert "analyze_human_study " in _dry_run(workdir)
    # judgements recorded on another build stop the workflow before it replaces the site
    row = {"participant": "p001-zzzzzz", "subject": "blue_mug", "prompt_id": 1, "seed": 0}
    row |= {"question": "overall", "left_arm": ARMS[0], "right_arm": ARMS[1]}
    responses.write_text(json.dumps(_record(row, "left")) + "\n")
    assert "recorded for another build of the study" in _dry_run(workdir)
    responses.write_text("")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["human_study"]["arms"] = ["svdiff/case2/standard", "dreambooth/sid/standard"]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert "human_study.arms: no experiment runs arm 'svdiff/case2/standard'" in _dry_run(workdir)
    config["human_study"]["arms"] = ["dreambooth/case1/standard", "dreambooth/sid/standard"]
    config["human_study"]["seeds"] = [9]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert "human_study.seeds: the arms sample seeds 0-3" in _dry_run(workdir)
