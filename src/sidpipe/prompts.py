"""The evaluation prompts file: templates per subject kind (and per concept), checked at
start-up, and which templates a subject is prompted with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidpipe.config import ConfigError, load_schema
from sidpipe.io import SidpipeError, read_yaml
from sidpipe.sampling import expand_prompts

# Kinds whose templates may name other classes instead of {class} (a concept is carried to them).
CLASS_OPTIONAL_KINDS = frozenset({"concept"})
# Key of a concept's own template list in `load_prompts`' result (no kind starts with it).
CONCEPT_PROMPTS = "concept: "


def load_prompts(
    path: str | Path, config: dict, kinds: set[str], concepts: set[str] = frozenset()
) -> dict[str, list[str]]:
    """The evaluation prompt templates per subject kind, checked for count and placeholders.

    A concept may have its own list under the file's `concepts:` (concept words -> templates,
    e.g. for a concept the world draws on some classes only); the concept subjects whose
    `concept` column spells it are prompted with that list (`subject_templates`), the others
    with their kind's."""
    try:
        prompts = read_yaml(path, "prompts file") or {}
    except SidpipeError as err:
        hint = ""
        # `- {token} {class} ...` starts a flow mapping: the parser stops at a brace.
        if "not valid YAML" in str(err) and ("'{'" in str(err) or "'}'" in str(err)):
            hint = '; quote templates that start with {, e.g. - "{token} {class} in Paris"'
        raise ConfigError(f"{err} (config key `prompts`{hint})") from None
    if not isinstance(prompts, dict):
        raise ConfigError(
            f"{path}: the prompts file must map each subject kind to a list of templates "
            f"(object:, live:, ...), not a {type(prompts).__name__}"
        )
    need = config["sampling"]["prompts_per_subject"]
    own = prompts.get("concepts") or {}
    if not isinstance(own, dict):
        raise ConfigError(
            f"{path}: `concepts:` must map concept words to a list of templates, not "
            f"{type(own).__name__}"
        )
    lists = {kind: (kind, prompts.get(kind)) for kind in kinds if kind != "concept"}
    # the kind's list serves every concept without its own (and callers that name none)
    if "concept" in kinds and (not concepts or not concepts <= set(own)):
        lists["concept"] = ("concept", prompts.get("concept"))
    for concept in sorted(concepts & set(own)):
        lists[CONCEPT_PROMPTS + concept] = (f"concepts.{concept}", own[concept])
    problems = []
    known = [*load_schema("subjects")["properties"]["kind"]["enum"], "concepts"]
    for key in prompts:
        if key not in known:
            # A typo (`lives:`) would otherwise only show as the real kind's missing list.
            problems.append(
                f"unknown kind {key!r} (the file's keys are subject kinds: {', '.join(known)})"
            )
    for label, templates in sorted(lists.values(), key=lambda item: item[0]):
        problems += _template_problems(label, templates, need)
    if problems:
        raise ConfigError(f"{path}: invalid prompts:\n  " + "\n  ".join(problems))
    return {key: templates[:need] for key, (_, templates) in lists.items()}


def unmatched_concept_prompts(path: str | Path, concepts: set[str]) -> list[str]:
    """The prompts file's `concepts:` lists that no concept subject spells (never used: the
    subject gets its kind's list instead); none when the table has no concept subject."""
    if not concepts:
        return []
    own = (read_yaml(path, "prompts file") or {}).get("concepts") or {}
    return sorted(set(own) - concepts)


def _template_problems(label: str, templates: Any, need: int) -> list[str]:
    """What is wrong with one template list (`label`: its place in the prompts file)."""
    if not isinstance(templates, list) or len(templates) < need:
        count = len(templates) if isinstance(templates, list) else 0
        if label.startswith("concepts."):  # a concept's own list
            where, fix = label, f"give it at least {need} templates"
        else:
            where, fix = f"kind {label!r}", f"add a `{label}:` list of at least {need} templates"
        return [
            f"{where}: {count} prompts, but sampling.prompts_per_subject is {need} "
            f"({fix}, or lower it)"
        ]
    problems = []
    class_optional = label.split(".")[0] in CLASS_OPTIONAL_KINDS | {"concepts"}
    for index, template in enumerate(templates[:need]):
        if not isinstance(template, str):
            problems.append(
                f"{label}[{index}]: {template!r} is not a string (YAML reads an unquoted "
                "template that starts with { or holds ': ' as a mapping, and a bare number as "
                'a number); quote it, e.g. - "{token} {class} in Paris"'
            )
        elif "{token}" not in template:
            problems.append(
                f"{label}[{index}]: {template!r} lacks {{token}} (where the subject's "
                "identifier goes; add it)"
            )
        elif "{class}" not in template and not class_optional:
            problems.append(
                f"{label}[{index}]: {template!r} lacks {{class}} (the subject's class noun; add it)"
            )
    return problems


def subject_templates(prompts: dict[str, list[str]], row: dict) -> list[str]:
    """A subject's prompt templates from `load_prompts`' result: its concept's own list if the
    file has one, else its kind's."""
    own = prompts.get(CONCEPT_PROMPTS + row["concept"]) if row.get("concept") else None
    return own if own is not None else prompts[row["kind"]]


def repeated_prompts(templates: list[str], class_name: str) -> list[tuple[int, int]]:
    """Pairs of template indices that give a subject of `class_name` the same prompt ("a {token}
    {class}" beside "a {token} dog" for a dog): the same prompt and seeds draw the same images,
    which would then count twice in every mean and interval."""
    seen: dict[str, int] = {}
    pairs = []
    for row in expand_prompts(templates, class_name, token="[V]"):  # the prompts as sampled
        if row["prompt"] in seen:
            pairs.append((seen[row["prompt"]], row["prompt_id"]))
        else:
            seen[row["prompt"]] = row["prompt_id"]
    return pairs


def repeated_prompt_warnings(
    prompts: dict[str, list[str]], subjects: dict[str, dict], names: set[str], source: str
) -> list[str]:
    """A start-up warning for each of the `names` subjects that two templates give one prompt
    (`repeated_prompts`), naming the templates."""
    warnings = []
    for name in sorted(names):
        row = subjects[name]
        pairs = repeated_prompts(subject_templates(prompts, row), row["class"])
        if pairs:
            warnings.append(
                f"subject {name}: prompt templates "
                + ", ".join(f"{a} and {b}" for a, b in pairs)
                + f" of {source} give it the same prompt, so their images (same seeds) count "
                "twice in every mean; change one of each pair"
            )
    return warnings
