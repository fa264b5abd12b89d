"""Tests for sidpipe.descriptions (stage `describe_references`): templates, hand-written files,
validation of [V], instructions and cache keys. No model or network is used here."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidpipe.descriptions.cache import cache_key
from sidpipe.descriptions.instructions import fill_instruction, load_instructions, retry_instruction
from sidpipe.descriptions.stage import FIELDS, describe_references
from sidpipe.descriptions.text import (
    PLACEHOLDER,
    caption_to_description,
    check_description,
    count_tokens,
    judge_answer,
    load_base_tokenizer,
    template_description,
)
from sidpipe.io import SidpipeError, read_csv, sha256_file, sha256_text
from sidpipe.models import train_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests/data/tiny_demo/subjects"
CLASSES = {"red_mug": "mug", "toy_robot": "robot", "spotted_dog": "dog"}
KINDS = {"red_mug": "object", "toy_robot": "object", "spotted_dog": "live"}
# The base tokenizer learns the demo's words, as the demo's own tiny tokenizer does.
CORPUS = [
    text
    for subject in CLASSES
    for entry in yaml.safe_load((DEMO / subject / "descriptions.yaml").read_text()).values()
    for text in entry.values()
] + ["a painting in the style of sks art"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A base-model folder holding only what the stage reads: <dir>/tokenizer."""
    root = tmp_path_factory.mktemp("base")
    train_clip_tokenizer(CORPUS, root / "tokenizer")
    return str(root)


