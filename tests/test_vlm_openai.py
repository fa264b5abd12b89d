"""The `openai` backend against a real local HTTP server speaking chat completions, driven by the
official `openai` client: what is sent, retries, timeouts, validation retries, cache, secrets."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sidpipe.descriptions.instructions import fill_instruction
from sidpipe.descriptions.stage import describe_references
from sidpipe.io import SidpipeError, read_csv, sha256_file, sha256_text
from sidpipe.models import train_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests/data/tiny_demo/subjects"
KEY_ENV = "SIDPIPE_TEST_OPENAI_KEY"
SECRET = "sk-test-SECRET-3f9a7c1e5b2d4a6f8e0c"
GOOD = "a [V] mug on a blue and white checkered tablecloth next to a small green plant"
CORPUS = [GOOD, "a mug on a blue checkered tablecloth", "a cup on a table"]
USAGE = {"prompt_tokens": 120, "completion_tokens": 20, "total_tokens": 140}

# An action answers one request: ("text", content[, finish_reason]), ("status", code[, message]),
# ("hang", seconds), ("hang_then", seconds, action), ("json", payload) (any JSON with status 200),
# ("raw", content_type, body) (status 200), ("drip", seconds) (a good answer, one byte of the
# body per interval), ("drip_headers", seconds) (status line, then one header byte per interval).
Action = tuple
Responder = Callable[[dict, int], Action]


class FakeServer:
    """Chat completions on 127.0.0.1:<free port>; `responder(body, n)` scripts the answers,
    n counting earlier requests for the same image."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[dict] = []
        self.per_image: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                image = body["messages"][0]["content"][1]["image_url"]["url"]
                with owner.lock:
                    n = owner.per_image.get(image, 0)
                    owner.per_image[image] = n + 1
                    owner.requests.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                        }
                    )
                action = owner.responder(body, n)
                try:
                    self._answer(action, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

            def _answer(self, action: Action, body: dict) -> None:
                kind = action[0]
                if kind == "hang":
                    owner.stop.wait(action[1])
                elif kind == "hang_then":
                    if not owner.stop.wait(action[1]):
                        self._answer(action[2], body)
                elif kind == "status":
                    payload = {"error": {"message": action[2] if len(action) > 2 else "boom"}}
                    self._send(action[1], payload, {"Retry-After": "0"})
                elif kind == "json":
                    self._send(200, action[1])
                elif kind == "raw":
                    self._send(200, action[2], content_type=action[1])
                elif kind == "drip":
                    data = json.dumps(completion(body["model"], GOOD)).encode()
                    self._send(200, b"", length=len(data))
                    for byte in data:
                        if owner.stop.wait(action[1]):
                            return
                        self.wfile.write(bytes([byte]))
                elif kind == "drip_headers":
                    data = json.dumps(completion(body["model"], GOOD)).encode()
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    head = f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                    for byte in (head + "X-Pad: " + "x" * 400 + "\r\n\r\n").encode():
                        if owner.stop.wait(action[1]):
                            return
                        self.wfile.write(bytes([byte]))
                    self.wfile.write(data)
                else:
                    finish = action[2] if len(action) > 2 else "stop"
                    self._send(200, completion(body["model"], action[1], finish))

            def _send(
                self,
                code: int,
                payload: dict | bytes,
                headers: dict | None = None,
                content_type: str = "application/json",
                length: int | None = None,
            ) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def texts(self) -> list[str]:
        return [r["body"]["messages"][0]["content"][0]["text"] for r in self.requests]


def completion(model: str, text: str, finish: str = "stop") -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        ],
        "usage": USAGE,
    }


@pytest.fixture
def serve() -> Iterator[Callable[[Responder], FakeServer]]:
    servers: list[FakeServer] = []

    def start(responder: Responder) -> FakeServer:
        servers.append(FakeServer(responder))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("base")
    train_clip_tokenizer(CORPUS, root / "tokenizer")
    return str(root)


