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
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .io import SidpipeError, log

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
        return OpenAIBackend(vlm)
    if backend == "transformers":
        return TransformersBackend(vlm)
    return None


# --- OpenAI-compatible servers -------------------------------------------------------------

_KEYLIKE = re.compile(r"sk-[A-Za-z0-9_*.\-]{4,}")


def _png_data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


class _Cancelled(Exception):
    """A queued or retrying request given up because another one failed for good."""


class _Malformed(Exception):
    """A 200 answer whose body is not a chat completion (an HTML error page, broken JSON)."""

    def __init__(self, problem: str, body: str) -> None:
        super().__init__(problem)
        self.problem, self.body = problem, body


# --- a deadline for the whole HTTP request ---------------------------------------------------
# httpx's timeouts bound each socket operation, so a server that drips one byte a second keeps
# a request open forever. Every socket operation of a request made under `_request_deadline`
# gets at most the time left until the deadline, which bounds connect + send + headers + body.

_DEADLINE = threading.local()


@contextlib.contextmanager
def _request_deadline(seconds: float) -> Iterator[None]:
    _DEADLINE.at = time.monotonic() + seconds
    try:
        yield
    finally:
        _DEADLINE.at = None


def _time_left(timeout: float | None, error: type[Exception]) -> float | None:
    at = getattr(_DEADLINE, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the request's total time limit was reached")
    return left if timeout is None else min(timeout, left)


@functools.cache
def _deadline_backend() -> type:
    """A network backend (httpcore2, which the openai client's httpx2 uses) whose streams
    never wait past the calling thread's request deadline."""
    import httpcore2

    class DeadlineStream(httpcore2.NetworkStream):
        def __init__(self, stream: Any) -> None:
            self._stream = stream

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return self._stream.read(max_bytes, _time_left(timeout, httpcore2.ReadTimeout))

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self._stream.write(buffer, _time_left(timeout, httpcore2.WriteTimeout))

        def close(self) -> None:
            self._stream.close()

        def start_tls(
            self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
        ) -> Any:
            left = _time_left(timeout, httpcore2.ConnectTimeout)
            return DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, left))

        def get_extra_info(self, info: str) -> Any:
            return self._stream.get_extra_info(info)

    class DeadlineBackend(httpcore2.NetworkBackend):
        def __init__(self, backend: Any) -> None:
            self._backend = backend

        def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Any = None,
        ) -> Any:
            left = _time_left(timeout, httpcore2.ConnectTimeout)
            return DeadlineStream(
                self._backend.connect_tcp(host, port, left, local_address, socket_options)
            )

        def connect_unix_socket(
            self, path: str, timeout: float | None = None, socket_options: Any = None
        ) -> Any:
            left = _time_left(timeout, httpcore2.ConnectTimeout)
            return DeadlineStream(self._backend.connect_unix_socket(path, left, socket_options))

        def sleep(self, seconds: float) -> None:
            self._backend.sleep(seconds)

    return DeadlineBackend


def _deadline_http_client(timeout: float) -> Any:
    """The openai client's own default HTTP client (limits, redirects, proxies from the
    environment), its connection pools given the deadline-aware network backend."""
    import openai

    client = openai.DefaultHttpxClient(timeout=timeout)
    backend = _deadline_backend()
    transports = [client._transport, *client._mounts.values()]
    for transport in (t for t in transports if t is not None):
        pool = getattr(transport, "_pool", None)
        if not hasattr(pool, "_network_backend"):  # never silently without the deadline
            raise RuntimeError(
                f"cannot bound request time: {type(transport).__name__} of this httpx2 version "
                "has no connection pool with a network backend; pin the versions of "
                "requirements.txt"
            )
        pool._network_backend = backend(pool._network_backend)
    return client


