"""A training run's settings checks (`training.build`) and its outputs (`training.outputs`),
without a model: a trainer that writes given weight files stands in for a method."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from sidpipe.io import SidpipeError, read_csv
from sidpipe.training.build import check_settings
from sidpipe.training.outputs import write_training_outputs

ROWS = [
    {"step": 1, "loss": 0.5, "lr": 1e-4, "instance_loss": 0.3, "prior_loss": 0.2, "reg": 0.1},
    {"step": 2, "loss": 0.4, "lr": 1e-4, "instance_loss": 0.25, "prior_loss": 0.15, "reg": 0.0},
]


def trainer(writes: list[str], expects: list[str]) -> SimpleNamespace:
    def save(folder: Path) -> None:
        for name in writes:
            (folder / name).write_bytes(b"weights")

    return SimpleNamespace(save=save, weight_files=expects, log_fields=["reg"])


def test_outputs_are_written_together(tmp_path: Path) -> None:
    out = tmp_path / "train/dreambooth/sid/mug"
    info = {"algorithm": "dreambooth", "steps": 2}
    write_training_outputs(out, trainer(["w.safetensors"], ["w.safetensors"]), "db", ROWS, info)
    assert sorted(p.name for p in out.iterdir()) == [
        "loss_curve.png",
        "train_info.json",
        "training_log.csv",
        "weights",
    ]
    assert (out / "weights/w.safetensors").read_bytes() == b"weights"
    log_rows = read_csv(out / "training_log.csv")
    assert [row["reg"] for row in log_rows] == ["0.1", "0.0"]  # the method's own log field
    assert json.loads((out / "train_info.json").read_text()) == info
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["mug"]  # no temporary folder left


def test_a_missing_weight_file_leaves_the_previous_output_whole(tmp_path: Path) -> None:
    out = tmp_path / "run"
    write_training_outputs(out, trainer(["a.bin"], ["a.bin"]), "svdiff", ROWS, {"n": 1})
    broken = trainer(["a.bin"], ["a.bin", "b.bin"])
    with pytest.raises(SidpipeError, match=r"svdiff: save\(\) wrote no b\.bin"):
        write_training_outputs(out, broken, "svdiff", ROWS, {"n": 2})
    assert json.loads((out / "train_info.json").read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize(
    ("settings", "kwargs", "message"),
    [
        ({"steps": 0}, {}, "steps must be a positive integer, got 0"),
        ({"steps": 2.5}, {}, "steps must be a positive integer, got 2.5"),
        ({"steps": 2, "batch_size": 0}, {}, "batch_size must be at least 1, got 0"),
        ({"steps": 2}, {"mixed_precision": "fp8"}, "'fp8' is not one of no, fp16, bf16"),
        ({"steps": 2}, {"checkpoint_every": 0}, "checkpoint_every must be at least 1, got 0"),
        ({"steps": 2, "masked": True}, {"masks_dir": None}, "masked is on but no masks"),
    ],
)
def test_settings_a_run_cannot_start_with(settings: dict, kwargs: dict, message: str) -> None:
    args = {"class_images_dir": None, "masks_dir": Path("m"), "mixed_precision": "no"}
    args.update({"checkpoint_every": 10, **kwargs})
    with pytest.raises(SidpipeError, match=message):
        check_settings(settings, **args)


def test_good_settings_pass() -> None:
    check_settings({"steps": 1, "prior_preservation": True}, Path("c"), None, "bf16", 1)
