"""The job of `describe_references`: a description per reference image for one description set,
from the template, a hand-written file or a vision-language model asked in rounds."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..io import SidpipeError, log, sha256_text, write_csv
from ..vlm import Backend, VLMRequest, VLMResponse, make_backend, resolve_vlm, vlm_label
from .cache import cache_entry, cache_key, cache_path, read_cache, write_cache
from .inputs import Reference, load_manual, read_references
from .instructions import fill_instruction, retry_instruction
from .text import (
    PLACEHOLDER,
    STYLE_NOUN,
    check_description,
    count_tokens,
    judge_answer,
    load_base_tokenizer,
    normalise_text,
    quote,
    template_description,
)

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
    if unknown := sorted(set(manual) - {ref.stem for ref in references}):
        # A mistyped stem would otherwise leave its image to the VLM or template unnoticed.
        log.warning(
            "%s: no reference image of %s has the stem %s (its images: %s); those entries are "
            "not used",
            manual_file,
            subject,
            ", ".join(unknown),
            ", ".join(ref.stem for ref in references),
        )

    rows: dict[str, dict] = {}
    todo: list[Reference] = []
    common = {"subject": subject, "descriptions": description_set, "case": case}
    for ref in references:
        text = manual.get(ref.stem, {}).get(f"case{case}")
        if text is not None:
            where = f"{manual_file}: image {ref.stem} (reference {ref.image_id}), case{case}"
            if re.search(rf"(?<!\w){re.escape(identifier)}(?!\w)", text):
                # Training writes the identifier where [V] stands: written out, it would be
                # there twice ("a sks [V] mug" trains as "a sks sks mug").
                raise SidpipeError(
                    f"{where}: the identifier {identifier!r} is written out; write {PLACEHOLDER} "
                    f"where it goes instead: {quote(text)}"
                )
            fixed, problem = check_description(text, noun)
            n_tokens = count_tokens(base_tokenizer, fixed, identifier)
            if problem is None and n_tokens > max_text_tokens:
                problem = f"{n_tokens} tokens, over the text encoder's {max_text_tokens}"
            if problem:
                raise SidpipeError(f"{where}: {problem}: {quote(text)}")
            if PLACEHOLDER not in normalise_text(text)[0]:  # "[ v ]" and the like are [V]
                log.info('%s: no "%s" written; trained as %s', where, PLACEHOLDER, quote(fixed))
            rows[ref.image_id] = _row(common, ref, fixed, text, "manual", str(manual_file), "")
            rows[ref.image_id].update(token_count=n_tokens, source="manual")
        elif backend_kind == "manual":
            raise SidpipeError(
                f"{manual_file}: no description for image {ref.stem} (reference {ref.image_id}) "
                f'and case {case}; add "{ref.stem}": {{case{case}: "a {PLACEHOLDER} {class_name} '
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
        return judge_answer(
            response.text,
            response.finish_reason,
            follows_instructions=backend.follows_instructions,
            class_name=class_name,
            noun=noun,
            style=style,
            tokenizer=tokenizer,
            identifier=identifier,
            max_text_tokens=max_text_tokens,
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
                f"{quote(p.last)}"
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
            entry = cache_entry(
                keys[i], item.ref, backend, case, settings, item.instruction, response
            )
            write_cache(cache_dir, keys[i], entry)
        else:  # kept in the log, never in the cache: a rerun asks again
            log.warning(
                "image %s, attempt %d: answer rejected (%s), finish_reason %r: %s",
                item.ref.image_id,
                attempt,
                answer.problem,
                response.finish_reason,
                quote(response.text),
            )

    if missing:
        requests = [
            VLMRequest(pending[i].ref.image_id, pending[i].ref.path, pending[i].instruction)
            for i in missing
        ]
        backend.generate(requests, remember)
    assert all(answer is not None for answer in answers)
    return [answer for answer in answers if answer is not None]
