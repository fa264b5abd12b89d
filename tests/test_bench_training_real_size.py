"""The GPU training benchmark's machinery (benchmarks/bench_training_real_size.py), run on the
tiny models on CPU: each option set reaches its own training job, and the results are read
back from that job."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_training_real_size as bench  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_option_set_is_its_own_measured_job(tmp_path: Path) -> None:
    subject = bench.demo_subject(tmp_path / "subject")
    # A job that fails (as one out of GPU memory would) is reported, and the others still run.
    runs = [("fp64", False, False, True), ("no", False, False, True), ("no", True, True, False)]
    settings = bench.paper_dreambooth_settings()
    assert settings["train_text_encoder"] and settings["prior_preservation"]

    results = bench.measure_dreambooth(subject, tmp_path, 2, runs, "cpu", settings)

    failed, *measured = results
    assert failed["mixed_precision"] == "fp64" and "mixed_precision 'fp64'" in failed["error"]
    assert [
        (r["gradient_checkpointing"], r["use_8bit_adam"], r["cache_latents"]) for r in measured
    ] == [(False, False, True), (True, True, False)]
    for result in measured:
        assert "error" not in result
        assert result["steps_per_second"] > 0
        assert result["peak_allocated_gib"] > 0
        assert result["peak_reserved_gib"] is None  # no CUDA allocator on CPU
    assert not list(tmp_path.glob("run-*"))  # GBs per run at full size: removed once read
    speedup = bench.caching_speedup(results)
    assert speedup == round(measured[0]["steps_per_second"] / measured[1]["steps_per_second"], 2)


def test_caching_speedup_needs_a_cached_and_an_uncached_run() -> None:
    same = {"cache_latents": True, "steps_per_second": 2.0}
    assert bench.caching_speedup([same, same]) is None
    assert bench.caching_speedup([same]) is None
    assert bench.caching_speedup([same, {**same, "cache_latents": False, "error": "OOM"}]) is None
    assert bench.caching_speedup([same, {**same, "cache_latents": False}]) == 1.0


def test_without_cuda_it_reports_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.bench_training_real_size() == {
        "name": "training_real_size",
        "skipped": "no CUDA device",
    }