@pytest.fixture(autouse=True)
def secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd
) -> Iterator[None]:
    """Plant a fake key; afterwards it must appear in no file, log line or console output."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)  # the client's and httpx's debug logs included
    yield
    captured = capfd.readouterr()
    assert SECRET not in caplog.text and SECRET not in captured.out + captured.err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def make_references(root: Path, count: int = 4) -> Path:
    refs = root / "references" / "red_mug"
    refs.mkdir(parents=True)
    rows = []
    for n in range(1, count + 1):
        source = DEMO / "red_mug" / f"{n:02d}.png"
        shutil.copyfile(source, refs / f"{n:02d}.png")
        digest = sha256_file(refs / f"{n:02d}.png")
        rows.append(
            {
                "subject": "red_mug",
                "image_id": f"{n:02d}",
                "path": f"{n:02d}.png",
                "sha256": digest,
                "source_path": str(source),
            }
        )
    with open(refs / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return refs


def vlm(server: FakeServer, **settings) -> dict:
    return {
        "name": "fake",
        "backend": "openai",
        "model": "gpt-4o-test",
        "base_url": server.url,
        "api_key_env": KEY_ENV,
        "timeout": 5.0,
        "max_retries": 2,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "concurrency": 2,
        **settings,
    }


def describe(tmp_path: Path, base: str, server: FakeServer, name: str = "sid", **kwargs):
    refs = tmp_path / "references" / "red_mug"
    if not refs.exists():
        make_references(tmp_path, kwargs.pop("count", 4))
    kwargs.pop("count", None)
    settings = kwargs.pop("settings", {})
    args = {
        "references_dir": refs,
        "out_csv": tmp_path / "out" / name / "descriptions.csv",
        "cache_dir": tmp_path / "cache",
        "subject": "red_mug",
        "class_name": "mug",
        "kind": "object",
        "description_set": name,
        "case": 3,
        "vlm": vlm(server, **settings),
        "tokenizer": base,
        "max_attempts": 3,
    }
    return describe_references(**{**args, **kwargs})


def assert_nothing_written(tmp_path: Path, name: str = "sid") -> None:
    out = tmp_path / "out" / name
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


# --- tests ----------------------------------------------------------------------------------


def test_request_content_csv_and_cache(tmp_path: Path, base: str, serve) -> None:
    server = serve(lambda body, n: ("text", GOOD))
    rows = describe(tmp_path, base, server)
    assert len(server.requests) == 4

    instruction = fill_instruction(3, "mug")
    pngs = {sha256_file(p) for p in (tmp_path / "references" / "red_mug").glob("*.png")}
    for request in server.requests:
        body = request["body"]
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["authorization"] == f"Bearer {SECRET}"  # the key is used...
        assert body["model"] == "gpt-4o-test" and body["temperature"] == 0
        text_part, image_part = body["messages"][0]["content"]
        assert text_part == {"type": "text", "text": instruction}
        assert "mug" in text_part["text"] and "[V]" in text_part["text"]
        url = image_part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        raw = base64.b64decode(url.split(",", 1)[1])
        assert raw.startswith(b"\x89PNG") and hashlib.sha256(raw).hexdigest() in pngs
    assert (
        len({r["body"]["messages"][0]["content"][1]["image_url"]["url"] for r in server.requests})
        == 4
    )

    saved = read_csv(tmp_path / "out" / "sid" / "descriptions.csv")
    assert [r["description"] for r in saved] == [GOOD] * 4
    first = saved[0]
    assert first["backend"] == "openai" and first["model"] == "gpt-4o-test"
    assert first["source"] == "vlm" and first["cached"] == "False" and first["attempts"] == "1"
    assert first["instruction_sha256"] == sha256_text(instruction)
    assert (first["prompt_tokens"], first["completion_tokens"]) == ("120", "20")
    assert 0 < int(first["token_count"]) <= 77
    assert rows[0]["raw_response"] == GOOD
    entries = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    assert len(entries) == 4 and all(e["response"]["text"] == GOOD for e in entries)

    # A rerun and another set with the same case and VLM send nothing, even without a key.
    rerun = describe(tmp_path, base, server)
    other = describe(tmp_path, base, server, name="sid_copy")
    assert len(server.requests) == 4
    assert all(r["cached"] for r in rerun + other)
    assert [r["description"] for r in other] == [GOOD] * 4


def test_rerun_from_cache_needs_no_key(
    tmp_path: Path, base: str, serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(lambda body, n: ("text", GOOD))
    describe(tmp_path, base, server)
    monkeypatch.delenv(KEY_ENV)
    assert all(r["cached"] for r in describe(tmp_path, base, server, name="again"))
    assert len(server.requests) == 4


def test_rate_limit_is_retried(tmp_path: Path, base: str, serve, caplog) -> None:
    server = serve(lambda body, n: ("status", 429, "slow down") if n == 0 else ("text", GOOD))
    rows = describe(tmp_path, base, server)
    assert len(server.requests) == 8
    assert [r["attempts"] for r in rows] == [1] * 4  # transient retries are not attempts
    assert "HTTP 429" in caplog.text and "retry 1/2" in caplog.text


def test_server_errors_fail_after_bounded_retries(tmp_path: Path, base: str, serve) -> None:
    server = serve(lambda body, n: ("status", 500, "internal error"))
    with pytest.raises(SidpipeError) as err:
        describe(tmp_path, base, server)
    message = str(err.value)
    assert "HTTP 500" in message and "after 3 attempt(s)" in message
    assert "gpt-4o-test" in message and server.url in message
    assert max(server.per_image.values()) == 3 and all(n <= 3 for n in server.per_image.values())
    assert_nothing_written(tmp_path)
    assert not list((tmp_path / "cache").glob("*.json"))


def test_answers_paid_for_are_kept_when_another_image_fails(
    tmp_path: Path, base: str, serve
) -> None:
    refs = make_references(tmp_path)
    bad = "data:image/png;base64," + base64.b64encode((refs / "01.png").read_bytes()).decode()

    def responder(body: dict, n: int) -> Action:
        url = body["messages"][0]["content"][1]["image_url"]["url"]
        return ("status", 503) if url == bad else ("text", GOOD)

    server = serve(responder)
    with pytest.raises(SidpipeError, match="image 01"):
        describe(tmp_path, base, server)
    sent = dict(server.per_image)
    assert sent[bad] == 3 and len(sent) >= 2  # image 02 ran alongside image 01
    assert len(list((tmp_path / "cache").glob("*.json"))) == len(sent) - 1
    with pytest.raises(SidpipeError, match="image 01"):
        describe(tmp_path, base, server)
    assert all(server.per_image[url] == 1 for url in sent if url != bad)  # not asked again


def test_client_errors_are_not_retried(tmp_path: Path, base: str, serve) -> None:
    server = serve(lambda body, n: ("status", 400, "bad request"))
    with pytest.raises(SidpipeError, match="HTTP 400"):
        describe(tmp_path, base, server)
    assert all(n == 1 for n in server.per_image.values())
    assert_nothing_written(tmp_path)


def test_echoed_key_is_redacted(tmp_path: Path, base: str, serve) -> None:
    server = serve(lambda body, n: ("status", 401, f"Incorrect API key provided: {SECRET}"))
    with pytest.raises(SidpipeError) as err:
        describe(tmp_path, base, server)
    assert "HTTP 401" in str(err.value) and KEY_ENV in str(err.value)
    assert SECRET not in str(err.value) and SECRET[:12] not in str(err.value)


def test_hanging_server_times_out(tmp_path: Path, base: str, serve) -> None:
    server = serve(lambda body, n: ("hang", 30))
    start = time.monotonic()
    with pytest.raises(SidpipeError, match="timeout"):
        describe(tmp_path, base, server, settings={"timeout": 0.3, "max_retries": 1})
    assert time.monotonic() - start < 5
    assert all(n <= 2 for n in server.per_image.values())
    assert_nothing_written(tmp_path)


def test_missing_env_var(tmp_path: Path, base: str, serve, monkeypatch) -> None:
    server = serve(lambda body, n: ("text", GOOD))
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(SidpipeError) as err:
        describe(tmp_path, base, server)
    assert KEY_ENV in str(err.value) and "vlms.fake.api_key_env" in str(err.value)
    assert not server.requests


def test_placeholder_is_inserted_without_retry(tmp_path: Path, base: str, serve) -> None:
    server = serve(lambda body, n: ("text", "A glossy red mug on a checkered tablecloth."))
    rows = describe(tmp_path, base, server, case=4)
    assert len(server.requests) == 4
    assert {r["description"] for r in rows} == {"A glossy red [V] mug on a checkered tablecloth."}
    assert {r["raw_response"] for r in rows} == {"A glossy red mug on a checkered tablecloth."}


def test_missing_class_is_retried_then_fails(tmp_path: Path, base: str, serve) -> None:
    server = serve(lambda body, n: ("text", "a cup on a table"))
    with pytest.raises(SidpipeError) as err:
        describe(tmp_path, base, server, count=2)
    message = str(err.value)
    assert "image 01" in message and "image 02" in message
    assert 'last response: "a cup on a table"' in message and "after 3 attempt(s)" in message
    assert len(server.requests) == 6
    retried = [t for t in server.texts() if "rejected" in t]
    assert len(retried) == 4
    assert all('does not contain the word "mug"' in t and "a cup on a table" in t for t in retried)
    assert_nothing_written(tmp_path)
    # Rejected answers are logged, never cached: once the model answers well, the rerun asks
    # again (one request per image) and succeeds.
    assert not list((tmp_path / "cache").glob("*.json"))
    server.responder = lambda body, n: ("text", GOOD)
    rows = describe(tmp_path, base, server, count=2)
    assert len(server.requests) == 8 and [r["description"] for r in rows] == [GOOD] * 2


def test_overlong_description_is_retried_shorter(tmp_path: Path, base: str, serve) -> None:
    long = GOOD + ", " + ", ".join(["with a bright yellow ceramic lamp on a wooden shelf"] * 8)
    server = serve(lambda body, n: ("text", long) if n == 0 else ("text", GOOD))
    rows = describe(tmp_path, base, server, count=2)
    assert len(server.requests) == 4
    assert [r["attempts"] for r in rows] == [2, 2]
    assert {r["description"] for r in rows} == {GOOD}
    assert all(r["token_count"] <= 77 for r in rows)
    assert [r["prompt_tokens"] for r in rows] == [240, 240]  # both attempts are counted
    retried = [t for t in server.texts() if "rejected" in t]
    assert len(retried) == 2 and all("tokens long" in t and "shorter" in t for t in retried)


def test_truncated_answer_is_retried(tmp_path: Path, base: str, serve) -> None:
    server = serve(lambda body, n: ("text", GOOD, "length") if n == 0 else ("text", GOOD))
    rows = describe(tmp_path, base, server, count=1)
    assert rows[0]["attempts"] == 2 and "cut off" in server.texts()[1]


# --- misbehaving servers ---------------------------------------------------------------------


def image_url(tmp_path: Path, n: int) -> str:
    path = tmp_path / "references" / "red_mug" / f"{n:02d}.png"
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def url_of(body: dict) -> str:
    return body["messages"][0]["content"][1]["image_url"]["url"]


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("*.json"))


@pytest.mark.parametrize("action", [("drip", 0.2), ("drip_headers", 0.2)])
def test_timeout_bounds_the_whole_request(tmp_path: Path, base: str, serve, action) -> None:
    """A server that sends its answer one byte at a time (the body, or the headers) is cut off
    at `timeout`: the job takes about timeout x attempts plus backoff, not the drip's ~80 s."""
    server = serve(lambda body, n: action)
    settings = {"timeout": 1.0, "max_retries": 1}
    start = time.monotonic()
    with pytest.raises(SidpipeError) as err:
        describe(tmp_path, base, server, count=2, settings=settings)
    elapsed = time.monotonic() - start
    # 2 images in parallel, 2 tries of 1 s each and a backoff under 0.05 s (+ set-up): about
    # 2 s; a hang guard far above that and far below one drip (each byte 0.2 s apart, within
    # the 1 s read timeout)
    assert elapsed < 20.0, elapsed
    message = str(err.value)
    assert "within 1.0 s (timeout)" in message and "after 2 attempt(s)" in message
    assert server.per_image and all(n <= 2 for n in server.per_image.values())
    assert_nothing_written(tmp_path)
    # Fixed, the rerun asks once per image and succeeds.
    server.responder = lambda body, n: ("text", GOOD)
    sent = len(server.requests)
    rows = describe(tmp_path, base, server, count=2, settings=settings)
    assert [r["description"] for r in rows] == [GOOD] * 2 and len(server.requests) == sent + 2


