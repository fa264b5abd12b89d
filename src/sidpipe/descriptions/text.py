"""A model's answer as a training description: normalised, checked for "[V]" before the class
noun, and fitted to the base model's text encoder (no torch: only the tokenizer is loaded)."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from ..io import SidpipeError, expand_home, log, looks_local
from ..vlm import FINISHED

PLACEHOLDER = "[V]"
STYLE_NOUN = "art"  # style subjects are named "[V] art"
STYLE_PREFIX = "A painting in the style of [V] art"


def template_description(class_name: str, style: bool = False) -> str:
    """Case 1: the class alone (style subjects: the style's name alone)."""
    return STYLE_PREFIX if style else f"a {PLACEHOLDER} {class_name}"


def quote(text: str, limit: int = 300) -> str:
    """The text as a JSON string for a message, cut at `limit` characters."""
    quoted = json.dumps(text[:limit], ensure_ascii=False)
    return quoted + ("..." if len(text) > limit else "")


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


def noun_regex(noun: str) -> str:
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


def _split_noun_regex(noun: str) -> str | None:
    """A one-word class noun written as two words or hyphenated ("teddy bear", "teddy-bear" for
    the datasets' "teddybear"), plural allowed; None for nouns too short to be compounds."""
    if len(noun.split()) != 1 or len(noun) < 6:
        return None
    forms = [rf"{re.escape(noun[:i])}[\s-]+{re.escape(noun[i:])}" for i in range(3, len(noun) - 2)]
    return rf"(?<![\w\-])(?:{'|'.join(forms)})(?P<plural>e?s)?(?![\w\-])"


def canonical_noun(text: str, noun: str) -> str:
    """The class noun as the subjects table writes it: a VLM may split a closed compound ("a [V]
    teddy bear" for the class "teddybear"), and the training captions must name the subject as
    the Case-1 template and the prompts do."""
    pattern = _split_noun_regex(noun)
    if pattern is None:
        return text
    return re.sub(pattern, lambda m: noun + (m["plural"] or ""), text, flags=re.IGNORECASE)


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
    mentions = list(re.finditer(noun_regex(noun), text, re.IGNORECASE))
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
    text = canonical_noun(text, noun)
    count = text.count(PLACEHOLDER)
    if count == 0:
        return _place_placeholder(text, noun)
    if count > 1:
        return text, (
            f'"{PLACEHOLDER}" appears {count} times; '
            f'write it exactly once, directly before "{noun}"'
        )
    if not re.search(re.escape(PLACEHOLDER) + r"\s+" + noun_regex(noun), text, re.IGNORECASE):
        return (
            text,
            f'"{PLACEHOLDER}" is not directly before "{noun}"; write "{PLACEHOLDER} {noun}"',
        )
    return text, None


def caption_to_description(caption: str, class_name: str, style: bool = False) -> str:
    """A plain caption (BLIP-2) as a description: "[V]" before the class noun when it occurs
    once as a head noun, else the template as a prefix."""
    caption = canonical_noun(clean_text(caption).rstrip(" ."), class_name)
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


def load_base_tokenizer(model: str) -> Any:
    """The base model's CLIP tokenizer (`<model>/tokenizer`), to count what the encoder reads.

    Only the tokenizer is imported (no torch), so template and hand-written sets stay light.
    """
    what, model = "the base model's tokenizer", expand_home(model)
    if looks_local(model) and not Path(model).is_dir():
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


def trim_to_fit(text: str, noun: str, tokenizer: Any, identifier: str, limit: int) -> str | None:
    """Drop trailing words until the text fits (captions cannot be asked again); None if lost."""
    words = text.split()
    while len(words) > 1 and count_tokens(tokenizer, " ".join(words), identifier) > limit:
        words.pop()
    trimmed = " ".join(words).rstrip(",;: ")
    fits = count_tokens(tokenizer, trimmed, identifier) <= limit
    return trimmed if fits and check_description(trimmed, noun)[1] is None else None


def judge_answer(
    answer: str,
    finish_reason: str,
    *,
    follows_instructions: bool,
    class_name: str,
    noun: str,
    style: bool,
    tokenizer: Any,
    identifier: str,
    max_text_tokens: int,
) -> tuple[str, str | None]:
    """The description made from a model's answer, and why it is rejected (None if accepted).

    A captioning model (`follows_instructions` false) cannot be asked again, so its caption is
    made a description and trimmed to fit; an instruction-following model's answer is judged
    as it is, and the reason goes back to the model."""
    if not follows_instructions:
        text, problem = check_description(caption_to_description(answer, class_name, style), noun)
        if problem is None and count_tokens(tokenizer, text, identifier) > max_text_tokens:
            trimmed = trim_to_fit(text, noun, tokenizer, identifier, max_text_tokens)
            if trimmed is None:
                return text, f"over {max_text_tokens} tokens even after trimming"
            log.warning("caption trimmed to fit %d tokens: %s", max_text_tokens, quote(trimmed))
            text = trimmed
        return text, problem
    if finish_reason == "length":
        return answer, ("it was cut off at the answer length limit; write a shorter description")
    if finish_reason and finish_reason not in FINISHED:
        what = "a content filter" if finish_reason == "content_filter" else "the server"
        return answer, (
            f'it was stopped by {what} before it was finished (finish_reason "{finish_reason}"); '
            "write a complete, plain description of what is visible"
        )
    text, problem = check_description(answer, noun)
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