def make_references(root: Path, subject: str = "red_mug", count: int = 4) -> Path:
    """A prepared references folder: <image_id>.png + manifest.csv naming the demo sources."""
    refs = root / "references" / subject
    refs.mkdir(parents=True)
    rows = []
    for n in range(1, count + 1):
        source = DEMO / subject / f"{n:02d}.png"
        image_id = f"img{n}"  # differs from the source stem on purpose
        shutil.copyfile(source, refs / f"{image_id}.png")
        rows.append(
            {
                "subject": subject,
                "image_id": image_id,
                "path": f"{image_id}.png",
                "sha256": sha256_file(refs / f"{image_id}.png"),
                "source_path": str(source.relative_to(REPO)),
            }
        )
    with open(refs / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return refs


def run(tmp_path: Path, base: str, refs: Path, **kwargs) -> list[dict]:
    args = {
        "references_dir": refs,
        "out_csv": tmp_path / "out" / "descriptions.csv",
        "cache_dir": tmp_path / "cache",
        "subject": "red_mug",
        "class_name": "mug",
        "kind": "object",
        "description_set": "set",
        "case": 1,
        "vlm": None,
        "tokenizer": base,
    }
    return describe_references(**{**args, **kwargs})


# --- templates and hand-written files --------------------------------------------------------


def test_case1_template(tmp_path: Path, base: str) -> None:
    rows = run(tmp_path, base, make_references(tmp_path))
    out = tmp_path / "out" / "descriptions.csv"
    with open(out, newline="") as handle:
        assert next(csv.reader(handle)) == FIELDS
    saved = read_csv(out)
    assert [r["description"] for r in saved] == ["a [V] mug"] * 4
    assert {r["source"] for r in saved} == {"template"}
    assert [r["image_id"] for r in saved] == ["img1", "img2", "img3", "img4"]
    assert (
        saved[0]["image_sha256"]
        == rows[0]["image_sha256"]
        == sha256_file(tmp_path / "references" / "red_mug" / "img1.png")
    )
    assert int(saved[0]["token_count"]) == count_tokens(load_base_tokenizer(base), "a [V] mug")
    assert saved[0]["instruction_sha256"] == "" and saved[0]["cached"] == "False"
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_case1_style(tmp_path: Path, base: str) -> None:
    rows = run(tmp_path, base, make_references(tmp_path), kind="style", class_name="painting")
    assert {r["description"] for r in rows} == {"A painting in the style of [V] art"}
    assert template_description("x", style=True) == "A painting in the style of [V] art"


@pytest.mark.parametrize("subject", sorted(CLASSES))
@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_manual_backend_reads_demo_files(
    tmp_path: Path, base: str, subject: str, case: int
) -> None:
    refs = make_references(tmp_path, subject)
    manual_file = DEMO / subject / "descriptions.yaml"
    expected = yaml.safe_load(manual_file.read_text())
    rows = run(
        tmp_path,
        base,
        refs,
        subject=subject,
        class_name=CLASSES[subject],
        kind=KINDS[subject],
        case=case,
        vlm={"name": "manual", "backend": "manual", "model": "descriptions.yaml"},
        manual_file=manual_file,
    )
    # Matched by the source stem (01..04), not by the prepared image id (img1..img4).
    assert [r["description"] for r in rows] == [
        expected[f"{n:02d}"][f"case{case}"] for n in range(1, 5)
    ]
    assert {r["source"] for r in rows} == {"manual"}
    assert all(0 < r["token_count"] <= 77 for r in rows)


def test_manual_entry_overrides_a_model(
    tmp_path: Path, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No key and no server: any request would fail, so success proves none was sent.
    monkeypatch.delenv("SIDPIPE_NO_SUCH_KEY", raising=False)
    vlm = {
        "name": "gpt",
        "backend": "openai",
        "model": "gpt-4o",
        "base_url": "http://127.0.0.1:9/v1",
        "api_key_env": "SIDPIPE_NO_SUCH_KEY",
    }
    rows = run(
        tmp_path,
        base,
        make_references(tmp_path),
        case=3,
        vlm=vlm,
        manual_file=DEMO / "red_mug" / "descriptions.yaml",
    )
    assert {r["source"] for r in rows} == {"manual"}
    assert rows[0]["description"].startswith("a [V] mug on a blue and white checkered")
    assert not (tmp_path / "cache").exists()


def test_manual_missing_entry_names_file_image_and_case(tmp_path: Path, base: str) -> None:
    data = yaml.safe_load((DEMO / "red_mug" / "descriptions.yaml").read_text())
    del data["03"]["case3"]
    manual_file = tmp_path / "descriptions.yaml"
    manual_file.write_text(yaml.safe_dump(data))
    vlm = {"name": "manual", "backend": "manual", "model": "descriptions.yaml"}
    with pytest.raises(SidpipeError) as err:
        run(tmp_path, base, make_references(tmp_path), case=3, vlm=vlm, manual_file=manual_file)
    assert str(manual_file) in str(err.value)
    assert "image 03" in str(err.value) and "case 3" in str(err.value)
    assert 'add "03": {case3:' in str(err.value), "the hint's stem is quoted, as YAML needs"
    assert not (tmp_path / "out" / "descriptions.csv").exists()


@pytest.mark.parametrize("key", ["Case3", "case 3", "sid", "case5"])
def test_manual_entry_with_a_mistyped_case_is_refused(tmp_path: Path, base: str, key: str) -> None:
    """Its image would otherwise go to the template (or the VLM, at a cost) unnoticed."""
    manual_file = tmp_path / "descriptions.yaml"
    manual_file.write_text(f'"01":\n  {key}: a [V] mug on a table\n')
    vlm = {"name": "manual", "backend": "manual", "model": "descriptions.yaml"}
    with pytest.raises(SidpipeError) as err:
        run(tmp_path, base, make_references(tmp_path), case=3, vlm=vlm, manual_file=manual_file)
    assert str(err.value) == (
        f"{manual_file}: entry '01' has the key {key!r}; its keys are the cases case1, case2, "
        "case3, case4 (lower case): rename it"
    )


def test_manual_text_with_the_identifier_written_out_is_refused(tmp_path: Path, base: str) -> None:
    """Training writes the identifier where [V] is: "a sks mug" would train as "a sks sks mug"."""
    manual_file = tmp_path / "descriptions.yaml"
    manual_file.write_text('"01":\n  case3: a sks mug on a table\n')
    vlm = {"name": "manual", "backend": "manual", "model": "descriptions.yaml"}
    with pytest.raises(
        SidpipeError, match=r"case3: the identifier 'sks' is written out; write \[V\]"
    ):
        run(tmp_path, base, make_references(tmp_path), case=3, vlm=vlm, manual_file=manual_file)
    # a word that only contains it is no identifier
    manual_file.write_text('"01":\n  case1: a [V] mug on asks table\n')
    refs = make_references(tmp_path / "again")
    rows = run(tmp_path / "again", base, refs, case=1, manual_file=manual_file)  # + template
    assert rows[0]["description"] == "a [V] mug on asks table" and rows[0]["source"] == "manual"


def test_manual_entry_for_no_reference_image_is_named(
    tmp_path: Path, base: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = yaml.safe_load((DEMO / "red_mug" / "descriptions.yaml").read_text())
    data["3"] = data["03"]  # a mistyped stem
    manual_file = tmp_path / "descriptions.yaml"
    manual_file.write_text(yaml.safe_dump(data))
    vlm = {"name": "manual", "backend": "manual", "model": "descriptions.yaml"}
    with caplog.at_level("WARNING", logger="sidpipe"):
        run(tmp_path, base, make_references(tmp_path), case=3, vlm=vlm, manual_file=manual_file)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        str(manual_file) in w and "the stem 3 (its images: 01, 02, 03" in w for w in warnings
    ), warnings


def test_manual_backend_without_file(tmp_path: Path, base: str) -> None:
    vlm = {"name": "manual", "backend": "manual", "model": "descriptions.yaml"}
    with pytest.raises(SidpipeError, match="does not exist"):
        run(
            tmp_path,
            base,
            make_references(tmp_path),
            case=2,
            vlm=vlm,
            manual_file=tmp_path / "nope.yaml",
        )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a cup on a table", 'does not contain the word "mug"'),
        ("a [V] [V] mug", "appears 2 times"),
        ("a very long " + "very " * 80 + "[V] mug", "tokens"),
    ],
)
def test_manual_entry_is_validated(tmp_path: Path, base: str, text: str, reason: str) -> None:
    manual_file = tmp_path / "descriptions.yaml"
    manual_file.write_text(yaml.safe_dump({f"{n:02d}": {"case2": text} for n in range(1, 5)}))
    vlm = {"name": "manual", "backend": "manual", "model": "descriptions.yaml"}
    with pytest.raises(SidpipeError) as err:
        run(tmp_path, base, make_references(tmp_path), case=2, vlm=vlm, manual_file=manual_file)
    assert reason in str(err.value) and "image 01" in str(err.value)