def test_a_slow_but_steady_answer_within_timeout_is_accepted(
    tmp_path: Path, base: str, serve
) -> None:
    # ~400 bytes at 1 ms each: well within a 5 s timeout, though every byte arrives apart
    server = serve(lambda body, n: ("drip", 0.001))
    rows = describe(tmp_path, base, server, count=1)
    assert rows[0]["description"] == GOOD and len(server.requests) == 1


HTML = "<html><head><title>502 Bad Gateway</title></head><body>nginx; key " + SECRET + "</body>"


@pytest.mark.parametrize(
    ("action", "shown"),
    [
        (("raw", "text/html", HTML.encode()), "<html><head><title>502 Bad Gateway"),
        (("raw", "application/json", b'{"id": "x", "choices": [{"index": 0, '), '{"id": "x"'),
        (("json", {"error": {"message": "model overloaded"}}), "model overloaded"),
        (("json", {"id": "x", "object": "chat.completion", "choices": []}), '"choices": []'),
    ],
    ids=["html", "broken-json", "error-object", "empty-choices"],
)
def test_bodies_that_are_not_completions_are_retried_then_named(
    tmp_path: Path, base: str, serve, action, shown: str
) -> None:
    server = serve(lambda body, n: action)
    with pytest.raises(SidpipeError) as err:
        describe(tmp_path, base, server, count=1)
    message = str(err.value)
    assert "image 01" in message and server.url in message and "gpt-4o-test" in message
    assert "after 3 attempt(s)" in message and shown in message
    assert SECRET not in message and SECRET[:12] not in message  # masked in the quote
    assert server.per_image and all(n == 3 for n in server.per_image.values())
    assert not cache_files(tmp_path)
    # A passing glitch costs one retry, not the job.
    server.responder = lambda body, n: action if n == 3 else ("text", GOOD)
    rows = describe(tmp_path, base, server, count=1)
    assert rows[0]["description"] == GOOD and rows[0]["attempts"] == 1
    assert len(server.requests) == 5


