"""Build a study's site from two arms' samples and the subjects' references.

The site (`results/human_study/<study>/site/`, written whole or not at all):
- `study.json`: name, arms (A then B), questions, subjects, participants and settings;
- `plan.csv`: one row per participant and screen (`design.PLAN_COLUMNS`), in showing order;
- `participants.csv`: each participant's id, number of screens and link (relative to the server);
- `manifest.csv`: one row per file: references (subject, image_id) and generated images
  (subject, arm, prompt_id, seed, the prompt shown);
- `references/<subject>/<image_id>.<ext>` and `images/<sha256[:16]>.<ext>`: copies of the
  images, the generated ones named by their content so their names do not tell the arm.

The participants' responses are not part of the site: they go next to it
(`results/human_study/<study>/responses.jsonl`), so rebuilding the site never deletes them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from sidpipe.human_study.design import PLAN_COLUMNS, design_table, study_plan
from sidpipe.human_study.responses import check_against_plan, read_responses
from sidpipe.io import SidpipeError, atomic_dir, log, read_manifest, sha256_file, write_csv

MANIFEST_COLUMNS = [
    "kind",
    "subject",
    "image_id",
    "arm",
    "prompt_id",
    "seed",
    "prompt",
    "path",
    "sha256",
]
STUDY_FORMAT = 1


def _samples(manifest: Path, arm: str, subject: str, wanted: set[tuple[int, int]]) -> dict:
    """(prompt_id, seed) -> (prompt shown, image file) of one arm and subject."""
    rows = read_manifest(
        manifest.parent, f"samples of {arm} for {subject}", "sample", ["prompt_id", "seed", "path"]
    )
    found = {}
    for row in rows:
        key = (int(row["prompt_id"]), int(row["seed"]))
        if key in wanted:
            prompt = row.get("prompt_plain") or row.get("prompt", "")
            found[key] = (prompt, manifest.parent / row["path"])
    missing = sorted(wanted - set(found))
    if missing:
        raise SidpipeError(
            f"{manifest} has no image for (prompt_id, seed) {missing[:5]}: the study asks for "
            "prompts or seeds the arm did not sample (human_study.prompt_ids / seeds must be "
            "within sampling.prompts_per_subject / sampling.seeds)"
        )
    return found


def _copy(source: Path, dest: Path) -> str:
    if not source.is_file():
        raise SidpipeError(
            f"{source} is listed in its manifest but does not exist; rerun its stage"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    return sha256_file(dest)


def build_study(
    site: str | Path,
    *,
    name: str,
    arms: Sequence[str],
    subjects: Sequence[str],
    sample_manifests: Mapping[tuple[str, str], str | Path],
    reference_manifests: Mapping[str, str | Path],
    prompt_ids: Sequence[int],
    seeds: Sequence[int],
    participants: int | Sequence[str],
    subjects_per_participant: int,
    questions: Sequence[Mapping[str, str]],
    seed: int,
    design_csv: str | Path | None = None,
    responses: str | Path | None = None,
) -> dict:
    """Write the site (see the module docstring); return its study.json content.

    `sample_manifests`: (arm, subject) -> the arm's samples manifest; `participants`: a count
    (ids generated, `design.participant_ids`) or the ids themselves. When `responses` exists,
    every judgement in it must fit the new plan, else nothing is written.
    """
    arms = list(arms)
    if len(arms) != 2 or arms[0] == arms[1]:
        raise SidpipeError(f"human_study.arms must be two different arms, got {arms}")
    questions = [dict(q) for q in questions]
    ids, plan = study_plan(
        name,
        arms,
        subjects,
        prompt_ids,
        seeds,
        participants,
        subjects_per_participant,
        questions,
        seed,
    )
    wanted = {(int(p), int(s)) for p in prompt_ids for s in seeds}

    images: dict[tuple[str, str, int, int], tuple[str, Path]] = {}
    for subject in subjects:
        per_arm = {
            arm: _samples(Path(sample_manifests[arm, subject]), arm, subject, wanted)
            for arm in arms
        }
        for key in sorted(wanted):
            prompts = {arm: per_arm[arm][key][0] for arm in arms}
            if len(set(prompts.values())) != 1:
                raise SidpipeError(
                    f"{subject} (prompt_id, seed) {key}: the arms' prompts differ {prompts}; a "
                    "pair must show one prompt"
                )
            for arm in arms:
                images[subject, arm, *key] = per_arm[arm][key]

    if responses is not None and Path(responses).exists():
        check_against_plan(read_responses(responses), plan, str(responses))
        log.info("%s: every recorded judgement fits the new plan", responses)

    site = Path(site)
    with atomic_dir(site) as tmp:
        rows = []
        for subject in subjects:
            refs = read_manifest(
                Path(reference_manifests[subject]).parent,
                f"references of {subject}",
                "prepare_references",
                ["image_id", "path"],
            )
            for ref in refs:
                source = Path(reference_manifests[subject]).parent / ref["path"]
                rel = Path("references") / subject / f"{ref['image_id']}{source.suffix.lower()}"
                digest = _copy(source, tmp / rel)
                rows.append(
                    {"kind": "reference", "subject": subject, "image_id": ref["image_id"]}
                    | {"path": rel.as_posix(), "sha256": digest}
                )
        for (subject, arm, prompt_id, image_seed), (prompt, source) in sorted(images.items()):
            if not source.is_file():
                raise SidpipeError(f"{source} is listed in its manifest but does not exist")
            digest = sha256_file(source)
            rel = Path("images") / f"{digest[:16]}{source.suffix.lower()}"
            if not (tmp / rel).exists():
                _copy(source, tmp / rel)
            rows.append(
                {"kind": "generated", "subject": subject, "arm": arm, "prompt_id": prompt_id}
                | {"seed": image_seed, "prompt": prompt, "path": rel.as_posix(), "sha256": digest}
            )
        write_csv(tmp / "manifest.csv", rows, MANIFEST_COLUMNS)
        write_csv(tmp / "plan.csv", plan, PLAN_COLUMNS)
        screens = {p: 0 for p in ids}
        for row in plan:
            screens[row["participant"]] += 1
        write_csv(
            tmp / "participants.csv",
            [{"participant": p, "screens": n, "link": f"p/{p}"} for p, n in screens.items()],
            ["participant", "screens", "link"],
        )
        study = {
            "format": STUDY_FORMAT,
            "name": name,
            "arms": arms,
            "questions": questions,
            "subjects": list(subjects),
            "prompt_ids": sorted({int(p) for p in prompt_ids}),
            "seeds": sorted({int(s) for s in seeds}),
            "participants": ids,
            "subjects_per_participant": subjects_per_participant,
            "screens_per_participant": len(questions) * subjects_per_participant,
            "seed": seed,
        }
        (tmp / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    if design_csv is not None:
        write_csv(
            design_csv,
            design_table(plan),
            ["subject", "prompt_id", "seed", "question", "left_arm", "screens"],
        )
    log.info(
        "study %s: %d subjects, %d pairs, %d participants x %d screens -> %s",
        name,
        len(subjects),
        len(subjects) * len(wanted),
        len(ids),
        study["screens_per_participant"],
        site,
    )
    return study


__all__ = ["MANIFEST_COLUMNS", "build_study"]
