"""The participants' judgements: one JSON object per line, appended durably, never twice.

A record: {participant, subject, prompt_id, seed, question, left_arm, right_arm, choice,
shown_at, answered_at}; `choice` is left, right or undecided ("cannot determine / both
equally"); times are UTC ISO 8601. A judgement is identified by (participant, subject,
prompt_id, seed, question): the log holds each at most once.

Appending takes a thread lock and an exclusive `flock` on the file (so two servers on one file
cannot both record a judgement), re-reads what others appended, writes one line with a single
`write` on an O_APPEND descriptor, then `fsync`s it before the answer is acknowledged. A line
without its newline at the end of the file is a write that never finished (so was never
acknowledged): it is cut off, with a warning, before the next append.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from sidpipe.io import SidpipeError, log

RECORD_FIELDS = (
    "participant",
    "subject",
    "prompt_id",
    "seed",
    "question",
    "left_arm",
    "right_arm",
    "choice",
    "shown_at",
    "answered_at",
)
KEY_FIELDS = ("participant", "subject", "prompt_id", "seed", "question")
CHOICES = ("left", "right", "undecided")

Key = tuple[str, str, int, int, str]


def now_iso() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def parse_time(value: object) -> datetime | None:
    """An ISO 8601 time with a UTC offset, or None when `value` is not one."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def judgement_key(record: Mapping) -> Key:
    return (
        str(record["participant"]),
        str(record["subject"]),
        int(record["prompt_id"]),
        int(record["seed"]),
        str(record["question"]),
    )


def record_problem(record: object) -> str | None:
    """Why `record` is not a well-formed judgement, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        return f"lacks {', '.join(missing)}"
    extra = sorted(set(record) - set(RECORD_FIELDS))
    if extra:
        return f"has unknown field(s) {', '.join(extra)}"
    for field in ("prompt_id", "seed"):
        if not isinstance(record[field], int) or isinstance(record[field], bool):
            return f"{field} is not an integer"
    for field in ("participant", "subject", "question", "left_arm", "right_arm"):
        if not isinstance(record[field], str) or not record[field]:
            return f"{field} is not a non-empty string"
    if record["choice"] not in CHOICES:
        return f"choice must be one of {', '.join(CHOICES)}"
    for field in ("shown_at", "answered_at"):
        if parse_time(record[field]) is None:
            return f"{field} is not an ISO 8601 time with a UTC offset"
    return None


def _parse_lines(data: bytes, path: Path, first_line: int) -> list[dict]:
    records = []
    for n, raw in enumerate(data.split(b"\n")[:-1], start=first_line):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SidpipeError(f"{path}, line {n}: not JSON ({err})") from None
        problem = record_problem(record)
        if problem:
            raise SidpipeError(f"{path}, line {n}: the judgement {problem}")
        records.append(record)
    return records


def read_responses(path: str | os.PathLike) -> list[dict]:
    """Every complete record of a responses file (an unfinished last line is skipped, with a
    warning); a malformed line or a judgement recorded twice is an error naming the line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SidpipeError(
            f"{path} does not exist: no participant has answered yet (serve the study with "
            "`sidpipe study serve`, README 'The human study')"
        ) from None
    if data and not data.endswith(b"\n"):
        log.warning("%s ends with an unfinished line (never acknowledged): ignored", path)
    records = _parse_lines(data, path, 1)
    seen: dict[Key, int] = {}
    for n, record in enumerate(records, start=1):
        key = judgement_key(record)
        if key in seen:
            raise SidpipeError(
                f"{path}: judgement {key} is recorded twice (records {seen[key]}, {n})"
            )
        seen[key] = n
    return records


def check_against_plan(records: Iterable[Mapping], plan: Sequence[Mapping], source: str) -> None:
    """Every record must be a screen of the plan, with the plan's sides: responses recorded for
    another build of the study would otherwise be analysed as if they were this one's."""
    planned = {judgement_key(row): (row["left_arm"], row["right_arm"]) for row in plan}
    for n, record in enumerate(records, start=1):
        key = judgement_key(record)
        if key not in planned:
            raise SidpipeError(
                f"{source}: judgement {n} {key} is not in the study's plan: the responses were "
                "recorded for another build of the study (other participants, subjects, pairs "
                "or questions). Keep them with the study they belong to: move the file away, or "
                "give the new study another human_study.name"
            )
        if (record["left_arm"], record["right_arm"]) != planned[key]:
            raise SidpipeError(
                f"{source}: judgement {n} {key} showed {record['left_arm']} left and "
                f"{record['right_arm']} right, the plan says otherwise: the responses belong to "
                "another build of the study (move them away or rename the new study)"
            )


class ResponseLog:
    """The append-only responses file of a running study (thread- and process-safe)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._offset = 0  # bytes of complete lines read so far
        self._line = 1
        self.records: list[dict] = []
        self._keys: set[Key] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        """Read the complete lines appended since the last read (by us or another process)."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        new = _parse_lines(data[:end], self.path, self._line)
        for record in new:
            key = judgement_key(record)
            if key in self._keys:
                raise SidpipeError(f"{self.path}: judgement {key} is recorded twice")
            self._keys.add(key)
            self.records.append(record)
        self._line += data[:end].count(b"\n")
        self._offset += end

    def __contains__(self, key: Key) -> bool:
        return key in self._keys

    def answered(self) -> set[Key]:
        """The judgements recorded so far, including those another process appended."""
        with self._lock:
            self._refresh()
            return set(self._keys)

    def append(self, record: dict) -> bool:
        """Write `record` durably; False (nothing written) when its judgement is already there."""
        problem = record_problem(record)
        if problem:
            raise SidpipeError(f"not a judgement: it {problem}")
        line = json.dumps({f: record[f] for f in RECORD_FIELDS}, ensure_ascii=False) + "\n"
        key = judgement_key(record)
        with self._lock:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._refresh()
                if key in self._keys:
                    return False
                size = os.fstat(fd).st_size
                if size > self._offset:
                    log.warning(
                        "%s: cutting off an unfinished last line (%d bytes, never acknowledged)",
                        self.path,
                        size - self._offset,
                    )
                    os.ftruncate(fd, self._offset)
                data = line.encode()
                written = os.write(fd, data)
                if written != len(data):  # a full disk: undo the partial line
                    os.ftruncate(fd, self._offset)
                    raise OSError(f"only {written} of {len(data)} bytes written to {self.path}")
                os.fsync(fd)
                if created:  # the file's directory entry must survive a crash too
                    dir_fd = os.open(self.path.parent, os.O_RDONLY)
                    try:
                        os.fsync(dir_fd)
                    finally:
                        os.close(dir_fd)
                self._refresh()
                return True
            finally:
                os.close(fd)  # releases the flock


__all__ = [
    "CHOICES",
    "KEY_FIELDS",
    "RECORD_FIELDS",
    "ResponseLog",
    "check_against_plan",
    "judgement_key",
    "now_iso",
    "parse_time",
    "read_responses",
    "record_problem",
]
