"""The overhead benchmark's machinery (benchmarks/bench_overhead.py), without its long runs."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_overhead as bench  # noqa: E402


def test_a_stage_runs_in_a_fresh_process_with_the_given_package(tmp_path: Path) -> None:
    result = bench.time_stage(REPO / "src", "compare_samples", "new", {})
    assert "error" not in result, result
    assert result["libraries"] == []  # compare_samples imports no torch
    parts = result["startup_s"] + result["import_s"] + result["load_s"]
    assert abs(parts - result["total_s"]) < 1e-6
    other = tmp_path / "src/sidpipe"  # the baseline's tree is imported, not the installed one
    other.mkdir(parents=True)
    for name in ("__init__.py", "io.py"):
        (other / name).write_text("")
    (other / "sampling.py").write_text("raise ImportError('the other tree')\n")
    assert "the other tree" in bench.time_stage(other.parent, "compare_samples", "old", {})["error"]


def test_a_missing_baseline_is_skipped_with_the_reason(tmp_path: Path) -> None:
    with bench._baseline_tree(tmp_path, "0" * 40) as (tree, reason):
        assert tree is None and "not in this clone" in reason


def test_workflow_ratios_are_of_medians() -> None:
    def run(wall: float, cpu: float) -> dict:
        return {"wall_seconds": wall, "benchmarked_jobs_cpu_seconds": cpu}

    runs = {"old": [run(800, 400), run(900, 500)], "new": [run(400, 100), run(400, 300)]}
    out = bench._compare_workflows(runs, cores=2)
    assert out["old_over_new"] == 2.12 and out["cpu_old_over_new"] == 2.25
    assert out["target_met"]
    assert "old_over_new" not in bench._compare_workflows({"new": runs["new"]}, cores=2)
