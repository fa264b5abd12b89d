"""Small I/O helpers shared by every stage: atomic outputs, hashing, manifests, job logs."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

log = logging.getLogger("sidpipe")


class SidpipeError(RuntimeError):
    """An error a user can fix; its message names the file, the field and the fix."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only if the block succeeds.

    A failing job therefore leaves no partial output for Snakemake (or a user) to mistake
    for a finished one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """Open a temporary sibling file for writing; rename it to `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping], fieldnames: list[str]) -> None:
    """Write a tidy CSV atomically (header always written, even with no rows)."""
    with atomic_file(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_manifest(
    folder: str | os.PathLike, what: str, stage: str, columns: Iterable[str] = ()
) -> list[dict[str, str]]:
    """An upstream stage's `manifest.csv`, checked to exist, list rows and have `columns`."""
    path = Path(folder) / "manifest.csv"
    if not path.is_file():
        raise SidpipeError(f"{path} does not exist; run {stage} for these {what} first")
    rows = read_csv(path)
    if not rows:
        raise SidpipeError(f"{path} lists no {what}; re-run {stage}")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise SidpipeError(f"{path} lacks column(s) {', '.join(missing)}; re-run {stage}")
    return rows


@contextlib.contextmanager
def job_log(path: str | os.PathLike | None) -> Iterator[logging.Logger]:
    """Send this job's logging, warnings, stderr (tqdm) and stdout to its Snakemake log file."""
    if path is None:
        yield log
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as handle:
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        old_level = root.level
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = handle
        # Where the job ran: on a cluster this ties the log to the scheduler's job and GPU.
        log.info(
            "host=%s SLURM_JOB_ID=%s CUDA_VISIBLE_DEVICES=%s",
            os.uname().nodename,
            os.environ.get("SLURM_JOB_ID", "-"),
            os.environ.get("CUDA_VISIBLE_DEVICES", "-"),
        )
        try:
            yield log
        except Exception:
            log.exception("job failed")
            raise
        finally:
            sys.stdout, sys.stderr = old_out, old_err
            root.removeHandler(handler)
            root.setLevel(old_level)
