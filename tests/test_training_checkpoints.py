"""sidpipe.training.checkpoints: permissions, crash leftovers and unreadable checkpoints."""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
from pathlib import Path

import pytest
import torch

from sidpipe.training.checkpoints import (
    CHECKPOINT_VERSION,
    load_latest,
    remove_checkpoints,
    save_checkpoint,
)

FINGERPRINT = {"data": "abc"}


def state(step: int) -> dict:
    return {
        "version": CHECKPOINT_VERSION,
        "fingerprint": FINGERPRINT,
        "weights": torch.full((64,), float(step)),
    }


def checkpoint_bytes(step: int) -> bytes:
    buffer = io.BytesIO()
    torch.save(state(step), buffer)
    return buffer.getvalue()


def test_checkpoints_take_the_umask(tmp_path: Path) -> None:
    """mkstemp makes a private file; the checkpoint gets the umask's mode like any output."""
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path, 3, state(3))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-0000003.pt"]


# Each way torch.load fails on a checkpoint cut short by a crash (or filled with garbage).
CORRUPT = {
    "empty": lambda data: b"",  # EOFError
    "half": lambda data: data[: len(data) // 2],  # RuntimeError (no zip central directory)
    "tail": lambda data: data[:-10],  # OSError EINVAL
    "garbage": lambda data: b"\x00garbage" * 10,  # pickle.UnpicklingError
}


@pytest.mark.parametrize("kind", CORRUPT)
def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    (tmp_path / "checkpoint-0000002.pt").write_bytes(checkpoint_bytes(2))
    corrupt = tmp_path / "checkpoint-0000004.pt"
    corrupt.write_bytes(CORRUPT[kind](checkpoint_bytes(4)))
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        loaded = load_latest(tmp_path, FINGERPRINT, steps=10)
    assert loaded is not None and torch.equal(loaded["weights"], state(2)["weights"])
    assert str(corrupt) in caplog.text
    assert not corrupt.exists()  # a retry does not trip on it again
    assert load_latest(tmp_path, FINGERPRINT, steps=10) is not None


def test_only_an_unreadable_checkpoint_starts_from_scratch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt = tmp_path / "checkpoint-0000004.pt"
    corrupt.write_bytes(checkpoint_bytes(4)[:100])
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        assert load_latest(tmp_path, FINGERPRINT, steps=10) is None
    assert str(corrupt) in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_past_the_steps_asked_for_is_not_resumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rerun asking for fewer steps than a checkpoint holds starts from scratch."""
    path = save_checkpoint(tmp_path, 8, state(8))
    with caplog.at_level(logging.WARNING, logger="sidpipe"):
        assert load_latest(tmp_path, FINGERPRINT, steps=5) is None
    assert f"{path} is past the 5 steps asked for" in caplog.text
    assert load_latest(tmp_path, FINGERPRINT, steps=8) is not None  # as many steps: resumed


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EIO, "Input/output error"),
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 4 GB"),
    ],
    ids=["io", "out_of_memory"],
)
def test_a_failed_read_of_a_sound_file_is_raised_and_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch, error: Exception
) -> None:
    """Only a damaged file is deleted, not one a flaky disk or network filesystem failed to
    read this time, nor one too large for this attempt's memory (the retry has more)."""
    path = save_checkpoint(tmp_path, 2, state(2))

    def failing_load(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(type(error)):
        load_latest(tmp_path, FINGERPRINT, steps=10)
    assert path.is_file()


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    """A SIGKILL inside torch.save leaves the hidden temp file behind (possibly GBs)."""
    stale = tmp_path / ".checkpoint-0000003.pt.tmp-k1ll3d"
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path, 4, state(4))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-0000004.pt"]
    stale.write_bytes(b"half a checkpoint")
    remove_checkpoints(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_training_catches_sigint_unless_it_is_ignored() -> None:
    """Ctrl-C checkpoints like SIGTERM; a process started to ignore SIGINT (run in the
    background) keeps ignoring it. Both handlers come back afterwards."""
    import signal

    from sidpipe.training.checkpoints import sigterm_flag

    old = signal.getsignal(signal.SIGINT)
    try:
        for start in (signal.default_int_handler, signal.SIG_IGN):
            signal.signal(signal.SIGINT, start)
            term = signal.getsignal(signal.SIGTERM)
            with sigterm_flag() as flag:
                caught = signal.getsignal(signal.SIGINT)
                if start is signal.SIG_IGN:
                    assert caught is signal.SIG_IGN
                else:
                    assert caught not in (start, signal.SIG_IGN)
                    signal.raise_signal(signal.SIGINT)
                    assert flag["signal"] == signal.SIGINT
            assert signal.getsignal(signal.SIGINT) is start
            assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGINT, old)
