"""A Hugging Face hub on localhost for the tests (the real one cannot be reached here): it serves
folders as model repositories at one commit through the HTTP API that huggingface_hub calls
(`model_info`, `list_repo_tree`, and the `resolve` URLs its downloads HEAD and GET), so the
library's own download path runs, cache layout and all. Point HF_ENDPOINT at `url`. A repository
in `gated` answers as a gated one does to a token without access."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class LocalHub:
    def __init__(self, repos: dict[str, Path], commit: str, gated: tuple[str, ...] = ()) -> None:
        self.repos = repos
        self.commit = commit
        self.gated = gated
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _files(self, repo_id: str) -> dict[str, Path]:
        root = self.repos[repo_id]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        repo = "|".join(map(re.escape, self.repos))
        info = re.fullmatch(rf"/api/models/({repo})(?:/revision/[^/]+)?", path)
        tree = re.fullmatch(rf"/api/models/({repo})/tree/[^/]+(?:/.*)?", path)
        file = re.fullmatch(rf"/({repo})/resolve/[^/]+/(.+)", path)
        gated = next((g for g in self.gated if f"/{g}/" in path + "/"), None)
        if gated:
            self._refuse(handler, 403, "GatedRepo", f"Access to model {gated} is restricted.")
        elif info:
            files = self._files(info[1])
            siblings = [{"rfilename": name} for name in files]
            answer = {"id": info[1], "sha": self.commit, "siblings": siblings}
            self._send(handler, json.dumps(answer))
        elif tree:
            entries = [
                {"type": "file", "path": name, "size": p.stat().st_size, "oid": _blob(p)}
                for name, p in self._files(tree[1]).items()
            ]
            self._send(handler, json.dumps(entries))
        elif file and (found := self._files(file[1]).get(file[2])):
            headers = {"X-Repo-Commit": self.commit, "ETag": f'"{_blob(found)}"'}
            self._send(handler, found.read_bytes(), headers, body, "application/octet-stream")
        else:
            self._refuse(handler, 404, "EntryNotFound" if file else "RepoNotFound", "Not found")

    @staticmethod
    def _refuse(handler: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler,
        data: str | bytes,
        headers: dict[str, str] | None = None,
        body: bool = True,
        kind: str = "application/json",
    ) -> None:
        data = data.encode() if isinstance(data, str) else data
        handler.send_response(200)
        for name, value in {"Content-Type": kind, **(headers or {})}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)


def _blob(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()
