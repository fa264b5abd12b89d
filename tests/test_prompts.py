"""The prompts file: templates per kind and per concept, their checks, a subject's list."""

from pathlib import Path

import pytest
import yaml

from sidpipe.config import ConfigError, load_config
from sidpipe.prompts import (
    load_prompts,
    repeated_prompt_warnings,
    repeated_prompts,
    subject_templates,
    unmatched_concept_prompts,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def real():
    return load_config(REPO / "config.yaml")


def test_prompts_need_enough_templates_with_placeholders(tmp_path, real):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"object": ["a {token} {class}"] * 25, "live": ["a dog"] * 25}))
    assert len(load_prompts(path, real, {"object"})["object"]) == 25
    with pytest.raises(ConfigError, match=r"live\[0\]: 'a dog' lacks"):
        load_prompts(path, real, {"live"})
    with pytest.raises(
        ConfigError, match=r"kind 'style': 0 prompts, but sampling.prompts_per_subject is 25"
    ):
        load_prompts(path, real, {"style"})
    # a concept's prompts may name other classes instead of {class}; {token} stays required
    concept = ["a {token} dog", "a {token} {class} in the snow"] * 12 + ["a frozen cat"]
    path.write_text(yaml.safe_dump({"concept": concept}))
    with pytest.raises(ConfigError, match=r"concept\[24\]: 'a frozen cat' lacks \{token\}"):
        load_prompts(path, real, {"concept"})
    path.write_text(yaml.safe_dump({"concept": concept[:24] + ["a {token} teapot"]}))
    assert load_prompts(path, real, {"concept"})["concept"][0] == "a {token} dog"
    shipped = load_prompts(REPO / "prompts/dreambooth.yaml", real, {"concept"})["concept"]
    assert len(shipped) == 25 and sum("{class}" not in t for t in shipped) == 20


def test_a_concept_may_have_its_own_prompts(tmp_path, real):
    """`concepts:` in a prompts file: the subjects of a listed concept get its list, those of
    other concepts the `concept:` list (required only while some concept has no list of its
    own); a listed concept's list is checked as the kind's."""
    path = tmp_path / "p.yaml"
    hat = ["a {token} dog", "a {token} {class} on the beach"] * 13
    pose = ["a {token} car"] * 25
    path.write_text(yaml.safe_dump({"concept": pose, "concepts": {"wearing a hat": hat}}))
    prompts = load_prompts(path, real, {"concept"}, {"wearing a hat", "upside down"})
    hat_row = {"subject": "h", "kind": "concept", "class": "robot", "concept": "wearing a hat"}
    pose_row = hat_row | {"concept": "upside down"}
    assert subject_templates(prompts, hat_row) == hat[:25]
    assert subject_templates(prompts, pose_row) == pose
    assert subject_templates(prompts, {"kind": "concept", "concept": ""}) == pose
    # every concept subject has its own list: no `concept:` list needed
    path.write_text(yaml.safe_dump({"concepts": {"wearing a hat": hat}}))
    only = load_prompts(path, real, {"concept"}, {"wearing a hat"})
    assert subject_templates(only, hat_row) == hat[:25]
    with pytest.raises(ConfigError, match=r"kind 'concept': 0 prompts"):
        load_prompts(path, real, {"concept"}, {"wearing a hat", "upside down"})
    path.write_text(yaml.safe_dump({"concepts": {"wearing a hat": hat[:24] + ["a dog"]}}))
    with pytest.raises(ConfigError, match=r"concepts.wearing a hat\[24\]: 'a dog' lacks"):
        load_prompts(path, real, {"concept"}, {"wearing a hat"})
    path.write_text(yaml.safe_dump({"concepts": hat}))
    with pytest.raises(ConfigError, match=r"p.yaml: `concepts:` must map concept words"):
        load_prompts(path, real, {"concept"}, {"wearing a hat"})