def parse_completion(body: str) -> VLMResponse:
    """A chat-completion response body as a VLMResponse; _Malformed if it is not one."""
    try:
        data = json.loads(body)
    except ValueError as err:
        raise _Malformed(f"the answer is not JSON ({err})", body) from None
    if not isinstance(data, dict):
        raise _Malformed("the answer is JSON but not an object", body)
    choices = data.get("choices")
    if not isinstance(choices, list):
        what = "an error object" if "error" in data else "no `choices` list"
        raise _Malformed(f"the answer is not a chat completion ({what})", body)
    if not choices or not isinstance(choices[0], dict):
        raise _Malformed("the answer holds no choice (`choices` is empty)", body)
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content = message.get("content")
    if isinstance(content, list):  # content parts, as some servers answer
        content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}

    def count(key: str) -> int:
        with contextlib.suppress(TypeError, ValueError):
            return int(usage.get(key) or 0)
        return 0

    return VLMResponse(
        text=content if isinstance(content, str) else "",
        prompt_tokens=count("prompt_tokens"),
        completion_tokens=count("completion_tokens"),
        finish_reason=str(choice.get("finish_reason") or "").lower(),
    )


class OpenAIBackend:
    """Chat completions with the image as a base64 PNG data URL, greedy, with bounded retries.

    `timeout` bounds each whole request; transient failures (408, 429, 5xx, timeouts, lost
    connections, bodies that are not chat completions) are retried `max_retries` times with a
    capped exponential backoff. When an image fails for good, queued requests are not sent and
    requests in flight are not retried, so the job fails fast.
    """

    name = "openai"
    follows_instructions = True

    def __init__(self, vlm: dict) -> None:
        self.cfg = resolve_vlm(vlm)
        self.label = vlm_label(vlm)
        self.model = str(self.cfg["model"])
        # Resolved here (as the client would) so cache keys exist before any key is needed.
        base = self.cfg["base_url"] or os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL
        self.base_url = str(base).rstrip("/")
        self.requests_sent = 0
        self._lock = threading.Lock()
        self._client: Any = None
        self._secret = ""

    def settings(self) -> dict[str, Any]:
        return {
            "temperature": float(self.cfg["temperature"]),
            "max_new_tokens": int(self.cfg["max_new_tokens"]),
        }

    def _redact(self, text: str) -> str:
        """Servers may echo (parts of) the key in error bodies; never pass them on."""
        if self._secret:
            text = text.replace(self._secret, "***")
        return _KEYLIKE.sub("sk-***", text)

    def _get_client(self) -> Any:
        if self._client is None:
            import openai  # only runs that call a server need the client installed

            env = str(self.cfg["api_key_env"])
            key = os.environ.get(env, "")
            if not key:
                raise SidpipeError(
                    f"{self.label}: environment variable {env} is empty or not set; export the API "
                    f"key for {self.base_url} in it (the variable is named by config key "
                    f"{self.label}.api_key_env)"
                )
            self._secret = key
            self._client = openai.OpenAI(
                base_url=self.base_url,
                api_key=key,
                timeout=float(self.cfg["timeout"]),
                max_retries=0,  # our own bounded retries, logged and with a capped backoff
                http_client=_deadline_http_client(float(self.cfg["timeout"])),
            )
        return self._client

    def _delay(self, retry: int, err: Exception) -> float:
        cap = float(self.cfg["backoff_max"])
        delay = min(cap, float(self.cfg["backoff_base"]) * 2 ** (retry - 1))
        delay *= 1 + 0.25 * random.random()  # jitter: parallel workers do not retry in lockstep
        response = getattr(err, "response", None)
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            delay = max(delay, float(response.headers.get("retry-after")))
        return min(cap, delay)

    def _problem(self, err: Exception) -> str:
        import openai

        if isinstance(err, openai.APITimeoutError):
            return f"no complete answer within {self.cfg['timeout']} s (timeout)"
        if isinstance(err, openai.APIStatusError):
            return self._redact(f"HTTP {err.status_code}: {err.message}")[:400]
        if isinstance(err, _Malformed):
            start = " ".join(err.body[:200].split())
            more = "..." if len(err.body) > 200 else ""
            return self._redact(f"{err.problem}; the body starts: {start!r}{more}")
        return self._redact(f"{type(err).__name__}: {err}")[:400]

    def _failed(self, request: VLMRequest, attempt: int, problem: str) -> SidpipeError:
        return SidpipeError(
            f"{self.label}: request for image {request.image_id} to {self.base_url} "
            f"(model {self.model}) failed after {attempt} attempt(s): {problem}"
        )

    def _send(self, client: Any, request: VLMRequest, content: list) -> VLMResponse:
        with _request_deadline(float(self.cfg["timeout"])):
            raw = client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=[{"role": "user", "content": content}],
                temperature=float(self.cfg["temperature"]),
                # max_tokens rather than max_completion_tokens: every compatible server has it
                max_tokens=int(self.cfg["max_new_tokens"]),
            )
            body = raw.http_response.text
        return parse_completion(body)

    def _one(self, client: Any, request: VLMRequest, abort: threading.Event) -> VLMResponse:
        import openai

        content = [
            {"type": "text", "text": request.instruction},
            {"type": "image_url", "image_url": {"url": _png_data_url(request.image_path)}},
        ]
        tries = int(self.cfg["max_retries"]) + 1
        try:
            for attempt in range(1, tries + 1):
                if abort.is_set():
                    raise _Cancelled
                with self._lock:
                    self.requests_sent += 1
                try:
                    return self._send(client, request, content)
                except openai.APIStatusError as err:
                    transient = err.status_code in (408, 429) or err.status_code >= 500
                    if not transient or attempt == tries:
                        hint = (
                            f"; check the key in ${self.cfg['api_key_env']}"
                            if err.status_code in (401, 403)
                            else ""
                        )
                        # from None: the client's exception holds the request, headers included
                        raise self._failed(request, attempt, self._problem(err) + hint) from None
                    failure: Exception = err
                except (openai.APIConnectionError, _Malformed) as err:  # incl. APITimeoutError
                    if attempt == tries:
                        raise self._failed(request, attempt, self._problem(err)) from None
                    failure = err
                except openai.OpenAIError as err:
                    raise self._failed(request, attempt, self._problem(err)) from None
                delay = self._delay(attempt, failure)
                log.warning(
                    "%s: image %s: %s; retry %d/%d in %.2f s",
                    self.label,
                    request.image_id,
                    self._problem(failure),
                    attempt,
                    tries - 1,
                    delay,
                )
                if abort.wait(delay):
                    raise _Cancelled
            raise AssertionError("unreachable")
        except SidpipeError:
            abort.set()  # fail fast: the other workers stop sending
            raise

    def generate(
        self, requests: Sequence[VLMRequest], on_response: OnResponse | None = None
    ) -> list[VLMResponse]:
        if not requests:
            return []
        client = self._get_client()
        results: list[VLMResponse | None] = [None] * len(requests)
        workers = min(int(self.cfg["concurrency"]), len(requests))
        abort = threading.Event()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm") as pool:
            futures = {
                pool.submit(self._one, client, req, abort): i for i, req in enumerate(requests)
            }
            try:
                for future in as_completed(futures):
                    index = futures[future]
                    results[index] = future.result()
                    if on_response is not None:
                        on_response(index, results[index])
            except BaseException as err:
                abort.set()  # requests in flight end (within `timeout`) and are not retried
                for future in futures:  # fail fast: queued requests are not sent
                    future.cancel()
                pool.shutdown(wait=True)
                # Answers already paid for are still reported (and cached by the caller).
                for future, index in futures.items():
                    if results[index] is None and _succeeded(future) and on_response:
                        results[index] = future.result()
                        on_response(index, results[index])
                if isinstance(err, _Cancelled):  # report the failure that stopped the others
                    for future in futures:
                        if _failed_for_good(future):
                            raise future.exception() from None
                raise
        return [r for r in results if r is not None]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _succeeded(future: Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _failed_for_good(future: Future) -> bool:
    return future.done() and not future.cancelled() and isinstance(future.exception(), SidpipeError)


# --- local transformers models -------------------------------------------------------------


@contextlib.contextmanager
def _loading_vlm(label: str, model: str) -> Iterator[None]:
    """Turn a from_pretrained failure into an error naming the model string and config key."""
    from .models import _looks_local

    if _looks_local(model) and not Path(model).expanduser().is_dir():
        raise SidpipeError(f"{label}.model: model folder {model!r} does not exist")
    try:
        yield
    except Exception as err:
        raise SidpipeError(
            f"cannot load the VLM {model!r} (config key {label}.model): "
            f"{type(err).__name__}: {str(err).rstrip('.')}. It must be a Hugging Face hub id "
            "(already cached when HF_HUB_OFFLINE=1) or a folder written by save_pretrained."
        ) from err


class TransformersBackend:
    """A local image-text-to-text model, loaded on first use, greedy `generate` in batches."""

    name = "transformers"

    def __init__(self, vlm: dict) -> None:
        self.cfg = resolve_vlm(vlm)
        self.label = vlm_label(vlm)
        self.model = str(self.cfg["model"])
        self.base_url = ""
        self.mode = str(self.cfg["mode"])
        # BLIP-2 cannot follow instructions: it captions the image (the paper's setting).
        self.follows_instructions = self.mode == "chat"
        self.requests_sent = 0
        self._model: Any = None
        self._processor: Any = None
        self._device: Any = None
        self._dtype: Any = None

    def settings(self) -> dict[str, Any]:
        return {
            "decoding": "greedy",
            "max_new_tokens": int(self.cfg["max_new_tokens"]),
            "mode": self.mode,
            "dtype": str(self.cfg["dtype"]),
        }

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .models import pick_device, torch_dtype

        self._device, self._dtype = pick_device(self.cfg["device"]), torch_dtype(self.cfg["dtype"])
        log.info("loading VLM %s (%s) on %s", self.model, self.mode, self._device)
        with _loading_vlm(self.label, self.model):
            # PIL image processors: the torchvision ones are optional and differ slightly.
            processor = AutoProcessor.from_pretrained(self.model, backend="pil")
            model = AutoModelForImageTextToText.from_pretrained(self.model, dtype=self._dtype)
        if self.mode == "chat" and not getattr(processor, "chat_template", None):
            raise SidpipeError(
                f"{self.label}: model {self.model!r} has no chat template, so it cannot take an "
                f"instruction; for a captioning model such as BLIP-2 set {self.label}.mode: "
                "blip2_caption"
            )
        # Decoder-only models continue each row from its last token: pad on the left.
        processor.tokenizer.padding_side = "left"
        self._processor, self._model = processor, model.eval().to(self._device)

    def _inputs(self, batch: Sequence[VLMRequest]) -> Any:
        from PIL import Image

        images = []
        for request in batch:
            with Image.open(request.image_path) as image:
                images.append(image.convert("RGB"))
        if self.mode == "blip2_caption":
            return self._processor(images=images, return_tensors="pt")
        texts = [
            self._processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": r.instruction}],
                    }
                ],
                add_generation_prompt=True,
                tokenize=False,
            )
            for r in batch
        ]
        return self._processor(images=images, text=texts, return_tensors="pt", padding=True)

    def generate(
        self, requests: Sequence[VLMRequest], on_response: OnResponse | None = None
    ) -> list[VLMResponse]:
        import torch

        if not requests:
            return []
        self._load()
        model, tokenizer = self._model, self._processor.tokenizer
        max_new = int(self.cfg["max_new_tokens"])
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        size = int(self.cfg["batch_size"])
        results: list[VLMResponse] = []
        for start in range(0, len(requests), size):
            batch = requests[start : start + size]
            inputs = self._inputs(batch).to(self._device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
            with torch.inference_mode():
                output = model.generate(
                    **inputs, do_sample=False, num_beams=1, max_new_tokens=max_new
                )
            self.requests_sent += len(batch)
            if getattr(model.config, "is_encoder_decoder", False) or getattr(
                getattr(model.config, "text_config", None), "is_encoder_decoder", False
            ):
                prompt_len = 0  # encoder-decoder outputs hold only the new tokens
            elif "input_ids" in inputs:
                prompt_len = inputs["input_ids"].shape[1]
            else:  # BLIP-2 without text builds [image tokens] + BOS itself
                prompt_len = int(model.config.num_query_tokens) + 1
            for row in range(len(batch)):
                new = output[row, prompt_len:].tolist()
                stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
                used = new if stop is None else new[: stop + 1]
                if "attention_mask" in inputs:
                    prompt_tokens = int(inputs["attention_mask"][row].sum())
                else:
                    prompt_tokens = prompt_len
                response = VLMResponse(
                    text=tokenizer.decode(used, skip_special_tokens=True).strip(),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=len(used),
                    finish_reason="length" if stop is None and len(new) >= max_new else "stop",
                )
                results.append(response)
                if on_response is not None:
                    on_response(start + row, response)
            log.debug("%s: generated %d/%d", self.label, len(results), len(requests))
        return results

    def close(self) -> None:
        self._model = self._processor = None
