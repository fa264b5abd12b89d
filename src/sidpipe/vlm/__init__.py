"""Vision-language backends: answer (image, instruction) requests with text.

A backend answers a batch of `VLMRequest`s with `VLMResponse`s in the same order, and reports
each answer through a callback as soon as it arrives, so the caller can judge and cache it even
when a later request of the batch fails. Transient failures (rate limits, server errors,
timeouts, bodies that are not chat completions) are retried here, within a time limit for each
whole request; rejected *descriptions* are asked again by `sidpipe.descriptions`.

Backends, chosen by a VLM config entry's `backend`:
  openai        any OpenAI-compatible chat-completions server, through the official client;
  transformers  a local image-text-to-text model: `mode: chat` (LLaVA-style chat template) or
                `mode: blip2_caption` (BLIP-2 conditioned on the image only, no instruction);
  manual        no model: descriptions come from a hand-written file (see sidpipe.descriptions).

This module holds what every backend shares (requests, responses, the settings and their
checks); `openai_server` and `local` hold the two backends, imported only when one is made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..io import SidpipeError

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
BACKENDS = ("openai", "transformers", "manual")
TRANSFORMERS_MODES = ("chat", "blip2_caption")

# Settings each backend understands, with their defaults; `backend`, `model` and `name` (the
# entry's name under `vlms`, used in messages) come on top.
DEFAULTS: dict[str, dict[str, Any]] = {
    "openai": {
        "base_url": None,  # None: $OPENAI_BASE_URL, else the OpenAI API
        "api_key_env": "OPENAI_API_KEY",
        "temperature": 0.0,
        "max_new_tokens": 200,
        "timeout": 60.0,  # seconds for a whole HTTP request: connect, send, headers and body
        "max_retries": 4,  # extra tries per request after a 429, 408, 5xx, timeout, lost link
        # or a body that is not a chat completion
        "backoff_base": 1.0,  # seconds before the first retry; doubles each retry
        "backoff_max": 30.0,
        "concurrency": 4,  # parallel requests
    },
    "transformers": {
        "mode": "chat",
        "max_new_tokens": 200,
        "batch_size": 4,
        "device": "auto",
        "dtype": "float32",
    },
    "manual": {},
}


@dataclass(frozen=True)
class VLMRequest:
    image_id: str
    image_path: Path
    instruction: str


@dataclass(frozen=True)
class VLMResponse:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # "stop" (or another of FINISHED): a finished answer; "length": cut off at max_new_tokens;
    # "content_filter" and anything else: stopped by the server; "": the server did not say
    finish_reason: str = "stop"


# finish_reason values that mean the model ended its answer itself (OpenAI and vLLM "stop",
# TGI "eos_token", Anthropic-style proxies "end_turn" / "stop_sequence").
FINISHED = frozenset({"stop", "eos", "eos_token", "end_turn", "stop_sequence"})


OnResponse = Callable[[int, VLMResponse], None]


class Backend(Protocol):
    name: str
    model: str
    base_url: str
    follows_instructions: bool
    requests_sent: int

    def settings(self) -> dict[str, Any]: ...

    def generate(
        self, requests: Sequence[VLMRequest], on_response: OnResponse | None = None
    ) -> list[VLMResponse]: ...

    def close(self) -> None: ...


def vlm_label(vlm: dict) -> str:
    """Where the entry lives in the config, for error messages."""
    return f"vlms.{vlm['name']}" if vlm.get("name") else "the VLM entry"


def resolve_vlm(vlm: dict) -> dict[str, Any]:
    """The entry merged over its backend's defaults; unknown backends and keys are refused."""
    label = vlm_label(vlm)
    backend = vlm.get("backend")
    if backend not in BACKENDS:
        raise SidpipeError(f"{label}.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if not vlm.get("model"):
        raise SidpipeError(f"{label}.model: missing (a model name, hub id or folder)")
    allowed = set(DEFAULTS[backend]) | {"name", "backend", "model"}
    # None values are tolerated so a shared schema may spell out e.g. base_url: null everywhere.
    unknown = sorted(k for k, v in vlm.items() if k not in allowed and v is not None)
    if unknown:
        raise SidpipeError(
            f"{label}: unknown key(s) {', '.join(unknown)} for backend {backend} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )
    merged = {**DEFAULTS[backend], **{k: v for k, v in vlm.items() if v is not None}}
    if backend == "transformers" and merged["mode"] not in TRANSFORMERS_MODES:
        raise SidpipeError(
            f"{label}.mode: {merged['mode']!r} is not one of {', '.join(TRANSFORMERS_MODES)}"
        )
    for key in ("concurrency", "batch_size", "max_new_tokens"):
        if key in merged and (not isinstance(merged[key], int) or merged[key] < 1):
            raise SidpipeError(f"{label}.{key}: {merged[key]!r} must be a positive integer")
    return merged


def make_backend(vlm: dict) -> Backend | None:
    """The backend object for a VLM entry; None for `manual` (no model to call)."""
    backend = resolve_vlm(vlm)["backend"]
    if backend == "openai":
        from .openai_server import OpenAIBackend

        return OpenAIBackend(vlm)
    if backend == "transformers":
        from .local import TransformersBackend

        return TransformersBackend(vlm)
    return None
