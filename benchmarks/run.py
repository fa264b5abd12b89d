"""`make bench`: speed figures as JSON under results/bench/.

dag.json: wall time and job count of building the DAG of the paper's full grid (config.yaml,
a dry-run), median of a few repeats, so a change that slows Snakemake's start-up shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _arm_subject_pairs() -> int:
    """(arm, subject) pairs of the paper grid: the train/sample/score jobs per stage."""
    from sidpipe.config import all_arm_subjects, load_config, load_subjects

    config = load_config(REPO / "config.yaml")
    subjects = [row["subject"] for row in load_subjects(REPO / "subjects.tsv", config, REPO)]
    return len(all_arm_subjects(config, subjects))


def bench_dag(repeats: int) -> dict:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--directory", str(REPO), "--dry-run", "--quiet", "rules"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    times, out = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        times.append(time.perf_counter() - start)
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", out, re.MULTILINE)}
    return {
        "name": "dag_paper_grid",
        "config": "config.yaml",
        "repeats": repeats,
        "wall_seconds_median": round(statistics.median(times), 3),
        "wall_seconds_all": [round(t, 3) for t in times],
        "jobs_total": jobs.pop("total", None),
        "jobs_per_rule": jobs,
        "arm_subject_pairs": _arm_subject_pairs(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "results/bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = bench_dag(args.repeats)
    path = args.out / "dag.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    main()
