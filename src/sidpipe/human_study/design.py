"""The study's design: the paper's defaults and the seeded, balanced plan.

The paper (App. B): 130 participants, 10 subjects each, 4 questions per subject (subject
alignment, non-subject disentanglement, text alignment, overall), each a choice between an image
of DreamBooth and one of SID-DreamBooth shown in random order, or "cannot determine / both
equally". Here a participant sees, per subject, one pair (the two arms' images of one prompt and
seed) and answers the questions about it one screen at a time.

The plan is balanced and reproducible:
- subjects: participant i gets the subjects at positions i*k .. i*k+k-1 of a seeded cyclic order,
  so every subject is shown to as many participants as any other, give or take one;
- pairs: the participants who see a subject get its (prompt, seed) pairs in a seeded cyclic
  order, each pair shown as often as any other, give or take one;
- sides: per subject and question, consecutive viewers come in twos, one with arm A on the left
  and one with arm B, in a seeded order, so each arm is on the left half the time, give or take
  one;
- every draw is seeded by the study seed and what it decides (never by a running generator), so
  adding participants leaves the plan of the earlier ones, and their recorded judgements, valid.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from sidpipe.io import SidpipeError

# The paper's four questions; `metric` names the metric whose direction the analysis compares
# with the human preference (none for the overall judgement).
DEFAULT_QUESTIONS: list[dict[str, str]] = [
    {
        "id": "subject_alignment",
        "text": "Which image shows the subject of the reference images more faithfully?",
        "metric": "SA",
    },
    {
        "id": "non_subject_disentanglement",
        "text": "Which image is freer of the reference images' background and other things "
        "the prompt does not ask for?",
        "metric": "NSD",
    },
    {
        "id": "text_alignment",
        "text": "Which image matches the text prompt better?",
        "metric": "TA",
    },
    {
        "id": "overall",
        "text": "All things considered (the subject, nothing carried over from the references, "
        "the prompt), which image is better?",
    },
]

DEFAULTS: dict = {
    "name": "dreambooth_sid",
    "arms": ["dreambooth/case1/standard", "dreambooth/sid/standard"],
    "seeds": [0],
    "participants": 130,
    "subjects_per_participant": 10,
    "questions": DEFAULT_QUESTIONS,
    "seed": 0,
    "bootstrap": 1000,
}

PLAN_COLUMNS = [
    "participant",
    "position",
    "subject",
    "prompt_id",
    "seed",
    "question",
    "left_arm",
    "right_arm",
]


def settings_with_defaults(config: dict | None) -> dict:
    """The `human_study` config section over the paper's defaults."""
    return {**DEFAULTS, **(config or {})}


def _rng(seed: int, *what: object) -> random.Random:
    """A generator for one decision: seeded by the study seed and what it decides."""
    return random.Random("|".join(map(str, (seed, *what))))


def participant_ids(count: int, name: str, seed: int) -> list[str]:
    """`p001-3fa9c2`, ...: a number and 6 hex digits of a hash of the study name, seed and
    number, so a link cannot be turned into another participant's by counting (anyone who knows
    the name and seed can compute them: keep `human_study.seed` private when that matters)."""
    width = max(3, len(str(count)))
    ids = []
    for i in range(count):
        digest = hashlib.sha256(f"{name}|{seed}|{i}".encode()).hexdigest()[:6]
        ids.append(f"p{i + 1:0{width}d}-{digest}")
    return ids


