"""The demo through a real single-node SLURM cluster (slurmctld + slurmd + munge on this machine),
submitted by `snakemake --profile slurm` exactly as on a cluster, with the site overrides of
tests/slurm/profile. Skipped only where the Debian packages cannot be installed (not root)."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests/slurm/local_cluster.sh"
# Every call is bounded: a confused executor can otherwise wait forever (see the notes).
LIMIT = ["timeout", "-k", "10"]
TARGETS = ["results/references/summary.csv", "results/experiments/arms.csv"]
TARGETS += [f"results/masks/{s}/manifest.csv" for s in ("red_mug", "toy_robot", "spotted_dog")]


def _run(cmd, seconds, **kwargs):
    return subprocess.run(
        [*LIMIT, str(seconds), *map(str, cmd)], capture_output=True, text=True, **kwargs
    )


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root to install and start its daemons")
    install = _run(["bash", CLUSTER, "install"], 600)
    if install.returncode != 0:
        pytest.skip(f"cannot install slurmctld/slurmd/munge here: {install.stderr[-500:]}")
    # not under pytest's private (0700) temp folder: munged, as user munge, must reach it
    state = Path(tempfile.mkdtemp(prefix="sidpipe-slurm-", dir="/tmp"))
    up = _run(["bash", CLUSTER, "up", state], 120)
    assert up.returncode == 0, up.stdout + up.stderr
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "HF_HUB_OFFLINE": "1"}
    # snakemake and the jobs it submits must find this virtualenv's tools first
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    yield env
    _run(["bash", CLUSTER, "down", state], 120)


def _workdir(tmp_path: Path) -> Path:
    workdir = tmp_path / "demo"
    shutil.copytree(REPO / "demo", workdir, ignore=shutil.ignore_patterns("results", ".snakemake"))
    return workdir


def _snakemake(workdir: Path, profiles: list[str], targets=TARGETS) -> list[str]:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", REPO / "Snakefile"]
    for profile in profiles:
        cmd += ["--profile", profile]
    return [
        *map(str, cmd),
        "--configfile",
        str(workdir / "config.yaml"),
        "--directory",
        str(workdir),
        *targets,
    ]


SLURM = ["slurm", "tests/slurm/profile"]


def _submitted(output: str) -> list[str]:
    return re.findall(r"submitted with SLURM jobid (\d+)", output)


def _manifests(workdir: Path) -> dict[str, list[dict]]:
    files = sorted((workdir / "results").glob("*/*/manifest.csv"))
    keep = lambda row: {k: v for k, v in row.items() if k not in {"source_path"}}  # noqa: E731
    return {str(p.relative_to(workdir)): [keep(r) for r in csv.DictReader(open(p))] for p in files}


def test_demo_runs_through_slurm_like_locally(cluster, tmp_path):
    workdir = _workdir(tmp_path / "slurm")
    result = _run(_snakemake(workdir, SLURM), 600, cwd=REPO, env=cluster)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _submitted(result.stdout + result.stderr), "jobs went through sbatch"
    # each job's log names its SLURM job; the GPU rule (Grounded-SAM) got the fake GPU
    prepare_log = (workdir / "results/logs/prepare_references/red_mug.log").read_text()
    assert re.search(r"SLURM_JOB_ID=\d+", prepare_log)
    gpu_log = (workdir / "results/logs/segment_references/toy_robot.log").read_text()
    assert re.search(r"SLURM_JOB_ID=\d+ CUDA_VISIBLE_DEVICES=0", gpu_log)
    # the same outputs as a local run
    local = _workdir(tmp_path / "local")
    local_run = _run(_snakemake(local, ["demo/profile"]), 600, cwd=REPO, env=cluster)
    assert local_run.returncode == 0, local_run.stderr[-3000:]
    assert _manifests(workdir) == _manifests(local)
    assert len(_manifests(local)) >= 6


def test_failing_job_is_reported_and_the_run_exits_nonzero(cluster, tmp_path):
    workdir = _workdir(tmp_path)
    for extra in ("02", "03", "04"):
        (workdir / f"subjects/spotted_dog/{extra}.png").unlink()
    start = time.monotonic()
    result = _run(
        _snakemake(workdir, SLURM, ["results/references/summary.csv"]), 300, cwd=REPO, env=cluster
    )
    assert result.returncode not in (0, 124, 137), "failed, and did not hang until the timeout"
    assert time.monotonic() - start < 280
    output = result.stdout + result.stderr
    assert "Error in rule prepare_references" in output and "spotted_dog" in output
    log = (workdir / "results/logs/prepare_references/spotted_dog.log").read_text()
    assert "found 1 reference image(s) but at least 3" in log
    # keep-going: the other subjects finished
    assert (workdir / "results/references/red_mug/manifest.csv").exists()


def test_interrupted_run_completes_without_redoing_finished_jobs(cluster, tmp_path):
    workdir = _workdir(tmp_path)
    cmd = [*LIMIT, "300", *_snakemake(workdir, SLURM)]
    process = subprocess.Popen(
        cmd, cwd=REPO, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    # interrupt once Snakemake itself has registered a finished job (an output file alone may
    # still be deleted as incomplete when the run is interrupted)
    while process.poll() is None and time.monotonic() < deadline:
        if any("Finished jobid" in line and "prepare_references" in line for line in lines):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)  # as a user's Ctrl-C
    process.wait(timeout=120)
    reader.join(timeout=10)
    first = "".join(lines)
    subprocess.run(["scancel", "--user", "root"], env=cluster, check=False)
    time.sleep(2)
    unlock = [sys.executable, "-m", "snakemake", "--unlock", "--snakefile", REPO / "Snakefile"]
    unlock += ["--directory", workdir, "--configfile", workdir / "config.yaml"]
    _run(unlock, 60, env=cluster)
    finished = {
        p: p.stat().st_mtime for p in (workdir / "results/references").glob("*/manifest.csv")
    }
    assert finished, "at least one job finished before the interruption:\n" + first[-3000:]
    assert not all((workdir / t).exists() for t in TARGETS), "the run was cut short"
    second = _run(_snakemake(workdir, SLURM), 600, cwd=REPO, env=cluster)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    for path, mtime in finished.items():
        assert path.stat().st_mtime == mtime, f"{path} was redone"
        redone = re.search(
            r"rule prepare_references:\n(?:[ \t]+.*\n)*?[ \t]+wildcards: subject="
            + path.parent.name
            + r"\n",
            output,
        )
        assert redone is None, f"{path.parent.name}'s references were prepared again"
    assert _submitted(output), "the rest went through sbatch"
    for target in TARGETS:
        assert (workdir / target).exists(), target