BAD_ANSWERS = {
    "content-null": (
        "json",
        {
            **completion("m", ""),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": None},
                    "finish_reason": "stop",
                }
            ],
        },
    ),
    "length": ("text", GOOD, "length"),
    "content-filter": ("text", "a [V] mug on a blue and white", "content_filter"),
    "chatter": ("text", f"Sure! {GOOD}. Let me know if you need anything else."),
    "no-class": ("text", "a cup on a table"),
}


@pytest.mark.parametrize("bad", sorted(BAD_ANSWERS))
def test_rejected_answers_are_not_cached_and_the_rerun_recovers(
    tmp_path: Path, base: str, serve, bad: str, caplog
) -> None:
    make_references(tmp_path)
    first = image_url(tmp_path, 1)
    server = serve(lambda body, n: BAD_ANSWERS[bad] if url_of(body) == first else ("text", GOOD))
    with pytest.raises(SidpipeError) as err:
        describe(tmp_path, base, server)
    assert "image 01" in str(err.value) and "image 02" not in str(err.value)
    assert server.per_image[first] == 3
    assert "answer rejected" in caplog.text  # the rejected answers are in the log...
    entries = [json.loads(p.read_text()) for p in cache_files(tmp_path)]
    assert len(entries) == 3 and all(e["response"]["text"] == GOOD for e in entries)  # ...only
    # Fixed: the rerun sends one request, for image 01 alone, and succeeds.
    server.responder = lambda body, n: ("text", GOOD)
    sent = len(server.requests)
    rows = describe(tmp_path, base, server)
    assert len(server.requests) == sent + 1 and url_of(server.requests[-1]["body"]) == first
    assert [r["description"] for r in rows] == [GOOD] * 4
    assert [r["cached"] for r in rows] == [False, True, True, True]