def test_manual_entry_without_the_placeholder_is_placed_and_logged(
    tmp_path: Path, base: str, caplog: pytest.LogCaptureFixture
) -> None:
    manual_file = tmp_path / "descriptions.yaml"
    texts = {
        "01": "a red mug beside a plant",
        "02": "a [ v ] mug",
        "03": "a [V] mug",
        "04": "a [V] mug",
    }
    manual_file.write_text(yaml.safe_dump({stem: {"case2": t} for stem, t in texts.items()}))
    vlm = {"name": "manual", "backend": "manual", "model": "descriptions.yaml"}
    with caplog.at_level("INFO", logger="sidpipe"):
        rows = run(
            tmp_path, base, make_references(tmp_path), case=2, vlm=vlm, manual_file=manual_file
        )
    assert rows[0]["description"] == "a red [V] mug beside a plant"
    assert rows[0]["raw_response"] == "a red mug beside a plant"
    placed = [r.getMessage() for r in caplog.records if 'no "[V]" written' in r.getMessage()]
    assert len(placed) == 1, "only the entry without [V] is named"
    assert "image 01" in placed[0] and '"a red [V] mug beside a plant"' in placed[0]


def test_case_above_one_needs_a_vlm(tmp_path: Path, base: str) -> None:
    with pytest.raises(SidpipeError, match=r"descriptions\.set: case 3 needs a `vlm`"):
        run(tmp_path, base, make_references(tmp_path), case=3)


def test_stale_manifest_is_refused(tmp_path: Path, base: str) -> None:
    refs = make_references(tmp_path)
    shutil.copyfile(DEMO / "red_mug" / "02.png", refs / "img1.png")
    with pytest.raises(SidpipeError, match="rerun prepare_references"):
        run(tmp_path, base, refs)


