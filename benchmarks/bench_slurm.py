"""The demo through the local SLURM cluster (tests/slurm/local_cluster.sh) against the demo run
locally (demo/profile, the same 2 cores): wall time, and the number of sbatch submissions with
the SLURM profile's grouping of small CPU jobs and without it (the same profile, `groups` and
`group-components` removed). Needs root, like the SLURM tests; otherwise reports `skipped`.

    python benchmarks/bench_slurm.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests/slurm/local_cluster.sh"
LIMIT_SECONDS = 3600


def _ungrouped_profile(folder: Path) -> Path:
    """slurm/config.yaml without its job groups."""
    profile = yaml.safe_load((REPO / "slurm/config.yaml").read_text())
    profile.pop("groups", None)
    profile.pop("group-components", None)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def _run_demo(workdir: Path, profiles: list[str], env: dict) -> dict:
    shutil.copytree(REPO / "demo", workdir, ignore=shutil.ignore_patterns("results", ".snakemake"))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    for profile in profiles:
        cmd += ["--profile", profile]
    cmd += ["--configfile", str(workdir / "config.yaml"), "--directory", str(workdir)]
    start = time.perf_counter()
    result = subprocess.run(
        ["timeout", "-k", "10", str(LIMIT_SECONDS), *cmd],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    done = re.findall(r"(\d+) of (\d+) steps \(100%\) done", output)
    return {
        "wall_seconds": round(seconds, 1),
        "jobs": int(done[-1][1]) if done else None,
        "sbatch_submissions": len(re.findall(r"submitted with SLURM jobid \d+", output)),
    }


def bench_slurm() -> dict:
    if os.geteuid() != 0:
        return {"name": "slurm_demo", "skipped": "needs root for the local SLURM cluster"}
    install = subprocess.run(["bash", CLUSTER, "install"], capture_output=True, text=True)
    if install.returncode != 0:
        return {"name": "slurm_demo", "skipped": f"cannot install SLURM: {install.stderr[-300:]}"}
    state = Path(tempfile.mkdtemp(prefix="sidpipe-slurm-bench-", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="sidpipe-slurm-bench-work-"))
    subprocess.run(["bash", CLUSTER, "up", state], check=True, capture_output=True)
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    try:
        site = str(REPO / "tests/slurm/profile")
        runs = {
            "local": _run_demo(work / "local", [str(REPO / "demo/profile")], env),
            "slurm_grouped": _run_demo(work / "grouped", [str(REPO / "slurm"), site], env),
            "slurm_ungrouped": _run_demo(
                work / "ungrouped", [str(_ungrouped_profile(work / "profile")), site], env
            ),
        }
    finally:
        subprocess.run(["bash", CLUSTER, "down", state], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "name": "slurm_demo",
        **runs,
        "slurm_over_local_wall_time": round(
            runs["slurm_grouped"]["wall_seconds"] / runs["local"]["wall_seconds"], 2
        ),
        "submissions_saved_by_grouping": runs["slurm_ungrouped"]["sbatch_submissions"]
        - runs["slurm_grouped"]["sbatch_submissions"],
        "note": "one node of this machine's cores with one fake GPU per core; the local run "
        "uses the same cores (demo/profile)",
    }


def main() -> None:
    print(json.dumps(bench_slurm(), indent=2))


if __name__ == "__main__":
    main()