def test_content_filter_is_not_a_finished_answer(tmp_path: Path, base: str, serve) -> None:
    cut = "a [V] mug on a blue and white"
    server = serve(lambda body, n: ("text", cut, "content_filter") if n == 0 else ("text", GOOD))
    rows = describe(tmp_path, base, server, count=1)
    assert rows[0]["description"] == GOOD and rows[0]["attempts"] == 2
    assert "content filter" in server.texts()[1] and "content_filter" in server.texts()[1]
    saved = read_csv(tmp_path / "out" / "sid" / "descriptions.csv")
    assert saved[0]["finish_reason"] == "stop"


def test_a_fatal_error_stops_queued_and_retrying_requests(
    tmp_path: Path, base: str, serve, caplog
) -> None:
    """Image 01 is refused at once (401) while image 02 is in flight; 02 ends but is not
    retried, and images 03 and 04, queued, are never sent."""
    make_references(tmp_path)
    urls = {image_url(tmp_path, n): n for n in range(1, 5)}
    second_in_flight = threading.Event()

    def responder(body: dict, n: int) -> Action:
        image = urls[url_of(body)]
        if image == 1:
            # Refused only once 02 has arrived: on a loaded machine 02's worker may not have
            # sent it yet when an immediate 401 comes back (the wait is a hang guard only).
            second_in_flight.wait(60)
            return ("status", 401, "invalid key")
        second_in_flight.set()
        return ("hang_then", 0.5, ("status", 500, "overloaded"))

    server = serve(responder)
    with caplog.at_level(logging.INFO, logger="sidpipe"):
        with pytest.raises(SidpipeError, match=r"image 01 .*HTTP 401"):
            describe(tmp_path, base, server, settings={"backoff_base": 0.01})
    counts = {urls[url]: n for url, n in server.per_image.items()}
    assert counts == {1: 1, 2: 1}, counts
    assert "2 request(s) sent" in caplog.text  # what the failed job cost is in its log