def test_missing_tokenizer_names_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(SidpipeError, match=r"models\.base"):
        run(tmp_path, str(tmp_path / "no_model"), make_references(tmp_path))


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fixed"),
    [
        ("a [V] mug on a table", "a [V] mug on a table"),
        ("A red Mug on a table", "A red [V] Mug on a table"),  # inserted, case-insensitive
        ("two mugs on a shelf", "two [V] mugs on a shelf"),  # plural
        ('"a red mug, on a shelf"\n', "a red [V] mug, on a shelf"),  # wrapping quotes stripped
        ("a mug's handle on a table", "a [V] mug's handle on a table"),  # possessive: the mug
        ("```text\na [V] mug on a table\n```", "a [V] mug on a table"),  # fence, language tag
        ("# Caption\na [V] mug on a table", "a [V] mug on a table"),
        ("# Caption a [V] mug on a table", "a [V] mug on a table"),
        ("- a **[V] mug** on a *grey* table", "a [V] mug on a grey table"),
        ("**Caption:** a [V] mug", "a [V] mug"),
        ('Here is the caption: "a [V] mug on a table."', "a [V] mug on a table."),
        ('a [V] mug with the text "I love NY" on it', 'a [V] mug with the text "I love NY" on it'),
        ("a [v] mug", "a [V] mug"),
        ("a [V]mug", "a [V] mug"),
        ("Caption: a [V] mug.", "a [V] mug."),
        ("a [V] toy car on a road", "a [V] toy car on a road"),
    ],
)
def test_check_description_accepts(text: str, fixed: str) -> None:
    noun = "toy car" if "car" in text else "mug"
    assert check_description(text, noun) == (fixed, None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a cup on a table", 'does not contain the word "mug"'),
        ("a teacup and a mugshot", 'does not contain the word "mug"'),  # whole words only
        ("a [V] mug next to a [V] mug", "appears 2 times"),
        ("a [V] red mug", 'is not directly before "mug"'),
        ("a [V] on a table", 'is not directly before "mug"'),
        ("   ", "empty"),
        ('"a mug, another mug"', '"mug" appears 2 times'),  # which one is the subject?
        ("a red ball with a mug sticker, next to a toy mug", '"mug" appears 2 times'),
        ("a red ball with a mug sticker", 'only appears in "mug sticker"'),
        ('**Caption:** "a [V] mug on a table', "unmatched quotation mark"),
        ("“a [V] mug on a table", "unmatched quotation mark"),
        ("Sure! a [V] mug on a table. Let me know if you need anything else.", "Sure!"),
        ("a [V] mug on a table. Hope this helps!", "Hope this helps"),
        ("I'm sorry, I can't describe this image.", "not part of a caption"),
        ("- a [V] mug\n- a table", "a list of 2 items"),
        ("Caption below.\n```\na [V] mug\n```", "outside its code block"),
    ],
)
def test_check_description_rejects(text: str, reason: str) -> None:
    _, problem = check_description(text, "mug")
    assert problem is not None and reason in problem


def test_caption_to_description() -> None:
    assert caption_to_description("a red mug on a table", "mug") == "a red [V] mug on a table"
    # a caption cannot be asked again: a stray quotation mark is dropped
    assert caption_to_description('a mug with "hi on it', "mug") == "a [V] mug with hi on it"
    # ambiguous mentions get the template as a prefix instead of a guess
    assert caption_to_description("a mug cozy next to a mug", "mug") == (
        "a [V] mug, a mug cozy next to a mug"
    )
    assert caption_to_description("a cup on a table.", "mug") == "a [V] mug, a cup on a table"
    assert caption_to_description("", "mug") == "a [V] mug"
    assert caption_to_description("a woman with a hat", "painting", style=True) == (
        "A painting in the style of [V] art, a woman with a hat"
    )


