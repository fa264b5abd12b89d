"""The experiment grid: which arms (method x description set x inference setting) run on which
subjects, from the config's `experiments`, and the checks that the pairs the metrics compare
were run."""

from __future__ import annotations

from dataclasses import dataclass

from sidpipe.config import DEFAULT_INFERENCE, ConfigError, grid_inference
from sidpipe.subsets import split_name, subset_name


@dataclass(frozen=True, order=True)
class Arm:
    """One trained-and-evaluated configuration: method x description set x inference setting."""

    method: str
    descriptions: str
    inference: str = DEFAULT_INFERENCE

    @property
    def name(self) -> str:
        return f"{self.method}/{self.descriptions}/{self.inference}"


# Subjects of these kinds run only in grids that ask for them (`kinds`, or by name): the other
# kinds' prompts and methods make no sense on a concept's carrier subject.
OPT_IN_KINDS = frozenset({"concept"})


def expand_experiments(
    config: dict, subjects: list[str], kinds: dict[str, str] | None = None
) -> dict[str, list[tuple[Arm, str]]]:
    """Each experiment's grids expanded to (arm, subject) pairs, in config order, deduplicated.

    A grid runs on its `subjects`, or else on every subject of its `kinds` (`kinds` maps a
    subject to its kind; default every kind but concept); a grid with `references` runs its
    methods on a subset of the references (`sidpipe.subsets`: `dreambooth--first1`).
    """
    kinds = kinds or {}
    experiments: dict[str, list[tuple[Arm, str]]] = {}
    for name, grids in config["experiments"].items():
        pairs: list[tuple[Arm, str]] = []
        for index, grid in enumerate(grids):
            unknown = sorted(set(grid.get("subjects", [])) - set(subjects))
            if unknown:
                raise ConfigError(
                    f"experiments.{name}[{index}].subjects: unknown subject(s) "
                    f"{', '.join(unknown)} (not in the subjects table)"
                )
            if "subjects" in grid:
                chosen = grid["subjects"]
            elif "kinds" in grid:
                chosen = [s for s in subjects if kinds.get(s) in grid["kinds"]]
            else:
                chosen = [s for s in subjects if kinds.get(s) not in OPT_IN_KINDS]
            for method in grid["methods"]:
                for descriptions in grid["descriptions"]:
                    for inference in grid_inference(grid):
                        for subject in chosen:
                            arm_method = method
                            if "references" in grid:
                                arm_method = subset_name(method, grid["references"])
                            pair = (Arm(arm_method, descriptions, inference), subject)
                            if pair not in pairs:
                                pairs.append(pair)
        experiments[name] = pairs
    return experiments


def check_concept_pairs(
    config: dict,
    experiments: dict[str, list[tuple[Arm, str]]],
    kinds: dict[str, str],
    encoder_algorithms: frozenset[str] | set[str],
    source: str = "config",
) -> None:
    """Encoder methods (no training) cannot learn a concept: a grid that puts one on a concept
    subject is a ConfigError naming the experiment, the method and the subject."""
    for name, pairs in experiments.items():
        for arm, subject in pairs:
            base = split_name(arm.method)[0]
            algorithm = (config["methods"].get(base) or {}).get("algorithm")
            if kinds.get(subject) == "concept" and algorithm in encoder_algorithms:
                raise ConfigError(
                    f"{source}: experiments.{name}: method {base!r} is an encoder (no training) "
                    f"and cannot learn the concept of subject {subject!r}; run it on other "
                    "subjects (`subjects:` or `kinds:` in its grid)"
                )


def subjects_by_arm(arm_subjects: list[tuple[Arm, str]]) -> dict[str, set[str]]:
    """Arm name (method/descriptions/inference) -> the subjects it runs on."""
    ran: dict[str, set[str]] = {}
    for arm, subject in arm_subjects:
        ran.setdefault(arm.name, set()).add(subject)
    return ran


