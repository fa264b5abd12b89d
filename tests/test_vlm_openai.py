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

from sidpipe.descriptions import describe_references, fill_instruction, sha256_text
from sidpipe.io import SidpipeError, read_csv, sha256_file
from sidpipe.models import train_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "subjects"
KEY_ENV = "SIDPIPE_TEST_OPENAI_KEY"
SECRET = "sk-test-SECRET-3f9a7c1e5b2d4a6f8e0c"
GOOD = "a [V] mug on a blue and white checkered tablecloth next to a small green plant"
CORPUS = [GOOD, "a mug on a blue checkered tablecloth", "a cup on a table"]
USAGE = {"prompt_tokens": 120, "completion_tokens": 20, "total_tokens": 140}

# An action answers one request: ("text", content), ("status", code), ("hang", seconds).
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
                    if action[0] == "hang":
                        owner.stop.wait(action[1])
                        return
                    if action[0] == "status":
                        payload = {"error": {"message": action[2] if len(action) > 2 else "boom"}}
                        self._send(action[1], payload, {"Retry-After": "0"})
                        return
                    finish = action[2] if len(action) > 2 else "stop"
                    self._send(200, completion(body["model"], action[1], finish))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def _send(self, code: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
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
    # The rejected answers are cached too: the rerun fails the same way without a request.
    with pytest.raises(SidpipeError, match="a cup on a table"):
        describe(tmp_path, base, server, count=2)
    assert len(server.requests) == 6


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