def test_a_split_closed_compound_is_the_class_noun_as_the_table_writes_it() -> None:
    """The datasets' class "teddybear": a VLM writes "teddy bear" (BLIP-2's captions nearly
    always); the description names it as the Case-1 template and the prompts do, rather than
    failing the check or prefixing the template to a caption with a second, unmarked subject."""
    assert check_description("a [V] teddy bear on a red chair", "teddybear") == (
        "a [V] teddybear on a red chair",
        None,
    )
    assert check_description("A [V] Teddy-Bear beside two teddy bears", "teddybear") == (
        "A [V] teddybear beside two teddybears",
        None,
    )
    assert caption_to_description("a teddy bear sitting on a chair", "teddybear") == (
        "a [V] teddybear sitting on a chair"
    )
    # short nouns are never split; separate words stay as they are
    assert check_description("a [V] mug on a mu g", "mug") == ("a [V] mug on a mu g", None)
    assert caption_to_description("a bear next to a teddy", "teddybear") == (
        "a [V] teddybear, a bear next to a teddy"
    )


def test_count_tokens_uses_the_identifier(base: str) -> None:
    tokenizer = load_base_tokenizer(base)
    # BOS + "sks" + "mug"... with [V] replaced: the identifier, not the 3 symbols "[", "v", "]".
    assert count_tokens(tokenizer, "[V]", "sks") == len(tokenizer("sks")["input_ids"])
    assert count_tokens(tokenizer, "a [V] mug") < count_tokens(tokenizer, "a [V] mug " * 3)


def _judge(base: str, answer: str, finish: str = "stop", follows: bool = True, limit: int = 77):
    return judge_answer(
        answer,
        finish,
        follows_instructions=follows,
        class_name="mug",
        noun="mug",
        style=False,
        tokenizer=load_base_tokenizer(base),
        identifier="sks",
        max_text_tokens=limit,
    )


def test_judge_answer_accepts_or_says_why_not(base: str) -> None:
    assert _judge(base, "a [V] mug on a checkered tablecloth") == (
        "a [V] mug on a checkered tablecloth",
        None,
    )
    text, problem = _judge(base, "a [V] mug on a", finish="length")
    assert text == "a [V] mug on a" and "cut off" in problem
    assert "content filter" in _judge(base, "a [V] mug", finish="content_filter")[1]
    assert 'finish_reason "error"' in _judge(base, "a [V] mug", finish="error")[1]
    # the model is told how many words fit, and the limit it broke
    long = "a [V] mug " + "with a green plant beside it " * 4
    _, problem = _judge(base, long, limit=12)
    assert "reads only 12" in problem and "at most 8 words" in problem


def test_judge_answer_makes_a_caption_a_description_and_trims_it(base: str) -> None:
    # a captioning model cannot be asked again: "[V]" is placed and the text trimmed to fit
    text, problem = _judge(base, "a mug on a checkered tablecloth next to a plant", follows=False)
    assert (text, problem) == ("a [V] mug on a checkered tablecloth next to a plant", None)
    tokenizer = load_base_tokenizer(base)
    text, problem = _judge(base, "a mug on a checkered tablecloth next to a plant", "", False, 8)
    assert problem is None and count_tokens(tokenizer, text) <= 8
    assert text.startswith("a [V] mug") and len(text) < len("a [V] mug on a checkered tablecloth")


# --- instructions and cache keys ----------------------------------------------------------------


def test_instructions_are_filled_for_every_case() -> None:
    assert isinstance(load_instructions()["version"], int)
    texts = set()
    for case in (2, 3, 4):
        for style in (False, True):
            text = fill_instruction(case, "mug", style=style)
            assert PLACEHOLDER in text and "{" not in text
            assert ("[V] art" in text) if style else ('"[V] mug"' in text)
            texts.add(text)
    assert len(texts) == 6
    plain = fill_instruction(3, "dog")
    with_expression = fill_instruction(3, "dog", expression=True)
    assert with_expression.startswith(plain) and "facial expression" in with_expression
    with pytest.raises(SidpipeError, match=r"case 1 has no instruction \(Case 1 is a template"):
        fill_instruction(1, "mug")


def test_instruction_sha_changes_with_the_class() -> None:
    assert sha256_text(fill_instruction(3, "mug")) != sha256_text(fill_instruction(3, "cup"))


def test_retry_instruction_quotes_answer_and_reason() -> None:
    text = retry_instruction("INSTRUCTION", "a cup {x}", "no mug")
    assert text.startswith("INSTRUCTION\n\n") and "a cup {x}" in text and "no mug" in text


