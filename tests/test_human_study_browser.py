"""The study page in a real headless Chromium (Debian's), driven over the DevTools protocol on a
pipe (`--remote-debugging-pipe`: no driver, no browser download, no extra package): a scripted
participant answers every screen by mouse clicks and keys, reloads midway and continues; the
server is the real command (`sidpipe study serve`, waitress) and the records are checked against
what was clicked."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_human_study import (
    ARMS,
    analysis_outputs,
    build_fixture_study,
    plan_of,
    write_subject_metrics,
)

from sidpipe.human_study.analysis import analyze_study
from sidpipe.human_study.responses import parse_time, read_responses

HANG_GUARD = 60  # seconds for any one wait (a normal step takes well under one)
KEYS = {
    "ArrowLeft": ("ArrowLeft", 37),
    "ArrowRight": ("ArrowRight", 39),
    "ArrowDown": ("ArrowDown", 40),
    "1": ("Digit1", 49),
    "3": ("Digit3", 51),
}


class Browser:
    """Chromium with one page, spoken to over its DevTools pipe (fds 3 and 4 of the child)."""

    def __init__(self, executable: str, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds():  # runs in the child: its fd 3 reads commands, fd 4 writes replies
            read = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            write = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(read, 3)
            os.dup2(write, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
        flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
        flags += [
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--window-size=1000,1000",
        ]
        self.process = subprocess.Popen(
            [executable, *flags, "about:blank"],
            pass_fds=(3, 4),
            preexec_fn=child_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + HANG_GUARD
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            ready, _, _ = select.select([self._from_chrome], [], [], deadline - time.monotonic())
            if not ready:
                raise TimeoutError(f"chromium did not answer {method}")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited: {self.process.stderr.read()[-2000:]!r}")
            self._buffer += chunk

    def page(self, method: str, **params) -> dict:
        return self.send(method, session=self.session, **params)

    def js(self, expression: str):
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str) -> None:
        deadline = time.monotonic() + HANG_GUARD
        while not self.js(expression):
            if time.monotonic() > deadline:
                state = self.js("document.getElementById('study')?.dataset.state")
                raise TimeoutError(f"{expression} (page state {state!r})")
            time.sleep(0.02)

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element."""
        box = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            "return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.page(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    def press(self, key: str) -> None:
        code, key_code = KEYS[key]
        text = key if len(key) == 1 else ""
        for kind in ("keyDown", "keyUp"):
            self.page(
                "Input.dispatchKeyEvent",
                type=kind,
                key=key,
                code=code,
                windowsVirtualKeyCode=key_code,
                text=text if kind == "keyDown" else "",
            )

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def start_server(study: Path) -> tuple[subprocess.Popen, str]:
    """`sidpipe study serve` on a free port; (process, base URL)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sidpipe.cli", "study", "serve", str(study), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + HANG_GUARD
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
        line = process.stdout.readline() if ready else ""
        seen.append(line)
        if match := re.search(r"on (http://127\.0\.0\.1:\d+)/", line):
            return process, match.group(1)
        if process.poll() is not None:
            break
    process.kill()
    raise RuntimeError("the study server did not start:\n" + "".join(seen))


def ready_at(position: int) -> str:
    """JavaScript: the page shows screen `position`, ready for an answer."""
    return (
        f"(d => !!d && d.state === 'ready' && d.position === '{position}')"
        "(document.getElementById('study')?.dataset)"
    )


# What the scripted participant does on screen n (cycling): a mouse click on an element, or a
# key; and the answer that means.
ACTIONS = [
    ("click", "#left", "left"),  # the left image itself
    ("click", "#choose-right", "right"),
    ("click", "#choose-undecided", "undecided"),
    ("key", "ArrowLeft", "left"),
    ("key", "3", "right"),
    ("key", "ArrowDown", "undecided"),
    ("click", "#right", "right"),
    ("key", "1", "left"),
]


@pytest.fixture
def browser(chromium, tmp_path):
    browser = Browser(chromium, tmp_path / "profile")
    yield browser
    browser.close()


def test_a_participant_answers_every_screen_reloads_and_continues(browser, tmp_path):
    study = build_fixture_study(tmp_path, participants=4)
    server, base = start_server(study)
    try:
        plan = plan_of(study)
        participant = plan[0]["participant"]
        screens = [r for r in plan if r["participant"] == participant]
        files = {
            r["path"]: r["arm"]
            for r in csv.DictReader(open(study / "site/manifest.csv"))
            if r["kind"] == "generated"
        }
        browser.page("Page.enable")
        browser.page("Page.navigate", url=f"{base}/p/{participant}")
        clicked = []
        reload_after = len(screens) // 2 - 1  # midway, not on a subject boundary
        for n, screen in enumerate(screens):
            browser.wait_for(ready_at(n))
            progress = browser.js("document.getElementById('progress-text').textContent")
            assert progress.startswith(f"Question {n + 1} of {len(screens)}"), progress
            shown = browser.js(
                "(() => { const d = document.getElementById('study').dataset;"
                "const src = (id) => new URL(document.getElementById(id).src).pathname;"
                "return {subject: d.subject, prompt_id: +d.promptId, seed: +d.seed,"
                "question: d.question, left: src('left-img'), right: src('right-img'),"
                "references: document.querySelectorAll('#references img').length,"
                "prompt: document.getElementById('prompt').textContent}; })()"
            )
            assert (shown["subject"], shown["question"]) == (screen["subject"], screen["question"])
            assert (shown["prompt_id"], shown["seed"]) == (
                int(screen["prompt_id"]),
                int(screen["seed"]),
            )
            assert shown["references"] == 3 and shown["subject"].split("_")[1] in shown["prompt"]
            # the images on each side are the plan's arms
            assert files[shown["left"].removeprefix("/files/")] == screen["left_arm"]
            assert files[shown["right"].removeprefix("/files/")] == screen["right_arm"]
            kind, target, choice = ACTIONS[n % len(ACTIONS)]
            if kind == "click":
                browser.click(target)
            else:
                browser.press(target)
            clicked.append({**shown, "choice": choice})
            if n == reload_after:
                browser.wait_for(ready_at(n + 1))  # the answer is recorded
                browser.js("window.beforeReload = true")
                browser.page("Page.reload", ignoreCache=True)  # and it continues there
                browser.wait_for(f"!window.beforeReload && {ready_at(n + 1)}")
        browser.wait_for("document.getElementById('study')?.dataset.state === 'done'")
        done = browser.js("document.getElementById('progress-text').textContent")
        assert done == f"All {len(screens)} questions answered"
        # a second participant answers two screens, then leaves
        other = next(r["participant"] for r in plan if r["participant"] != participant)
        browser.page("Page.navigate", url=f"{base}/p/{other}")
        for n, action in enumerate(("ArrowRight", "ArrowDown")):
            browser.wait_for(ready_at(n))
            browser.press(action)
        browser.wait_for(ready_at(2))
    finally:
        server.terminate()
        server.wait(timeout=30)

    records = read_responses(study / "responses.jsonl")
    mine = [r for r in records if r["participant"] == participant]
    assert len(mine) == len(screens) and len(records) == len(screens) + 2
    for record, click, screen in zip(mine, clicked, screens, strict=True):
        assert record["choice"] == click["choice"]
        assert (record["subject"], record["prompt_id"], record["seed"], record["question"]) == (
            click["subject"],
            click["prompt_id"],
            click["seed"],
            click["question"],
        )
        assert (record["left_arm"], record["right_arm"]) == (
            screen["left_arm"],
            screen["right_arm"],
        )
        assert parse_time(record["shown_at"]) <= parse_time(record["answered_at"])
    theirs = [r["choice"] for r in records if r["participant"] == other]
    assert theirs == ["right", "undecided"]

    # the analysis on these very records
    metrics = write_subject_metrics(tmp_path / "subjects.csv")
    out = analysis_outputs(tmp_path, tmp_path / "plot")
    tables = analyze_study(study / "responses.jsonl", study / "site", metrics, out, n_boot=100)
    table = tables["table"]
    assert table.groupby("question")["n"].sum().to_dict() == {
        q: sum(r["question"] == q for r in records) for q in table["question"].unique()
    }
    for question, part in table.groupby("question"):
        expected = {arm: 0 for arm in [*ARMS, "undecided"]}
        for record in records:
            if record["question"] == question:
                side = {"left": record["left_arm"], "right": record["right_arm"]}
                expected[side.get(record["choice"], "undecided")] += 1
        assert part.set_index("preferred")["n"].to_dict() == expected
    assert Path(tmp_path / "plot.png").stat().st_size > 10_000
