"""Resumable training state: the RNG states, atomic checkpoints of one job (the newest kept)
and SIGTERM turned into a flag the loop checks between steps, so a killed job resumes
bit-exactly."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import random
import signal
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidpipe.io import SidpipeError, atomic_file, log

CHECKPOINT_VERSION = 1


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """SHA-256 of the tensors' bytes (None counts as absent): what the job trains on."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none")
            continue
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in Path(checkpoint_dir).glob("checkpoint-*.pt"):
        with contextlib.suppress(ValueError):
            found.append((int(path.stem.split("-", 1)[1]), path))
    return sorted(found)


def _remove_stale_temps(checkpoint_dir: Path) -> None:
    """A job killed (SIGKILL, node crash) inside torch.save leaves its hidden temp file."""
    for path in Path(checkpoint_dir).glob(".checkpoint-*.tmp-*"):
        path.unlink(missing_ok=True)


def save_checkpoint(checkpoint_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write `checkpoint-<step>.pt` atomically (temp file + rename), then drop older ones."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(checkpoint_dir)
    final = checkpoint_dir / f"checkpoint-{step:07d}.pt"
    with atomic_file(final, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        # On disk before the rename: a node crash must not leave a renamed but empty file.
        os.fsync(handle.fileno())
    for old_step, path in _checkpoints(checkpoint_dir):
        if old_step != step:
            path.unlink(missing_ok=True)
    return final


def _is_corrupt(err: Exception, path: Path) -> bool:
    """torch.load's errors for a truncated or garbled file (EINVAL from its zip reader). A
    RuntimeError counts only from the zip reader or on a file that is no zip: out of memory
    while loading is also a RuntimeError, and must not cost a good checkpoint."""
    if isinstance(err, OSError):
        return err.errno == errno.EINVAL
    if isinstance(err, RuntimeError):
        return "PytorchStreamReader" in str(err) or not zipfile.is_zipfile(path)
    return isinstance(err, (EOFError, pickle.UnpicklingError))


def load_latest(checkpoint_dir: Path, fingerprint: dict, steps: int) -> dict[str, Any] | None:
    """The newest readable checkpoint's state, or None. An unreadable one (a crash while it
    was written) is deleted, so a retry does not trip on it, and the next newest is tried."""
    for step, path in reversed(_checkpoints(checkpoint_dir)):
        try:
            # Our own file (it holds Python/NumPy RNG states, which weights_only refuses).
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            if not _is_corrupt(err, path):
                raise
            log.warning("%s is unreadable (%s: %s); deleting it", path, type(err).__name__, err)
            path.unlink(missing_ok=True)
            continue
        if state.get("version") != CHECKPOINT_VERSION or state.get("fingerprint") != fingerprint:
            log.warning("%s was written for other settings or data; starting from scratch", path)
            return None
        if step > steps:
            log.warning("%s is past the %d steps asked for; starting from scratch", path, steps)
            return None
        log.info("resuming from %s (step %d of %d)", path, step, steps)
        return state
    return None


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """A finished job's checkpoints (possibly GBs) are no longer needed."""
    for _, path in _checkpoints(checkpoint_dir):
        path.unlink(missing_ok=True)
    _remove_stale_temps(checkpoint_dir)


class TrainingInterrupted(SidpipeError):
    """SIGTERM (SLURM's time limit or scancel, Snakemake cancelling the job) or SIGINT (Ctrl-C)
    arrived: the loop saved a checkpoint after the step in flight; a rerun resumes from it."""


@contextlib.contextmanager
def sigterm_flag() -> Iterator[dict[str, int | None]]:
    """While training, SIGTERM and SIGINT only set a flag, so the loop can checkpoint and stop
    between steps instead of dying mid-step and losing everything since the last periodic
    checkpoint. (SLURM sends SIGTERM, then SIGKILL after KillWait; `--signal=TERM@<s>` gives
    more time; a terminal's Ctrl-C sends SIGINT.) A second SIGINT stops at once, as usual."""
    flag: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: object) -> None:
        if signum == signal.SIGINT and flag["signal"] is not None:
            raise KeyboardInterrupt
        flag["signal"] = signum

    # A SIGINT the process was started to ignore (a job run in the background) stays ignored.
    caught = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        caught.append(signal.SIGINT)
    previous = {sig: signal.signal(sig, handler) for sig in caught}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)