def check_comparisons(
    comparisons: list[list[str]], arm_subjects: list[tuple[Arm, str]], source: str = "config"
) -> tuple[list[list[str]], list[str]]:
    """`metrics.comparisons` against the grid: the pairs whose two arms both run on at least one
    subject in common (their images are paired there), and a warning for each other entry,
    naming it and the arms that run (a typo, or an experiment this run leaves out: a shipped
    config's comparisons must not stop a run of fewer experiments). A pair listed twice, in
    either order, is a ConfigError."""
    ran = subjects_by_arm(arm_subjects)
    seen: dict[frozenset[str], int] = {}
    kept, warnings = [], []
    for i, (arm_a, arm_b) in enumerate(comparisons):
        where = f"{source}: metrics.comparisons[{i}]"
        first = seen.setdefault(frozenset((arm_a, arm_b)), i)
        if first != i:
            raise ConfigError(
                f"{where}: {arm_a} and {arm_b} are already compared in entry {first} (the order "
                "of a pair is only the sign of A - B); list each pair once"
            )
        missing = [arm for arm in (arm_a, arm_b) if arm not in ran]
        if missing:
            warnings.append(
                f"{where}: arm {missing[0]!r} is in no experiment of this run, so the pair is not "
                f"compared (the arms that run: {', '.join(sorted(ran))})"
            )
        elif not ran[arm_a] & ran[arm_b]:
            warnings.append(
                f"{where}: {arm_a} runs on {', '.join(sorted(ran[arm_a]))} and {arm_b} on "
                f"{', '.join(sorted(ran[arm_b]))}: no subject in common, so the pair is not "
                "compared"
            )
        else:
            kept.append([arm_a, arm_b])
    return kept, warnings


def _has_context_loss(settings: dict) -> bool:
    """A Lego method whose context loss is on when it has words: context_weight 0 is the only
    way to turn it off (the trainer rejects < 0)."""
    return settings.get("algorithm") == "lego" and settings.get("context_weight") != 0


def concept_context_words(
    settings: dict, concept: str | None, concept_words: dict[str, dict] | None
) -> dict:
    """A method's settings for one subject: for a Lego method with a context loss on a concept
    subject whose concept has an entry in `concept_words` (config key), that entry's
    `positive`/`negative` words in place of the method's `positive_words`/`negative_words` (the
    context loss is about the concept, so each concept needs its own synonyms and antonyms);
    else `settings` unchanged, so a method without the loss (context_weight 0, e.g.
    textual_inversion_multi) keeps its params and its trained results."""
    words = (concept_words or {}).get(concept or "")
    if not _has_context_loss(settings) or not words:
        return settings
    return {**settings, "positive_words": words["positive"], "negative_words": words["negative"]}


def lego_without_context_words(
    config: dict, subjects: dict[str, dict], arm_subjects: list[tuple[Arm, str]]
) -> list[str]:
    """Warnings for Lego methods that would train on a concept subject without their context
    loss (one of Lego's three parts) only because neither the method's `positive_words`/
    `negative_words` nor `concept_words` gives the concept any words: one per method and
    concept. A method with context_weight 0 means it (textual_inversion_multi)."""
    missing: dict[tuple[str, str], list[str]] = {}
    for arm, subject in arm_subjects:
        row = subjects[subject]
        method = split_name(arm.method)[0]  # a subset arm (lego--first1) is its method's
        settings = config["methods"].get(method, {})
        if row.get("kind") != "concept" or not _has_context_loss(settings):
            continue
        words = concept_context_words(settings, row.get("concept"), config.get("concept_words"))
        if not (words.get("positive_words") and words.get("negative_words")):
            names = missing.setdefault((method, row.get("concept") or ""), [])
            names += [subject] if subject not in names else []
    return [
        f"method {method} trains on concept subject(s) {', '.join(names)} ({concept!r}) "
        "without Lego's context loss: no positive/negative words; add "
        f"`concept_words: {{{concept!r}: {{positive: [...], negative: [...]}}}}` to the config "
        f"(synonyms and antonyms of the concept), or set methods.{method}.context_weight: 0 "
        "if that is meant"
        for (method, concept), names in sorted(missing.items())
    ]


def unmatched_concept_words(config: dict, subjects: dict[str, dict]) -> list[str]:
    """`concept_words` entries that no subject's `concept` column spells (never used)."""
    concepts = {row.get("concept") for row in subjects.values()}
    return sorted(set(config.get("concept_words") or {}) - concepts)


def all_arm_subjects(
    config: dict, subjects: list[str], kinds: dict[str, str] | None = None
) -> list[tuple[Arm, str]]:
    """Every (arm, subject) job of all experiments, each once: shared arms run once."""
    return sorted(
        {pair for pairs in expand_experiments(config, subjects, kinds).values() for pair in pairs}
    )