def test_cache_key_changes_with_each_field() -> None:
    fields = {
        "image_sha256": "a" * 64,
        "backend": "openai",
        "model": "gpt-4o",
        "base_url": "https://api.openai.com/v1",
        "instruction_sha256": "b" * 64,
        "case": 3,
        "settings": {"temperature": 0.0, "max_new_tokens": 200},
    }
    key = cache_key(**fields)
    assert key == cache_key(**fields) and len(key) == 64
    changed = {
        "image_sha256": "c" * 64,
        "backend": "transformers",
        "model": "gpt-4o-mini",
        "base_url": "http://localhost:8000/v1",
        "instruction_sha256": "d" * 64,
        "case": 4,
        "settings": {"temperature": 0.0, "max_new_tokens": 100},
    }
    keys = {key}
    for name, value in changed.items():
        keys.add(cache_key(**{**fields, name: value}))
    keys.add(cache_key(**{**fields, "settings": {"temperature": 0.5, "max_new_tokens": 200}}))
    keys.add(cache_key(**{**fields, "settings": {**fields["settings"], "mode": "chat"}}))
    assert len(keys) == len(changed) + 3


def test_template_rows_record_no_finish_reason(tmp_path: Path, base: str) -> None:
    rows = run(tmp_path, base, make_references(tmp_path))
    assert "finish_reason" in FIELDS and {r["finish_reason"] for r in rows} == {""}


def test_manual_file_syntax_error_names_line_and_column(tmp_path: Path, base: str) -> None:
    manual_file = tmp_path / "descriptions.yaml"
    manual_file.write_text('"01":\n  case2: "a [V] mug\n  case3: a [V] mug: on: a table\n')
    vlm = {"name": "manual", "backend": "manual", "model": "descriptions.yaml"}
    with pytest.raises(SidpipeError) as err:
        run(tmp_path, base, make_references(tmp_path), case=2, vlm=vlm, manual_file=manual_file)
    assert f"{manual_file}, line 4, column 1: the descriptions file is not valid YAML" in str(
        err.value
    )


@pytest.mark.parametrize(
    ("key", "read_as"), [("01", "1"), ("00", "0"), ("010", "8"), ("yes", "True")]
)
def test_manual_file_unquoted_stem_is_refused(
    tmp_path: Path, base: str, key: str, read_as: str
) -> None:
    """YAML reads an unquoted 01 as the int 1, which matches no image stem: the hand-written
    text would be dropped silently (or the manual backend ask for the `01:` that is there)."""
    manual_file = tmp_path / "descriptions.yaml"
    manual_file.write_text(f"{key}:\n  case2: a [V] mug on a table\n")
    vlm = {"name": "manual", "backend": "manual", "model": "descriptions.yaml"}
    with pytest.raises(SidpipeError) as err:
        run(tmp_path, base, make_references(tmp_path), case=2, vlm=vlm, manual_file=manual_file)
    assert f"{manual_file}: key {read_as} (" in str(err.value)
    assert 'quote the stems, e.g. "00":' in str(err.value)


def test_manual_and_template_sets_do_not_import_torch(tmp_path: Path, base: str) -> None:
    """The describe_references job of a template or hand-written set loads only the tokenizer:
    run as the adapter runs it, in a fresh interpreter, torch never gets imported."""
    refs = make_references(tmp_path)
    script = f"""
import sys
from pathlib import Path
from sidpipe.io import job_log
with job_log({str(tmp_path / "job.log")!r}):
    from sidpipe.descriptions.stage import describe_references
    for case, vlm in ((1, None), (3, {{"name": "m", "backend": "manual", "model": "d.yaml"}})):
        describe_references(
            references_dir=Path({str(refs)!r}), out_csv=Path({str(tmp_path)!r}) / f"{{case}}.csv",
            cache_dir=Path({str(tmp_path / "cache")!r}), subject="red_mug", class_name="mug",
            kind="object", description_set=f"set{{case}}", case=case, vlm=vlm,
            tokenizer={base!r}, manual_file=Path({str(DEMO / "red_mug" / "descriptions.yaml")!r}),
        )
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr + (tmp_path / "job.log").read_text()
    assert result.stdout.strip() == "[]", result.stdout
    assert len(read_csv(tmp_path / "3.csv")) == 4
