"""What a finished training run leaves in its folder: the method's weights, the loss per step
(training_log.csv and loss_curve.png) and train_info.json, written together atomically."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import numpy as np
import torch

from sidpipe.io import SidpipeError, atomic_dir, write_csv
from sidpipe.training.base import Trainer

LOG_FIELDS = ["step", "loss", "lr", "instance_loss", "prior_loss"]


def plot_loss(rows: list[dict], path: Path, title: str) -> None:
    """Loss per step (thin), its running mean (thick) and the prior loss, if any."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    steps = [row["step"] for row in rows]
    loss = np.array([row["loss"] for row in rows], dtype=float)
    if len(loss):
        window = max(1, len(loss) // 20)
        ax.plot(steps, loss, lw=0.6, alpha=0.5 if window > 1 else 1.0, color="C0", label="loss")
        if window > 1:
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, lw=1.5, color="C0", label=f"mean of {window}")
        prior = [(row["step"], row["prior_loss"]) for row in rows if row["prior_loss"] != ""]
        if prior:
            ax.plot(*zip(*prior, strict=True), lw=0.6, alpha=0.6, color="C1", label="prior loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def peak_memory(device: torch.device) -> int:
    """The job's peak memory in bytes: allocated on a GPU, resident on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux (the process' peak resident set, not just this job).
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def write_training_outputs(
    out_dir: Path, trainer: Trainer, algorithm: str, rows: list[dict], info: dict
) -> None:
    """weights/ (the trainer's files, each checked), training_log.csv, loss_curve.png and
    train_info.json in `out_dir`, which appears only once all of them are written."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "weights").mkdir()
        trainer.save(tmp / "weights")
        lacking = [name for name in trainer.weight_files if not (tmp / "weights" / name).is_file()]
        if lacking:
            raise SidpipeError(f"{algorithm}: save() wrote no {', '.join(lacking)}")
        write_csv(tmp / "training_log.csv", rows, [*LOG_FIELDS, *trainer.log_fields])
        plot_loss(
            rows, tmp / "loss_curve.png", f"{algorithm}: {out_dir.parent.name}/{out_dir.name}"
        )
        (tmp / "train_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