def test_markdown_answers_are_normalised(tmp_path: Path, base: str, serve) -> None:
    answers = [
        "```text\n" + GOOD + "\n```",
        "# Caption\n" + GOOD,
        "- a **[V] mug** on a *blue and white checkered* tablecloth next to a small green plant",
        '**Caption:** "' + GOOD + '"',
    ]
    make_references(tmp_path)
    urls = [image_url(tmp_path, n) for n in range(1, 5)]
    server = serve(lambda body, n: ("text", answers[urls.index(url_of(body))]))
    rows = describe(tmp_path, base, server)
    assert [r["description"] for r in rows] == [GOOD] * 4
    assert [r["attempts"] for r in rows] == [1] * 4
    assert [r["raw_response"] for r in rows] == answers


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ('**Caption:** "' + GOOD, "unmatched quotation mark"),
        (f"Sure! {GOOD}. Let me know if you need anything else.", "not part of a caption"),
        ("a small green plant next to a mug rack, beside a mug", "appears 2 times"),
        ("a blue and white checkered tablecloth under a mug rack", 'only appears in "mug rack"'),
    ],
)
def test_chatter_and_ambiguous_answers_are_asked_again(
    tmp_path: Path, base: str, serve, answer: str, reason: str
) -> None:
    server = serve(lambda body, n: ("text", answer) if n == 0 else ("text", GOOD))
    rows = describe(tmp_path, base, server, count=1)
    assert rows[0]["description"] == GOOD and rows[0]["attempts"] == 2
    assert reason in server.texts()[1]


def test_error_says_when_a_rejected_answer_came_from_the_cache(
    tmp_path: Path, base: str, serve
) -> None:
    """An answer cached when it passed may fail a stricter check later (here: fewer tokens);
    the error names its cache file and how to have the model asked again."""
    server = serve(lambda body, n: ("text", GOOD))
    describe(tmp_path, base, server, count=1)
    with pytest.raises(SidpipeError) as err:
        describe(tmp_path, base, server, count=1, max_attempts=1, max_text_tokens=8)
    message = str(err.value)
    (entry,) = cache_files(tmp_path)
    assert f"came from the cache file {entry}; delete that file" in message
    assert "0 request(s) sent in this run" in message and len(server.requests) == 1


def test_credentials_in_the_base_url_are_refused_unshown(tmp_path: Path, base: str, serve) -> None:
    """The HTTP client logs each request's URL: a user:password in it would reach the logs."""
    server = serve(lambda body, n: ("text", GOOD))
    url = server.url.replace("http://", "http://user:SECRETPW@")
    with pytest.raises(SidpipeError) as err:
        describe(tmp_path, base, server, settings={"base_url": url})
    assert "vlms.fake.base_url (or $OPENAI_BASE_URL) http://***@127.0.0.1" in str(err.value)
    assert "SECRETPW" not in str(err.value) and "api_key_env" in str(err.value)
    assert not server.requests
    assert_nothing_written(tmp_path)


def test_a_query_token_in_the_base_url_reaches_no_cache_entry(
    tmp_path: Path, base: str, serve
) -> None:
    server = serve(lambda body, n: ("text", GOOD))
    describe(tmp_path, base, server, settings={"base_url": server.url + "?token=SECRETQ"})
    entries = [p.read_text() for p in (tmp_path / "cache").rglob("*.json")]
    assert entries and all("SECRETQ" not in text for text in entries)
    assert all(f'"base_url": "{server.url}?***"' in text for text in entries)