def make_plan(
    participants: Sequence[str],
    pools: dict[str, Sequence[tuple[int, int]]],
    questions: Sequence[str],
    arms: Sequence[str],
    subjects_per_participant: int,
    seed: int,
) -> list[dict]:
    """One row per participant and screen (`PLAN_COLUMNS`), in the order they are shown.

    `pools`: per subject, its (prompt_id, seed) pairs; `arms`: (arm A, arm B).
    """
    subjects = sorted(pools)
    if len(arms) != 2 or arms[0] == arms[1]:
        raise SidpipeError(f"a study compares two different arms, got {list(arms)}")
    if not subjects:
        raise SidpipeError("the study has no subjects")
    if not 1 <= subjects_per_participant <= len(subjects):
        raise SidpipeError(
            f"subjects_per_participant is {subjects_per_participant} but the study has "
            f"{len(subjects)} subject(s); lower human_study.subjects_per_participant"
        )
    if len(set(participants)) != len(participants) or not participants:
        raise SidpipeError("participant ids must be given and distinct")
    if len(set(questions)) != len(questions) or not questions:
        raise SidpipeError("question ids must be given and distinct")
    for subject, pool in pools.items():
        if not pool:
            raise SidpipeError(f"subject {subject} has no (prompt, seed) pair for the study")

    cycle = list(subjects)
    _rng(seed, "subjects").shuffle(cycle)
    k = subjects_per_participant
    viewers: dict[str, list[str]] = defaultdict(list)
    seen_by: dict[str, list[str]] = {}
    for i, participant in enumerate(participants):
        chosen = [cycle[(i * k + j) % len(cycle)] for j in range(k)]
        _rng(seed, "order", participant).shuffle(chosen)
        seen_by[participant] = chosen
        for subject in chosen:
            viewers[subject].append(participant)

    pair_of: dict[tuple[str, str], tuple[int, int]] = {}
    left_a: dict[tuple[str, str, str], bool] = {}
    for subject in subjects:
        pool = sorted(pools[subject])
        _rng(seed, "pairs", subject).shuffle(pool)
        for n, participant in enumerate(viewers[subject]):
            pair_of[participant, subject] = pool[n % len(pool)]
        for question in questions:
            for n, participant in enumerate(viewers[subject]):
                block = [True, False]
                _rng(seed, "sides", subject, question, n // 2).shuffle(block)
                left_a[participant, subject, question] = block[n % 2]

    rows = []
    for participant in participants:
        position = 0
        for subject in seen_by[participant]:
            prompt_id, image_seed = pair_of[participant, subject]
            for question in questions:
                a_left = left_a[participant, subject, question]
                rows.append(
                    {
                        "participant": participant,
                        "position": position,
                        "subject": subject,
                        "prompt_id": int(prompt_id),
                        "seed": int(image_seed),
                        "question": question,
                        "left_arm": arms[0] if a_left else arms[1],
                        "right_arm": arms[1] if a_left else arms[0],
                    }
                )
                position += 1
    return rows


def study_plan(
    name: str,
    arms: Sequence[str],
    subjects: Sequence[str],
    prompt_ids: Sequence[int],
    seeds: Sequence[int],
    participants: int | Sequence[str],
    subjects_per_participant: int,
    questions: Sequence[dict],
    seed: int,
) -> tuple[list[str], list[dict]]:
    """(participant ids, plan) of a study's settings: every subject offers every (prompt id,
    seed) pair. Depends on the settings only, so the workflow can check recorded responses
    against a new plan before it replaces anything."""
    ids = (
        participant_ids(participants, name, seed)
        if isinstance(participants, int)
        else [str(p) for p in participants]
    )
    pairs = sorted({(int(p), int(s)) for p in prompt_ids for s in seeds})
    if not pairs:
        raise SidpipeError("the study needs at least one prompt id and one seed")
    plan = make_plan(
        ids,
        {subject: pairs for subject in subjects},
        [q["id"] for q in questions],
        arms,
        subjects_per_participant,
        seed,
    )
    return ids, plan


# The settings a study's plan is made from (study_plan's and build_study's arguments).
PLAN_KEYS = ("name", "arms", "subjects", "prompt_ids", "seeds", "participants")
PLAN_KEYS += ("subjects_per_participant", "questions", "seed")


def plan_settings(settings: Mapping) -> dict:
    """The part of resolved settings that makes the plan."""
    return {key: settings[key] for key in PLAN_KEYS}


def resolve_settings(
    section: dict | None,
    arm_subjects: Mapping[str, set[str]],
    subjects: Sequence[str],
    prompts_per_subject: int,
    seeds_sampled: int,
    where: str = "human_study",
) -> dict:
    """A `human_study` config section over the paper's defaults, checked against the grid:
    its arms must have run on its subjects (`arm_subjects`: arm name -> subjects it ran on;
    `subjects`: the grid's subjects, in order), its prompt ids and seeds must have been sampled.
    Fills in the subjects (all that both arms ran), the prompt ids (all) and the responses path.
    A problem is a SidpipeError naming `where`.<key> and how to fix it."""
    settings = settings_with_defaults(section)
    for arm in settings["arms"]:
        if arm not in arm_subjects:
            raise SidpipeError(
                f"{where}.arms: no experiment runs arm {arm!r} (arms: "
                f"{', '.join(sorted(arm_subjects))}); run it in an experiment, choose other "
                "arms, or remove the human_study section"
            )
    both = [s for s in subjects if all(s in arm_subjects[arm] for arm in settings["arms"])]
    chosen = settings.get("subjects") or both
    missing = [s for s in chosen if s not in both]
    if missing or not chosen:
        raise SidpipeError(
            f"{where}.subjects: {', '.join(missing) or 'none'} not run by both arms "
            f"(subjects both arms ran: {', '.join(both) or 'none'}); list only those"
        )
    prompt_ids = settings.get("prompt_ids") or list(range(prompts_per_subject))
    if max(prompt_ids) >= prompts_per_subject or min(prompt_ids) < 0:
        raise SidpipeError(
            f"{where}.prompt_ids: the arms sample prompt ids 0-{prompts_per_subject - 1} "
            "(sampling.prompts_per_subject); choose among those"
        )
    if max(settings["seeds"]) >= seeds_sampled or min(settings["seeds"]) < 0:
        raise SidpipeError(
            f"{where}.seeds: the arms sample seeds 0-{seeds_sampled - 1} (sampling.seeds); "
            "choose among those"
        )
    if settings["subjects_per_participant"] > len(chosen):
        raise SidpipeError(
            f"{where}.subjects_per_participant: {settings['subjects_per_participant']} but the "
            f"study has {len(chosen)} subject(s); lower it or add subjects"
        )
    name = settings["name"]
    return settings | {
        "subjects": list(chosen),
        "prompt_ids": sorted(prompt_ids),
        "responses": settings.get("responses") or f"results/human_study/{name}/responses.jsonl",
    }


def check_recorded_responses(settings: Mapping, where: str = "human_study") -> str | None:
    """Judgements already recorded (settings["responses"]) must fit the plan these settings
    make: a changed study is a SidpipeError here, before the workflow replaces the site they
    were given on. A malformed responses file is only returned as a warning (the analysis names
    its line); None when there is nothing to say."""
    from sidpipe.human_study.responses import check_against_plan, read_responses

    if not Path(settings["responses"]).is_file():
        return None
    try:
        records = read_responses(settings["responses"])
    except SidpipeError as err:
        return f"{where}: {err}"
    _, plan = study_plan(**plan_settings(settings))
    try:
        check_against_plan(records, plan, settings["responses"])
    except SidpipeError as err:
        raise SidpipeError(f"{where}: {err}") from None
    return None


def design_table(plan: Sequence[dict]) -> list[dict]:
    """Tidy counts of the plan: per subject, pair, question and left arm, how many screens."""
    counts = Counter(
        (r["subject"], int(r["prompt_id"]), int(r["seed"]), r["question"], r["left_arm"])
        for r in plan
    )
    return [
        {
            "subject": subject,
            "prompt_id": prompt_id,
            "seed": image_seed,
            "question": question,
            "left_arm": left_arm,
            "screens": n,
        }
        for (subject, prompt_id, image_seed, question, left_arm), n in sorted(counts.items())
    ]


__all__ = [
    "DEFAULTS",
    "DEFAULT_QUESTIONS",
    "PLAN_COLUMNS",
    "PLAN_KEYS",
    "check_recorded_responses",
    "design_table",
    "make_plan",
    "participant_ids",
    "plan_settings",
    "resolve_settings",
    "settings_with_defaults",
    "study_plan",
]
