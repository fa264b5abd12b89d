"""Stage `describe_references`: one training description per reference image and description set.

Case 1 is the template "a [V] {class}"; Cases 2-4 are written by a vision-language model
(`sidpipe.vlm`) from our instructions (data/instructions.yaml), or taken from a hand-written
file (`<stem>: {case1: ..., case4: ...}`), whose entries override any model. Every description
must contain the literal placeholder "[V]" exactly once, directly before the class noun, and fit
the base model's text encoder; a model whose answer fails either check is asked again with the
reason, a bounded number of times. Answers are normalised (Markdown, labels, wrapping quotes)
and judged as they arrive; accepted answers are cached per exact request (one JSON file each),
so reruns and other description sets that need the same answer send no request, while rejected
answers are only logged, so a rerun asks again for exactly the images still without one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .io import SidpipeError, atomic_file, log, read_csv, read_yaml, sha256_file, write_csv
from .vlm import (
    FINISHED,
    Backend,
    VLMRequest,
    VLMResponse,
    make_backend,
    resolve_vlm,
    vlm_label,
)

PLACEHOLDER = "[V]"
STYLE_NOUN = "art"  # style subjects are named "[V] art"
STYLE_PREFIX = "A painting in the style of [V] art"
INSTRUCTIONS_FILE = Path(__file__).with_name("data") / "instructions.yaml"
CACHE_VERSION = 1
FIELDS = [
    "subject",
    "image_id",
    "descriptions",
    "case",
    "description",
    "raw_response",
    "backend",
    "model",
    "instruction_sha256",
    "image_sha256",
    "token_count",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "attempts",
    "cached",
    "source",
]


# --- instructions ----------------------------------------------------------------------------


@functools.cache
def load_instructions(path: Path = INSTRUCTIONS_FILE) -> dict[str, Any]:
    """The instruction templates (cached); checked for the keys the stage fills."""
    data = read_yaml(path, "instructions file")
    if not isinstance(data, dict):
        raise SidpipeError(f"{path}: expected a mapping with keys version, cases, style, ...")
    for key in ("version", "cases", "style", "expression", "retry"):
        if key not in data:
            raise SidpipeError(f"{path}: missing key {key!r}")
    for group in ("cases", "style"):
        missing = sorted({2, 3, 4} - set(data[group]))
        if missing:
            raise SidpipeError(f"{path}: {group} lacks case(s) {missing}")
    return data


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def template_description(class_name: str, style: bool = False) -> str:
    """Case 1: the class alone (style subjects: the style's name alone)."""
    return STYLE_PREFIX if style else f"a {PLACEHOLDER} {class_name}"


def fill_instruction(
    case: int, class_name: str, style: bool = False, expression: bool = False
) -> str:
    """The exact instruction text for Cases 2-4 (its sha256 is recorded with the description)."""
    if case not in (2, 3, 4):
        raise SidpipeError(f"case {case} has no instruction (Case 1 is a template; use 1-4)")
    data = load_instructions()
    text = data["style" if style else "cases"][case].format(**{"class": class_name})
    if expression:
        text += "\n" + data["expression"].format(**{"class": class_name})
    return text


def retry_instruction(instruction: str, response: str, reason: str) -> str:
    """The instruction again, followed by the rejected answer and why it was rejected."""
    retry = load_instructions()["retry"].format(
        response=response.strip() or "(empty)", reason=reason
    )
    return f"{instruction}\n\n{retry}"


# --- validation ------------------------------------------------------------------------------

_V_VARIANTS = re.compile(r"\[\s*v\s*\]", re.IGNORECASE)
_LABEL_WORDS = (
    r"(?:(?:here(?:'s| is) (?:the|a|my|your) )?(?:training |image )?(?:caption|description))"
)
_LABEL = re.compile(rf"^{_LABEL_WORDS}\s*[:：]\s*", re.IGNORECASE)
_LABEL_ONLY = re.compile(rf"^{_LABEL_WORDS}\s*[:：]?$", re.IGNORECASE)
_HEADING = re.compile(r"^#{1,6}\s*")
_BULLET = re.compile(r"^(?:[-*+•]|\d{1,2}[.)])\s+")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:\n?```|$)", re.DOTALL)
_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "„": "“", "`": "`"}
_QUOTES = "\"'`“”‘’«»„"
# Chatter around a caption: a leading interjection or a closing offer of more help.
_CHATTER_START = re.compile(
    r"^(?:sure|certainly|of course|okay|absolutely|gladly|here you go|here it is)\s*[!.:,]",
    re.IGNORECASE,
)
_CHATTER_ANYWHERE = re.compile(
    r"\b(?:let me know|hope (?:this|that|it) helps|feel free|if you (?:need|want|would like)|"
    r"is there anything|anything else|as an ai|i can(?:no|')t|i am unable|i'm unable|i'm sorry|"
    r"i am sorry)\b",
    re.IGNORECASE,
)


def _strip_emphasis(text: str) -> str:
    """Markdown emphasis and inline code markers around words (never inside a word)."""
    text = text.replace("**", "").replace("__", "").replace("*", "")
    text = re.sub(r"(?<![\w])_(?=\S)|(?<=\S)_(?![\w])", "", text)
    return re.sub(r"`([^`]*)`", r"\1", text)


def _unwrap_quotes(text: str) -> str:
    """Remove quotes that wrap the whole text (a final full stop may sit outside them)."""
    while len(text) >= 2:
        stop = text.endswith(".") and len(text) > 2 and text[-2] in _QUOTES
        body = text[:-1] if stop else text
        close = _PAIRS.get(body[0])
        if close is None or body[-1] != close or len(body) < 2:
            break
        text = body[1:-1].strip()
    return text


def _unbalanced_quote(text: str) -> str | None:
    """A quotation mark without its partner (apostrophes are not quotes)."""
    if text.count('"') % 2:
        return '"'
    for opening, closing in (("“", "”"), ("«", "»")):
        if text.count(opening) != text.count(closing):
            return opening
    if text and text[0] in "'‘" and text.rstrip(".")[-1:] not in ("'", "’"):
        return text[0]
    return None


def normalise_text(text: str) -> tuple[str, str | None]:
    """A model answer as one caption line, and why it is unusable (None if it is usable).

    Normalised, because it is safe: code fences (with their language tag), Markdown headings,
    one list marker, emphasis markers, a leading "Caption:" label, quotes wrapping the whole
    answer, control characters and runs of spaces; "[v]" becomes "[V]". Rejected, with the
    reason the model is told when asked again: chatter around the caption ("Sure! ...",
    "Let me know ..."), refusals, lists of several items and unmatched quotation marks.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    fenced = _FENCE.search(text)
    if fenced is not None:
        outside = (text[: fenced.start()] + text[fenced.end() :]).strip()
        if outside and not outside.endswith(":"):
            return " ".join(text.split()), (
                "it has text outside its code block; reply with the caption only, as plain text"
            )
        text = fenced.group(1)
    lines = []
    for line in text.split("\n"):
        line = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in line)
        line = " ".join(line.split())
        if not line:
            continue
        heading = _HEADING.match(line) is not None
        line = _strip_emphasis(_HEADING.sub("", line)).strip()
        if _LABEL_ONLY.match(line.strip(_QUOTES + " ")):
            continue  # "# Caption", "**Caption:**" alone on its line
        if heading:  # "# Caption a [V] robot ...": the heading's label word goes too
            line = re.sub(rf"^{_LABEL_WORDS}\b\s*[:：]?\s*", "", line, flags=re.IGNORECASE)
        lines.append(line)
    bullets = [line for line in lines if _BULLET.match(line)]
    if len(bullets) > 1:
        return " ".join(lines), (
            f"it is a list of {len(bullets)} items; write one sentence, without list markers"
        )
    lines = [_BULLET.sub("", line) for line in lines]
    text = " ".join(lines).strip()
    for _ in range(2):  # a label inside quotes, or quotes after a label
        text = _unwrap_quotes(text.strip())
        text = _LABEL.sub("", text).strip()
    text = _V_VARIANTS.sub(PLACEHOLDER, text)
    text = re.sub(r"\[V\](?=\w)", "[V] ", text)
    chatter = _CHATTER_START.match(text) or _CHATTER_ANYWHERE.search(text)
    if chatter is not None:
        return text, (
            f'it contains words that are not part of a caption ("{chatter.group(0).strip()}"); '
            "reply with the caption only, without greetings, comments or offers"
        )
    quote = _unbalanced_quote(text)
    if quote is not None:
        return text, (
            f"it has an unmatched quotation mark ({quote}); reply with the caption only, "
            "without quotes around it"
        )
    return text, None


def clean_text(text: str) -> str:
    """`normalise_text` without the verdict (captioning models cannot be asked again)."""
    return normalise_text(text)[0]


def _noun_regex(noun: str) -> str:
    """The noun as a whole word (or words), any case, plural allowed."""
    body = r"[\s-]+".join(re.escape(word) for word in noun.split())
    return rf"(?<![\w\-]){body}(?:e?s)?(?![\w\-])"


# Words that may follow the head noun of a noun phrase ("a mug on ...", "a dog with ..."); a
# mention followed by anything else is taken as a modifier ("a mug cozy", "a robot sticker").
_AFTER_HEAD = frozenset(
    """
    on in at with without next beside behind near by under over above below against among
    between from of to into onto inside outside atop along across around before after for like
    underneath beneath facing sitting standing lying resting placed positioned perched
    is are was were sits stands lies rests looks appears that which who whose and or but while
    as its his her their wearing holding looking surrounded set shown seen
    """.split()
)


def _is_head(text: str, match: re.Match) -> bool:
    """Whether a mention of the noun is the head of its noun phrase (not a modifier)."""
    rest = text[match.end() :].lstrip()
    if not rest or rest[0] in ",.;:!?)'’\"”":
        return True
    word = re.match(r"[\w-]+", rest)
    return word is not None and word.group(0).lower() in _AFTER_HEAD


def _place_placeholder(text: str, noun: str) -> tuple[str, str | None]:
    """Insert "[V]" before the noun when that is unambiguous: the noun occurs once, as the head
    of its noun phrase. Otherwise the reason to ask again."""
    mentions = list(re.finditer(_noun_regex(noun), text, re.IGNORECASE))
    if not mentions:
        return text, f'it does not contain the word "{noun}"; write "{PLACEHOLDER} {noun}"'
    if len(mentions) > 1:
        return text, (
            f'"{PLACEHOLDER}" is missing and "{noun}" appears {len(mentions)} times, so it is '
            f'unclear which is the subject; write "{PLACEHOLDER} {noun}" for the subject'
        )
    match = mentions[0]
    if not _is_head(text, match):
        after = text[match.start() :].split()[:2]
        return text, (
            f'"{PLACEHOLDER}" is missing and "{noun}" only appears in "{" ".join(after)}", '
            f'which names something else; write "{PLACEHOLDER} {noun}" for the subject'
        )
    return f"{text[: match.start()]}{PLACEHOLDER} {text[match.start() :]}", None


def check_description(text: str, noun: str) -> tuple[str, str | None]:
    """Return (normalised text, None) if usable, else (normalised text, the reason it is not).

    A text that lacks "[V]" gets it inserted before the noun when the noun occurs exactly once
    as the head of a noun phrase; otherwise the model is asked again.
    """
    text, problem = normalise_text(text)
    if problem is not None:
        return text, problem
    if not text:
        return text, "the answer is empty"
    count = text.count(PLACEHOLDER)
    if count == 0:
        return _place_placeholder(text, noun)
    if count > 1:
        return text, (
            f'"{PLACEHOLDER}" appears {count} times; '
            f'write it exactly once, directly before "{noun}"'
        )
    if not re.search(re.escape(PLACEHOLDER) + r"\s+" + _noun_regex(noun), text, re.IGNORECASE):
        return (
            text,
            f'"{PLACEHOLDER}" is not directly before "{noun}"; write "{PLACEHOLDER} {noun}"',
        )
    return text, None


def caption_to_description(caption: str, class_name: str, style: bool = False) -> str:
    """A plain caption (BLIP-2) as a description: "[V]" before the class noun when it occurs
    once as a head noun, else the template as a prefix."""
    caption = clean_text(caption).rstrip(" .")
    if _unbalanced_quote(caption):  # a caption cannot be asked again: drop the stray quote
        caption = re.sub('["“”«»]', "", caption).strip(_QUOTES + " ")
    if style:  # "art" in a caption rarely names the style itself
        return f"{STYLE_PREFIX}, {caption}" if caption else STYLE_PREFIX
    if PLACEHOLDER not in caption:
        placed, problem = _place_placeholder(caption, class_name)
        if problem is None:
            return placed
    prefix = template_description(class_name)
    return f"{prefix}, {caption}" if caption else prefix


def _looks_local(model: str) -> bool:
    """As sidpipe.models._looks_local (not imported: that module imports torch)."""
    return (
        Path(model).is_absolute()
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or Path(model).exists()
    )


def load_base_tokenizer(model: str) -> Any:
    """The base model's CLIP tokenizer (`<model>/tokenizer`), to count what the encoder reads.

    Only the tokenizer is imported (no torch), so template and hand-written sets stay light.
    """
    what = "the base model's tokenizer"
    if _looks_local(model) and not Path(model).expanduser().is_dir():
        raise SidpipeError(
            f"{what}: model folder {model!r} (config key models.base) does not exist; "
            "point it at a hub id or a folder written by save_pretrained / build_tiny_models"
        )
    try:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    except Exception as err:
        raise SidpipeError(
            f"cannot load {what} from {model!r} (config key models.base): "
            f"{type(err).__name__}: {str(err).rstrip('.')}. It must be a Hugging Face hub id "
            "(already cached when HF_HUB_OFFLINE=1) or a local folder written by "
            "save_pretrained / build_tiny_models."
        ) from err


def count_tokens(tokenizer: Any, text: str, identifier: str = "sks") -> int:
    """Tokens the text encoder sees, BOS/EOS included, with [V] replaced by the identifier."""
    ids = tokenizer(text.replace(PLACEHOLDER, identifier), truncation=False, verbose=False)
    return len(ids["input_ids"])


def _trim_to_fit(text: str, noun: str, tokenizer: Any, identifier: str, limit: int) -> str | None:
    """Drop trailing words until the text fits (captions cannot be asked again); None if lost."""
    words = text.split()
    while len(words) > 1 and count_tokens(tokenizer, " ".join(words), identifier) > limit:
        words.pop()
    trimmed = " ".join(words).rstrip(",;: ")
    fits = count_tokens(tokenizer, trimmed, identifier) <= limit
    return trimmed if fits and check_description(trimmed, noun)[1] is None else None


# --- cache -----------------------------------------------------------------------------------


def cache_key(
    image_sha256: str,
    backend: str,
    model: str,
    base_url: str,
    instruction_sha256: str,
    case: int,
    settings: Mapping[str, Any],
) -> str:
    """sha256 of everything that determines a model's answer (never the API key)."""
    fields = {
        "cache_version": CACHE_VERSION,
        "image_sha256": image_sha256,
        "backend": backend,
        "model": model,
        "base_url": base_url,
        "instruction_sha256": instruction_sha256,
        "case": int(case),
        "settings": dict(settings),
    }
    return sha256_text(json.dumps(fields, sort_keys=True, separators=(",", ":")))


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.json"


def read_cache(cache_dir: Path, key: str) -> VLMResponse | None:
    path = cache_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        return VLMResponse(**json.loads(path.read_text(encoding="utf-8"))["response"])
    except (ValueError, KeyError, TypeError) as err:
        log.warning("ignoring unreadable cache entry %s (%s); asking the model again", path, err)
        return None


def write_cache(cache_dir: Path, key: str, entry: dict[str, Any]) -> None:
    with atomic_file(cache_path(cache_dir, key), encoding="utf-8") as handle:
        json.dump(entry, handle, indent=2, ensure_ascii=False, sort_keys=True)
        handle.write("\n")


# --- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    image_id: str
    path: Path
    sha256: str
    stem: str  # the source image's stem: the key in a hand-written descriptions file


def read_references(references_dir: Path, subject: str) -> list[Reference]:
    """The prepared images of manifest.csv, each checked against its recorded sha256."""
    manifest = Path(references_dir) / "manifest.csv"
    if not manifest.is_file():
        raise SidpipeError(f"{manifest} does not exist; run stage prepare_references first")
    references = []
    for row in read_csv(manifest):
        missing = [c for c in ("image_id", "path", "sha256") if not row.get(c)]
        if missing:
            raise SidpipeError(f"{manifest}: a row lacks {', '.join(missing)}")
        if row.get("subject") and row["subject"] != subject:
            raise SidpipeError(f"{manifest}: row for subject {row['subject']!r}, not {subject!r}")
        path = Path(references_dir) / row["path"]
        if not path.is_file() or sha256_file(path) != row["sha256"]:
            raise SidpipeError(
                f"{path} is missing or differs from {manifest}; rerun prepare_references"
            )
        stem = Path(row.get("source_path") or row["image_id"]).stem
        references.append(Reference(row["image_id"], path, row["sha256"], stem))
    if not references:
        raise SidpipeError(f"{manifest} lists no images")
    return references


def load_manual(path: Path) -> dict[str, dict[str, str]]:
    """A hand-written descriptions file: image stem -> {case1: text, ..., case4: text}."""
    data = read_yaml(path, "descriptions file") or {}
    if not isinstance(data, dict):
        raise SidpipeError(f"{path}: expected a mapping of image stem -> {{case1: ..., ...}}")
    manual: dict[str, dict[str, str]] = {}
    for stem, entry in data.items():
        if not isinstance(entry, dict):
            raise SidpipeError(f"{path}: entry {stem!r} must map case1..case4 to descriptions")
        for case, text in entry.items():
            if not isinstance(text, str):
                raise SidpipeError(f"{path}: {stem}.{case} must be a string, not {text!r}")
        manual[str(stem)] = {str(k): v for k, v in entry.items()}
    return manual


# --- the stage -------------------------------------------------------------------------------


@dataclass
class _Pending:
    """One image's progress through the attempts of the model."""

    ref: Reference
    instruction: str
    attempts: int = 0
    sent: int = 0  # answers that needed a request (not from the cache)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last: str = ""
    problem: str = ""
    last_cache: Path | None = None  # the cache file the last (rejected) answer came from
    spent_prompt: int = 0  # tokens of requests sent in this run
    spent_completion: int = 0


@dataclass
class _Answer:
    """A model answer with its verdict: the description made from it, or why it is rejected."""

    response: VLMResponse
    text: str
    problem: str | None
    cache_file: Path | None  # where it came from, if from the cache


def _quote(text: str, limit: int = 300) -> str:
    quoted = json.dumps(text[:limit], ensure_ascii=False)
    return quoted + ("..." if len(text) > limit else "")


def describe_references(
    references_dir: Path,
    out_csv: Path,
    cache_dir: Path,
    subject: str,
    class_name: str,
    kind: str,
    description_set: str,
    case: int,
    vlm: dict | None,
    tokenizer: str,
    style: bool = False,
    expression: bool = False,
    manual_file: Path | None = None,
    max_text_tokens: int = 77,
    max_attempts: int = 3,
    identifier: str = "sks",
) -> list[dict]:
    """Describe every reference image of a subject for one description set; write `out_csv`.

    `vlm` is the set's VLM entry (with its `name`), None for Case 1. `tokenizer` is the base
    model whose `tokenizer` subfolder counts tokens (with [V] as `identifier`). Raises
    SidpipeError, writing nothing, if any image gets no valid description.
    """
    if case not in (1, 2, 3, 4):
        raise SidpipeError(f"descriptions.{description_set}.case: {case!r} is not 1, 2, 3 or 4")
    if max_attempts < 1:
        raise SidpipeError(f"max_attempts={max_attempts} must be at least 1")
    style = style or kind == "style"
    if expression and kind != "live":
        log.info("%s is a %s subject: no facial expression to describe", subject, kind)
        expression = False
    noun = STYLE_NOUN if style else class_name
    references = read_references(Path(references_dir), subject)
    base_tokenizer = load_base_tokenizer(tokenizer)
    backend_kind = resolve_vlm(vlm)["backend"] if vlm else None
    manual_file = Path(manual_file) if manual_file else None
    if backend_kind == "manual" and (manual_file is None or not manual_file.is_file()):
        raise SidpipeError(
            f"{vlm_label(vlm or {})} is a manual backend, but the descriptions file "
            f"{manual_file} for subject {subject} does not exist; write it (image stem -> "
            "{case1: ..., case4: ...})"
        )
    manual = load_manual(manual_file) if manual_file and manual_file.is_file() else {}

    rows: dict[str, dict] = {}
    todo: list[Reference] = []
    common = {"subject": subject, "descriptions": description_set, "case": case}
    for ref in references:
        text = manual.get(ref.stem, {}).get(f"case{case}")
        if text is not None:
            where = f"{manual_file}: image {ref.stem} (reference {ref.image_id}), case{case}"
            fixed, problem = check_description(text, noun)
            n_tokens = count_tokens(base_tokenizer, fixed, identifier)
            if problem is None and n_tokens > max_text_tokens:
                problem = f"{n_tokens} tokens, over the text encoder's {max_text_tokens}"
            if problem:
                raise SidpipeError(f"{where}: {problem}: {_quote(text)}")
            rows[ref.image_id] = _row(common, ref, fixed, text, "manual", str(manual_file), "")
            rows[ref.image_id].update(token_count=n_tokens, source="manual")
        elif backend_kind == "manual":
            raise SidpipeError(
                f"{manual_file}: no description for image {ref.stem} (reference {ref.image_id}) "
                f'and case {case}; add {ref.stem}: {{case{case}: "a {PLACEHOLDER} {class_name} '
                '..."}'
            )
        elif case == 1:
            text = template_description(class_name, style)
            rows[ref.image_id] = _row(common, ref, text, "", "template", "", "")
            rows[ref.image_id].update(
                token_count=count_tokens(base_tokenizer, text, identifier), source="template"
            )
        elif vlm is None:
            raise SidpipeError(
                f"descriptions.{description_set}: case {case} needs a `vlm` (or a hand-written "
                f"entry for image {ref.stem} in the subject's descriptions file)"
            )
        else:
            todo.append(ref)

    if todo:
        backend = make_backend(vlm or {})
        assert backend is not None  # manual entries were all resolved above
        try:
            rows.update(
                _describe_with_vlm(
                    backend,
                    todo,
                    Path(cache_dir),
                    common,
                    class_name=class_name,
                    noun=noun,
                    style=style,
                    expression=expression,
                    tokenizer=base_tokenizer,
                    identifier=identifier,
                    max_text_tokens=max_text_tokens,
                    max_attempts=max_attempts,
                )
            )
        finally:
            backend.close()

    ordered = [rows[ref.image_id] for ref in references]
    write_csv(out_csv, ordered, FIELDS)
    sources = [row["source"] for row in ordered]
    log.info(
        "%s/%s: %d descriptions (%d template, %d manual, %d from a model)",
        subject,
        description_set,
        len(ordered),
        sources.count("template"),
        sources.count("manual"),
        sources.count("vlm"),
    )
    return ordered


def _row(
    common: dict, ref: Reference, text: str, raw: str, backend: str, model: str, instruction: str
) -> dict:
    return {
        **common,
        "image_id": ref.image_id,
        "description": text,
        "raw_response": raw,
        "backend": backend,
        "model": model,
        "instruction_sha256": instruction,
        "image_sha256": ref.sha256,
        "token_count": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "finish_reason": "",
        "attempts": 1,
        "cached": False,
        "source": "",
    }


def _describe_with_vlm(
    backend: Backend,
    references: list[Reference],
    cache_dir: Path,
    common: dict,
    *,
    class_name: str,
    noun: str,
    style: bool,
    expression: bool,
    tokenizer: Any,
    identifier: str,
    max_text_tokens: int,
    max_attempts: int,
) -> dict[str, dict]:
    """Ask the model (or the cache) in rounds; each round re-asks only the rejected images.

    Every answer is judged as it arrives; only accepted ones are cached, so a rerun asks again
    exactly for the images that have no accepted answer yet.
    """
    case = int(common["case"])
    # A captioning model gets no instruction; asking it again would give the same caption.
    base = (
        fill_instruction(case, class_name, style, expression)
        if backend.follows_instructions
        else ""
    )
    base_sha = sha256_text(base)
    rounds = max_attempts if backend.follows_instructions else 1
    settings = backend.settings()
    pending = [_Pending(ref, base) for ref in references]
    everyone = list(pending)
    done: dict[str, dict] = {}
    where = f"{common['subject']}/{common['descriptions']}"

    def judge(response: VLMResponse) -> tuple[str, str | None]:
        return _evaluate(
            response, backend, class_name, noun, style, tokenizer, identifier, max_text_tokens
        )

    bar = tqdm(total=len(references), desc=f"describe {where}", unit="image", file=sys.stderr)
    try:
        with bar:
            for attempt in range(1, rounds + 1):
                if not pending:
                    break
                keys = [
                    cache_key(
                        p.ref.sha256,
                        backend.name,
                        backend.model,
                        backend.base_url,
                        sha256_text(p.instruction),
                        case,
                        settings,
                    )
                    for p in pending
                ]
                answers = _ask(backend, pending, keys, cache_dir, case, settings, judge, attempt)
                still: list[_Pending] = []
                for item, answer in zip(pending, answers, strict=True):
                    item.attempts += 1
                    item.prompt_tokens += answer.response.prompt_tokens
                    item.completion_tokens += answer.response.completion_tokens
                    if answer.problem is None:
                        row = _row(
                            common,
                            item.ref,
                            answer.text,
                            answer.response.text,
                            backend.name,
                            backend.model,
                            base_sha,
                        )
                        row.update(
                            token_count=count_tokens(tokenizer, answer.text, identifier),
                            prompt_tokens=item.prompt_tokens,
                            completion_tokens=item.completion_tokens,
                            finish_reason=answer.response.finish_reason,
                            attempts=item.attempts,
                            cached=item.sent == 0,
                            source="vlm",
                        )
                        done[item.ref.image_id] = row
                        bar.update()
                    else:
                        item.last, item.problem = answer.response.text, answer.problem
                        item.last_cache = answer.cache_file
                        # Appended: each attempt shows every rejected answer, so none repeats.
                        item.instruction = retry_instruction(
                            item.instruction, answer.response.text, answer.problem
                        )
                        still.append(item)
                pending = still
    finally:  # also when the job fails: what it cost is in the log
        log.info(
            "%s: %s %s: %d request(s) sent, %d of %d image(s) answered wholly from the cache; "
            "tokens spent this run: %d prompt, %d completion",
            where,
            backend.name,
            backend.model,
            backend.requests_sent,
            sum(1 for row in done.values() if row["cached"]),
            len(references),
            sum(p.spent_prompt for p in everyone),
            sum(p.spent_completion for p in everyone),
        )
    if pending:
        lines = []
        for p in pending:
            line = (
                f"image {p.ref.image_id} (source {p.ref.stem}): {p.problem}; last response: "
                f"{_quote(p.last)}"
            )
            if p.last_cache is not None:
                line += (
                    f" (this answer came from the cache file {p.last_cache}; delete that file "
                    "to have the model asked again)"
                )
            lines.append(line)
        from_cache = sum(1 for p in pending if p.sent < p.attempts)
        raise SidpipeError(
            f"{where}: no valid description from {backend.name} model {backend.model} after "
            f"{rounds} attempt(s) for {len(pending)} image(s) ({backend.requests_sent} request(s) "
            f"sent in this run; {from_cache} of these image(s) had answers from the cache "
            f"{cache_dir}):\n  " + "\n  ".join(lines)
        )
    return done


def _ask(
    backend: Backend,
    pending: list[_Pending],
    keys: list[str],
    cache_dir: Path,
    case: int,
    settings: dict[str, Any],
    judge: Any,
    attempt: int,
) -> list[_Answer]:
    """One judged answer per pending image: from the cache, else from the model. A new answer
    is cached as it arrives if it is accepted, and logged with the reason if it is not."""
    answers: list[_Answer | None] = []
    missing = []
    for i, key in enumerate(keys):
        cached = read_cache(cache_dir, key)
        if cached is None:
            answers.append(None)
            missing.append(i)
        else:
            answers.append(_Answer(cached, *judge(cached), cache_path(cache_dir, key)))

    def remember(j: int, response: VLMResponse) -> None:
        i = missing[j]
        item = pending[i]
        item.sent += 1
        item.spent_prompt += response.prompt_tokens
        item.spent_completion += response.completion_tokens
        answers[i] = answer = _Answer(response, *judge(response), None)
        if answer.problem is None:
            entry = _cache_entry(backend, item, case, keys[i], settings, response)
            write_cache(cache_dir, keys[i], entry)
        else:  # kept in the log, never in the cache: a rerun asks again
            log.warning(
                "image %s, attempt %d: answer rejected (%s), finish_reason %r: %s",
                item.ref.image_id,
                attempt,
                answer.problem,
                response.finish_reason,
                _quote(response.text),
            )

    if missing:
        requests = [
            VLMRequest(pending[i].ref.image_id, pending[i].ref.path, pending[i].instruction)
            for i in missing
        ]
        backend.generate(requests, remember)
    assert all(answer is not None for answer in answers)
    return [answer for answer in answers if answer is not None]


def _cache_entry(
    backend: Backend,
    item: _Pending,
    case: int,
    key: str,
    settings: dict[str, Any],
    response: VLMResponse,
) -> dict[str, Any]:
    """What a cache file holds: the request's identity, its exact instruction and the answer."""
    return {
        "cache_version": CACHE_VERSION,
        "key": key,
        "image_id": item.ref.image_id,
        "image_sha256": item.ref.sha256,
        "backend": backend.name,
        "model": backend.model,
        "base_url": backend.base_url,
        "case": case,
        "settings": settings,
        "instruction": item.instruction,
        "instruction_sha256": sha256_text(item.instruction),
        "response": asdict(response),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _evaluate(
    answer: VLMResponse,
    backend: Backend,
    class_name: str,
    noun: str,
    style: bool,
    tokenizer: Any,
    identifier: str,
    max_text_tokens: int,
) -> tuple[str, str | None]:
    """The description made from a model answer, and why it is rejected (None if accepted)."""
    if not backend.follows_instructions:
        text, problem = check_description(
            caption_to_description(answer.text, class_name, style), noun
        )
        if problem is None and count_tokens(tokenizer, text, identifier) > max_text_tokens:
            trimmed = _trim_to_fit(text, noun, tokenizer, identifier, max_text_tokens)
            if trimmed is None:
                return text, f"over {max_text_tokens} tokens even after trimming"
            log.warning("caption trimmed to fit %d tokens: %s", max_text_tokens, _quote(trimmed))
            text = trimmed
        return text, problem
    finish = answer.finish_reason
    if finish == "length":
        return answer.text, (
            "it was cut off at the answer length limit; write a shorter description"
        )
    if finish and finish not in FINISHED:
        what = "a content filter" if finish == "content_filter" else "the server"
        return answer.text, (
            f'it was stopped by {what} before it was finished (finish_reason "{finish}"); '
            "write a complete, plain description of what is visible"
        )
    text, problem = check_description(answer.text, noun)
    if problem is not None:
        return text, problem
    n_tokens = count_tokens(tokenizer, text, identifier)
    if n_tokens > max_text_tokens:
        words = max(8, int(len(text.split()) * max_text_tokens / n_tokens) - 4)
        return text, (
            f"it is {n_tokens} tokens long, but the text encoder reads only {max_text_tokens} "
            "(start and end included) and silently drops the rest; write a shorter "
            f"description of at most {words} words"
        )
    return text, None


def write_descriptions_table(
    references_dir: Path, description_csvs: list[Path], out_html: Path, thumb: int = 96
) -> None:
    """A self-contained HTML table for the report: a thumbnail per reference image and its
    description in every set (HTML-escaped: descriptions are model output)."""
    import base64
    import html
    import io

    from PIL import Image

    sets: dict[str, dict[str, str]] = {}
    for path in description_csvs:
        for row in read_csv(path):
            column = sets.setdefault(f"{row['descriptions']} (case {row['case']})", {})
            column[row["image_id"]] = row["description"]
    header = "".join(f"<th>{html.escape(name)}</th>" for name in sets)
    body = []
    for ref in read_csv(Path(references_dir) / "manifest.csv"):
        buffer = io.BytesIO()
        image = Image.open(Path(references_dir) / ref["path"]).convert("RGB")
        image.resize((thumb, thumb)).save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode()
        cells = "".join(
            f"<td>{html.escape(texts.get(ref['image_id'], '—'))}</td>" for texts in sets.values()
        )
        body.append(
            f"<tr><td><img src='data:image/png;base64,{data}' width={thumb}><br>"
            f"{html.escape(ref['image_id'])}</td>{cells}</tr>"
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><style>"
        "table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;max-width:320px}</style>"
        f"</head><body><table><tr><th>image</th>{header}</tr>{''.join(body)}</table></body></html>"
    )
    with atomic_file(out_html) as handle:
        handle.write(page)
