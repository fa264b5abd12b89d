"""The demo through a real single-node SLURM cluster (slurmctld + slurmd + munge on this
machine, one fake GPU per core), submitted by `snakemake --profile slurm` exactly as on a cluster,
with the site overrides of tests/slurm/profile: a slice of it redone byte-identically to the local
run, plus failure, interruption and time-limit signals. Skipped only where the Debian packages
cannot be installed (not root)."""

import json
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
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests/slurm/local_cluster.sh"
# Every call is bounded: a confused executor can otherwise wait forever (see the notes).
LIMIT = ["timeout", "-k", "10"]
TARGETS = ["results/references/summary.csv", "results/experiments/arms.csv"]
TARGETS += [f"results/masks/{s}/manifest.csv" for s in ("blue_mug", "toy_robot", "spotted_dog")]


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


# Files that record when or how fast, not what: the rest must be byte-identical.
TIMING_KEYS = {"seconds", "steps_per_second", "setup_seconds", "cache_seconds"}
TIMING_KEYS |= {"peak_memory_bytes"}
# The rules the SLURM profile groups into small_cpu jobs (read, so the two cannot drift apart).
_PROFILE = yaml.safe_load((REPO / "slurm/config.yaml").read_text())
SMALL_CPU = [rule for rule, group in _PROFILE["groups"].items() if group == "small_cpu"]
GPU_RULES = ["class_images", "train", "sample", "sample_and_attention", "score"]


def _results(workdir: Path) -> dict[str, bytes]:
    """Every result file but logs, benchmarks, the report and the samples' mtime records."""
    root = workdir / "results"
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.parts[0] in {"logs", "benchmarks"}:
            continue
        if path.name in {"report.html", ".sampling.json"}:
            continue
        data = path.read_bytes()
        if path.name == "train_info.json":
            info = {k: v for k, v in json.loads(data).items() if k not in TIMING_KEYS}
            data = json.dumps(info, sort_keys=True).encode()
        out[str(rel)] = data
    return out


def _job_ids(workdir: Path, rule: str) -> dict[str, tuple[str, str, str]]:
    """log file -> (the SLURM job that wrote it, the GPUs it saw, its HF_HUB_OFFLINE)."""
    found = {}
    for log in (workdir / "results/logs" / rule).rglob("*.log"):
        match = re.search(
            r"SLURM_JOB_ID=(\d+) CUDA_VISIBLE_DEVICES=(\S+) HF_HUB_OFFLINE=(\S+)", log.read_text()
        )
        assert match, f"{log} was not written inside a SLURM job"
        found[str(log.relative_to(workdir))] = match.groups()
    assert found, f"no logs of rule {rule}"
    return found


# The slice of the finished demo that the SLURM run redoes: one whole subject (its references,
# masks, descriptions, class images, full fine-tunes, samples with attention, scores), one
# lightweight training (Textual Inversion, SID, blue_mug), one sampling without attention (the
# negative-prompt arm), and every small CPU job of the grouped kind. With the gathers that
# depend on them, every GPU rule and every group runs through sbatch.
SLICE = [
    r"(^|/)spotted_dog(/|\.|$)",
    r"^class_images/dog(/|\.|$)",
    r"/textual_inversion/sid/(standard/)?blue_mug(/|\.|$)",
    r"/dreambooth/case1/negative_prompt/blue_mug(/|\.|$)",
    r"^samples/compare(/|$)",
    r"^descriptions/report(/|$)",
    r"^(logs|benchmarks)(/|$)",  # so that every log left is one a SLURM job wrote
]


def _drop_slice(workdir: Path) -> list[str]:
    """Delete the slice's results from a copy of the finished demo; returns what went."""
    root = workdir / "results"
    dropped = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.exists() and any(re.search(pattern, rel) for pattern in SLICE):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            dropped.append(rel)
    return dropped


