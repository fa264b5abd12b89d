"""The study's web page and its small JSON API (Flask, served by waitress).

- `GET  /p/<participant>`: the page; one screen per question, the subject's references, the
  prompt, the pair (left/right as the plan says) and three answers (click or keys).
- `GET  /api/p/<participant>/next`: the first screen of the participant's plan without a
  judgement in the responses file (so a reload, or another device, continues there), with
  `shown_at`, the server's time of sending it, which the answer echoes.
- `POST /api/p/<participant>/answer`: `{subject, prompt_id, seed, question, choice, shown_at}`;
  the sides come from the plan, `answered_at` is the server's time. 200 once the record is on
  disk (`responses.ResponseLog`), 409 if that judgement is already recorded, 404 for an unknown
  participant or a screen not in their plan, 400 for a malformed body, 415 for a body that is
  not JSON, 413 for an oversized one; all but 200 write nothing.
- `GET  /files/<path>`: the site's images (only those its manifest lists).
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from flask import Flask, Response, abort, jsonify, render_template, request, send_from_directory

from sidpipe.human_study.responses import (
    CHOICES,
    ResponseLog,
    check_against_plan,
    judgement_key,
    now_iso,
    parse_time,
)
from sidpipe.io import SidpipeError, log

ANSWER_FIELDS = {"subject", "prompt_id", "seed", "question", "choice", "shown_at"}
CLOCK_SLACK = timedelta(seconds=5)  # shown_at may not lie in the future beyond this


@dataclass
class Study:
    """A built study site, read once when the server starts."""

    site: Path
    info: dict
    plan: dict[str, list[dict]] = field(default_factory=dict)  # participant -> screens
    screens: dict[tuple, dict] = field(default_factory=dict)  # judgement key -> plan row
    images: dict[tuple[str, str, int, int], str] = field(default_factory=dict)
    prompts: dict[tuple[str, int, int], str] = field(default_factory=dict)
    references: dict[str, list[str]] = field(default_factory=dict)
    files: set[str] = field(default_factory=set)

    @property
    def questions(self) -> dict[str, str]:
        return {q["id"]: q["text"] for q in self.info["questions"]}


def locate(directory: str | os.PathLike) -> tuple[Path, Path]:
    """(site, default responses file) of a study folder `results/human_study/<study>` (or of
    its `site/` folder itself)."""
    directory = Path(directory)
    for site in (directory / "site", directory):
        if (site / "study.json").is_file():
            return site, (site.parent if site.name == "site" else site) / "responses.jsonl"
    raise SidpipeError(
        f"{directory} is not a built study (no site/study.json): build it first, e.g. "
        f"`snakemake {directory}/site`"
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def load_study(site: str | os.PathLike) -> Study:
    site = Path(site)
    study = Study(site=site, info=json.loads((site / "study.json").read_text()))
    for row in _read_csv(site / "plan.csv"):
        row = {**row, "prompt_id": int(row["prompt_id"]), "seed": int(row["seed"])}
        row["position"] = int(row["position"])
        study.plan.setdefault(row["participant"], []).append(row)
        study.screens[judgement_key(row)] = row
    for screens in study.plan.values():
        screens.sort(key=lambda r: r["position"])
    references = defaultdict(list)
    for row in _read_csv(site / "manifest.csv"):
        study.files.add(row["path"])
        if row["kind"] == "reference":
            references[row["subject"]].append(row["path"])
        else:
            key = (row["subject"], int(row["prompt_id"]), int(row["seed"]))
            study.images[row["subject"], row["arm"], key[1], key[2]] = row["path"]
            study.prompts[key] = row["prompt"]
    study.references = dict(references)
    return study


def _error(status: int, message: str) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    return response


def create_app(directory: str | os.PathLike, responses: str | os.PathLike | None = None) -> Flask:
    """The study's Flask app; refuses a responses file recorded for another build."""
    site, default_responses = locate(directory)
    study = load_study(site)
    responses_log = ResponseLog(responses or default_responses)
    check_against_plan(responses_log.records, list(study.screens.values()), str(responses_log.path))
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 4096
    app.json.sort_keys = False
    app.extensions["sidpipe_study"] = study
    app.extensions["sidpipe_responses"] = responses_log

    def screens_of(participant: str) -> list[dict]:
        if participant not in study.plan:
            abort(404, description=f"unknown participant {participant!r}")
        return study.plan[participant]

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"  # the participant id is in the URL
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
            "form-action 'none'"
        )
        if request.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(400)
    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    @app.errorhandler(415)
    def http_error(err):
        if request.path.startswith("/api/"):
            return _error(err.code, err.description)
        return err

    @app.get("/")
    def index():
        return render_template("index.html", name=study.info["name"])

    @app.get("/p/<participant>")
    def page(participant: str):
        screens_of(participant)
        return render_template(
            "study.html",
            name=study.info["name"],
            participant=participant,
            api=app.url_for("next_screen", participant=participant).rsplit("/", 1)[0],
        )

    @app.get("/api/p/<participant>/next")
    def next_screen(participant: str):
        screens = screens_of(participant)
        answered = responses_log.answered()
        remaining = [s for s in screens if judgement_key(s) not in answered]
        body = {"participant": participant, "total": len(screens)}
        body["answered"] = len(screens) - len(remaining)
        if not remaining:
            return jsonify(body | {"done": True})
        screen = remaining[0]
        subjects = list(dict.fromkeys(s["subject"] for s in screens))
        pair = (screen["subject"], screen["prompt_id"], screen["seed"])
        image = study.images
        item = {
            "position": screen["position"],
            "subject": screen["subject"],
            "prompt_id": screen["prompt_id"],
            "seed": screen["seed"],
            "question": screen["question"],
            "question_text": study.questions[screen["question"]],
            "prompt": study.prompts[pair],
            "references": [
                app.url_for("file", path=p) for p in study.references.get(screen["subject"], [])
            ],
            "left": app.url_for("file", path=image[pair[0], screen["left_arm"], *pair[1:]]),
            "right": app.url_for("file", path=image[pair[0], screen["right_arm"], *pair[1:]]),
            "subject_number": subjects.index(screen["subject"]) + 1,
            "subjects": len(subjects),
            "shown_at": now_iso(),
        }
        return jsonify(body | {"done": False, "item": item})

    @app.post("/api/p/<participant>/answer")
    def answer(participant: str):
        screens_of(participant)
        if not request.is_json:
            abort(415, description="send the answer as application/json")
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(400, description="the body is not a JSON object")
        if set(body) != ANSWER_FIELDS:
            abort(400, description=f"the answer needs exactly {', '.join(sorted(ANSWER_FIELDS))}")
        for name in ("prompt_id", "seed"):
            if not isinstance(body[name], int) or isinstance(body[name], bool):
                abort(400, description=f"{name} must be an integer")
        for name in ("subject", "question"):
            if not isinstance(body[name], str):
                abort(400, description=f"{name} must be a string")
        if body["choice"] not in CHOICES:
            abort(400, description=f"choice must be one of {', '.join(CHOICES)}")
        answered_at = now_iso()
        shown = parse_time(body["shown_at"])
        if shown is None or shown > parse_time(answered_at) + CLOCK_SLACK:
            abort(400, description="shown_at must be the ISO 8601 time the server sent")
        key = (participant, body["subject"], body["prompt_id"], body["seed"], body["question"])
        screen = study.screens.get(key)
        if screen is None:
            abort(404, description=f"{key[1:]} is not a screen of participant {participant}")
        record = {
            "participant": participant,
            "subject": screen["subject"],
            "prompt_id": screen["prompt_id"],
            "seed": screen["seed"],
            "question": screen["question"],
            "left_arm": screen["left_arm"],
            "right_arm": screen["right_arm"],
            "choice": body["choice"],
            "shown_at": body["shown_at"],
            "answered_at": answered_at,
        }
        if not responses_log.append(record):
            return _error(409, "this judgement is already recorded")
        answered = responses_log.answered()
        done = sum(judgement_key(s) in answered for s in study.plan[participant])
        return jsonify(ok=True, answered=done, total=len(study.plan[participant]))

    @app.get("/files/<path:path>")
    def file(path: str):
        if path not in study.files:
            abort(404)
        return send_from_directory(site, path, max_age=3600)

    return app


