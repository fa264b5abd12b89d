"""The `openai` backend: any OpenAI-compatible chat-completions server, through the official
client, with a deadline for each whole request and bounded retries of transient failures."""

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
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..io import SidpipeError, log, redact_url
from . import (
    OPENAI_DEFAULT_BASE_URL,
    OnResponse,
    VLMRequest,
    VLMResponse,
    resolve_vlm,
    vlm_label,
)

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
        if "@" in urlsplit(self.base_url).netloc:
            # The HTTP client logs every request's URL: a password in it would reach the logs.
            raise SidpipeError(
                f"{self.label}.base_url (or $OPENAI_BASE_URL) {redact_url(self.base_url)} holds "
                "a user name or password; give the server's address without them and its key "
                f"in the environment variable named by {self.label}.api_key_env"
            )
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
                    f"{self.label}: environment variable {env} is empty or not set; export the "
                    f"API key for {redact_url(self.base_url)} in it (the variable is named by "
                    f"config key {self.label}.api_key_env)"
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
            f"{self.label}: request for image {request.image_id} to {redact_url(self.base_url)} "
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