def test_a_concept_list_no_subject_spells_is_found(tmp_path):
    """`wearing a red hats` in the table: the concept silently got the kind's list."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"concepts": {"wearing a red hat": ["a {token} dog"]}}))
    assert unmatched_concept_prompts(path, {"wearing a red hats"}) == ["wearing a red hat"]
    assert unmatched_concept_prompts(path, {"wearing a red hat", "frozen"}) == []
    assert unmatched_concept_prompts(path, set()) == []  # no concept subject: nothing to miss


def test_prompts_syntax_error_names_the_file(tmp_path, real):
    path = tmp_path / "p.yaml"
    path.write_text("object:\n  - a {token} {class}\n\t- tab\n")
    with pytest.raises(ConfigError, match=r"p\.yaml, line 3, column 1: the prompts file"):
        load_prompts(path, real, {"object"})


def test_a_prompt_repeated_for_a_subject_is_found():
    """ "a {token} {class}" beside "a {token} dog" is one prompt for a dog (its images, same
    seeds, would count twice), not for a cat; spacing does not hide a repeat."""
    templates = ["a {token} {class}", "a {token} cat", "a {token} dog", "a  {token} {class}"]
    assert repeated_prompts(templates, "dog") == [(0, 2), (0, 3)]
    assert repeated_prompts(templates, "cat") == [(0, 1), (0, 3)]
    assert repeated_prompts(templates[:3], "mug") == []


def test_repeat_warnings_name_each_running_subject_and_its_templates():
    prompts = {"live": ["a {token} {class}", "a {token} dog", "a {token} cat"]}
    subjects = {
        "rex": {"subject": "rex", "kind": "live", "class": "dog"},
        "tom": {"subject": "tom", "kind": "live", "class": "cat"},
        "owl": {"subject": "owl", "kind": "live", "class": "owl"},
    }
    warnings = repeated_prompt_warnings(prompts, subjects, {"rex", "owl"}, "p.yaml")
    assert warnings == [
        "subject rex: prompt templates 0 and 1 of p.yaml give it the same prompt, so their "
        "images (same seeds) count twice in every mean; change one of each pair"
    ]  # tom repeats too, but runs in no experiment


def test_a_prompts_file_that_is_no_mapping_is_named(tmp_path, real):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(["a {token} {class}"] * 25))
    with pytest.raises(ConfigError, match=r"p\.yaml: the prompts file must map each subject kind"):
        load_prompts(path, real, {"object"})
    path.write_text(yaml.safe_dump({"concepts": {"wearing a hat": ["a {token} dog"]}}))
    with pytest.raises(
        ConfigError, match=r"concepts\.wearing a hat: 1 prompts, .*give it at least 25"
    ):
        load_prompts(path, real, {"concept"}, {"wearing a hat"})


def test_unquoted_templates_are_named_and_the_fix_given(tmp_path, real):
    """`- {token} {class} in Paris` is a YAML flow mapping (a syntax error); `- {token}` and
    `- a {token} {class}: with a hat` read as mappings and a number as a number: each is named
    as no string, to be quoted, not reported as lacking {token} or a bare TypeError."""
    path = tmp_path / "p.yaml"
    path.write_text("object:\n  - {token} {class} in Paris\n")
    with pytest.raises(ConfigError, match=r"p\.yaml, line 2.*quote templates that start with \{"):
        load_prompts(path, real, {"object"})
    path.write_text("object:\n\t- a {token} {class}\n")  # a tab: no word about braces
    with pytest.raises(ConfigError, match=r"not valid YAML") as err:
        load_prompts(path, real, {"object"})
    assert "quote templates" not in str(err.value)
    good = ["a {token} {class}"] * 22
    path.write_text(
        "object:\n  - {token}\n  - a {token} {class}: with a hat\n  - 42\n"
        + "".join(f"  - {t}\n" for t in good)
    )
    with pytest.raises(ConfigError) as err:
        load_prompts(path, real, {"object"})
    message = str(err.value)
    assert "object[0]: {'token': None} is not a string" in message
    assert "object[1]: {'a {token} {class}': 'with a hat'} is not a string" in message
    assert "object[2]: 42 is not a string" in message
    assert "quote it" in message and "lacks" not in message


def test_a_misspelt_kind_is_named(tmp_path, real):
    """`lives:` only showed as kind 'live' having 0 prompts; an unused unknown kind was
    ignored."""
    path = tmp_path / "p.yaml"
    templates = ["a {token} {class}"] * 25
    path.write_text(yaml.safe_dump({"object": templates, "lives": templates}))
    with pytest.raises(ConfigError) as info:
        load_prompts(path, real, {"object"})
    assert "unknown kind 'lives' (the file's keys are subject kinds: object, live," in str(
        info.value
    )
    path.write_text(yaml.safe_dump({"object": templates, "live": templates}))
    assert load_prompts(path, real, {"object"})["object"] == templates