def serve(
    directory: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    responses: str | os.PathLike | None = None,
    url_prefix: str = "",
    threads: int = 8,
) -> None:
    """Serve the study with waitress until interrupted; print where (port 0: any free port)."""
    from waitress import create_server

    app = create_app(directory, responses)
    study: Study = app.extensions["sidpipe_study"]
    responses_log: ResponseLog = app.extensions["sidpipe_responses"]
    url_prefix = url_prefix.rstrip("/")
    server = create_server(
        app, host=host, port=port, url_prefix=url_prefix, threads=threads, ident="sidpipe-study"
    )
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{shown_host}:{getattr(server, 'effective_port', port)}{url_prefix}"
    first = next(iter(study.plan))
    print(f"Serving study {study.info['name']} on {base}/", flush=True)
    print(
        f"  {len(study.plan)} participants, links {base}/p/<participant> "
        f"(e.g. {base}/p/{first}; all ids in {study.site / 'participants.csv'})",
        flush=True,
    )
    print(f"  responses: {responses_log.path} ({len(responses_log.records)} so far)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"  WARNING: bound to {host}: anyone who can reach this port can open the pages, "
            "over plain HTTP; put it behind a TLS reverse proxy (README 'The human study')",
            flush=True,
        )
    log.info("serving %s on %s", study.site, base)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


__all__ = ["create_app", "load_study", "locate", "serve"]