def test_demo_slice_runs_through_slurm_like_locally(cluster, demo_run, tmp_path):
    """`all` of the demo after a slice of the local run's results is deleted: the slice's jobs
    and the gathers run through sbatch (GPU rules on a fake GPU, small CPU jobs grouped into few
    submissions), and every result, redone or not, is byte-identical to the local run. (The
    whole demo through SLURM took 15 more minutes for no rule this slice leaves out.)"""
    workdir = Path(shutil.copytree(demo_run, tmp_path / "demo", symlinks=True))
    dropped = _drop_slice(workdir)
    for pattern in SLICE:  # a demo change must not shrink the slice unnoticed
        assert any(re.search(pattern, d) for d in dropped), f"{pattern} matched nothing"
    assert any(d.startswith("train/dreambooth/sid/spotted_dog") for d in dropped), dropped
    # Submitted from a shell that may reach the hub: the jobs on the nodes still must not ask it
    online = {
        k: v for k, v in cluster.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    result = _run(_snakemake(workdir, SLURM, []), 3600, cwd=REPO, env=online)  # hang guard
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    submitted = _submitted(output)
    jobs = int(re.findall(r"(\d+) of (\d+) steps \(100%\) done", output)[-1][1])
    for rule in GPU_RULES:
        for log, (_, gpu, offline) in _job_ids(workdir, rule).items():
            assert re.fullmatch(r"\d+", gpu), f"{log}: no GPU (CUDA_VISIBLE_DEVICES={gpu})"
            assert offline == "1", (
                f"{log}: a cluster job may ask the hub (HF_HUB_OFFLINE={offline})"
            )
    redone = [rule for rule in SMALL_CPU if (workdir / "results/logs" / rule).is_dir()]
    small = {log: job for rule in redone for log, (job, *_) in _job_ids(workdir, rule).items()}
    assert len(small) >= 10, f"too few small CPU jobs to see grouping: {small}"
    assert len(set(small.values())) < len(small) / 2, f"small CPU jobs not grouped: {small}"
    assert len(submitted) < jobs - len(small) / 2  # grouping saved submissions
    local, slurm = _results(demo_run), _results(workdir)
    assert sorted(slurm) == sorted(local)
    differ = [name for name in local if local[name] != slurm[name]]
    assert not differ, f"{len(differ)} results differ from the local run: {differ[:10]}"
    assert len(local) > 300


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
    assert (workdir / "results/references/blue_mug/manifest.csv").exists()


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


def test_training_signalled_by_slurm_checkpoints_and_resumes(cluster, tmp_path):
    """SLURM signals a job's steps before its time limit (the profile's --signal=TERM@300, or
    `scancel --signal=TERM`): the training saves the step it is on, and the rerun resumes."""
    workdir = _workdir(tmp_path)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["methods"]["textual_inversion"]["steps"] = 10**7
    config["training"]["checkpoint_every"] = 10**7
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    target = ["results/train/textual_inversion/case1/blue_mug/train_info.json"]
    log = workdir / "results/logs/train/textual_inversion/case1/blue_mug.log"
    cmd = [*LIMIT, "400", *_snakemake(workdir, SLURM, target)]
    process = subprocess.Popen(
        cmd, cwd=REPO, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and "train textual_inversion" in log.read_text():
            break  # the loop is running
        time.sleep(0.5)
    time.sleep(2)
    jobs = subprocess.run(
        ["squeue", "-h", "-t", "RUNNING", "-o", "%i"], env=cluster, capture_output=True, text=True
    ).stdout.split()
    assert len(jobs) == 1, f"the training job alone is running: {jobs}"
    subprocess.run(["scancel", "--signal=TERM", jobs[0]], env=cluster, check=True)
    output, _ = process.communicate(timeout=120)
    assert process.returncode not in (0, 124, 137), output[-3000:]
    match = re.search(r"SIGTERM received; stopped after step (\d+) of 10000000", log.read_text())
    assert match, log.read_text()[-3000:]
    step = int(match.group(1))
    checkpoints = workdir / "results/train/textual_inversion/case1/blue_mug.checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == [f"checkpoint-{step:07d}.pt"]

    config["methods"]["textual_inversion"]["steps"] = step + 20
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    rerun = _run(_snakemake(workdir, SLURM, target), 300, cwd=REPO, env=cluster)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    info = json.loads((workdir / target[0]).read_text())
    assert info["resumed_from_step"] == step and info["steps"] == step + 20


def test_an_api_description_set_is_described_on_the_submitting_host(cluster, tmp_path):
    """A description set an API writes (the OpenAI backend) calls it from its job, and compute
    nodes often cannot reach the internet: its jobs run on the submitting host (a local rule),
    while the other sets' still go through sbatch."""
    from test_vlm_openai import KEY_ENV, SECRET, FakeServer
    from test_workflow import sid_from_an_api

    server = FakeServer(lambda body, n: ("text", "a [V] mug on a blue checkered tablecloth"))
    try:
        workdir = _workdir(tmp_path)
        config = sid_from_an_api(workdir, server.url, KEY_ENV)
        (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        targets = [f"results/descriptions/{d}/blue_mug.csv" for d in ("sid", "case1")]
        env = {**cluster, KEY_ENV: SECRET}
        result = _run(_snakemake(workdir, SLURM, targets), 600, cwd=REPO, env=env)  # hang guard
    finally:
        server.close()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "localrule describe_references_api:" in output
    assert len(server.requests) == 4  # one per reference image
    logs = workdir / "results/logs/describe_references"
    assert "SLURM_JOB_ID=- " in (logs / "sid/blue_mug.log").read_text()
    assert re.search(r"SLURM_JOB_ID=\d+ ", (logs / "case1/blue_mug.log").read_text())
