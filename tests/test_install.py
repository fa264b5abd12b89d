"""The install: pinned, CPU torch kept, no CUDA or torchvision wheels, conda envs in step."""

import importlib.util
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location(
    "pin_dependencies", REPO / "envs/pin_dependencies.py"
)
PIN_DEPENDENCIES = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(PIN_DEPENDENCIES)
FORBIDDEN = {"torchvision", "open-clip-torch", "segment-anything", "groundingdino-py"}


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if match := re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)\s*(?:;.*)?", line):  # a marker
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_requirements_are_all_pinned_and_exclude_the_replaced_packages():
    lines = [
        ln.strip()
        for ln in (REPO / "requirements.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    pins = _pins(lines)
    assert len(pins) == len(lines), "every requirement is pinned with =="
    assert {"diffusers", "transformers", "snakemake", "snakemake-executor-plugin-slurm"} <= set(
        pins
    )
    assert pins["snakemake"].startswith("9.")
    assert not FORBIDDEN & set(pins)


def test_constraints_keep_the_cpu_torch():
    pins = _pins((REPO / "constraints.txt").read_text().splitlines())
    assert pins["torch"] == "2.13.0"
    assert not any(name.startswith(("nvidia-", "triton")) for name in pins)
    requirements = _pins((REPO / "requirements.txt").read_text().splitlines())
    assert {k: pins[k] for k in requirements} == requirements, "lock agrees with requirements"


def test_installed_environment_has_no_cuda_or_torchvision_wheels():
    import torch

    names = {dist.metadata["Name"].lower() for dist in metadata.distributions()}
    if torch.version.cuda is None:  # a CPU torch (`make install`, TORCH_BUILD=cpu) comes alone
        assert not {n for n in names if n.startswith(("nvidia-", "triton"))}
    assert not FORBIDDEN & names
    assert metadata.version("torch").startswith("2.13.0")


def _make(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *args], cwd=REPO, capture_output=True, text=True, check=check)


def _make_dry_run(*args: str) -> str:
    return _make("-n", "-B", *args, check=True).stdout


def test_make_install_takes_torch_from_the_named_index_and_keeps_cuda_only_when_asked():
    default = _make_dry_run("install", "VENV=/tmp/sidpipe-dry-venv")
    assert "pip install -q  torch==2.13.0" in default
    assert '[ "cpu" = cpu ]' in default, "the CPU build is the default and is checked"
    cpu = "https://download.pytorch.org/whl/cpu"
    assert f"--index-url {cpu} torch==2.13.0" in _make_dry_run(
        "install", "VENV=/tmp/sidpipe-dry-venv", f"TORCH_INDEX={cpu}"
    )
    cuda = _make_dry_run("install", "VENV=/tmp/sidpipe-dry-venv", "TORCH_BUILD=cuda")
    assert '[ "cuda" = cpu ]' in cuda, "a CUDA install skips the no-nvidia check"
    assert "grep -iE '^torchvision'" in cuda, "but never takes torchvision"


def test_conda_envs_pin_the_same_versions():
    requirements = _pins((REPO / "requirements.txt").read_text().splitlines())
    runtime = {
        k: v for k, v in requirements.items() if not k.startswith(("snakemake", "pytest", "ruff"))
    }
    runtime.pop("snakefmt")
    lock = _pins((REPO / "constraints.txt").read_text().splitlines())
    for name in ("cpu", "gpu"):
        text = (REPO / f"envs/{name}.yaml").read_text()
        direct, brought = text.split(PIN_DEPENDENCIES.MARKER)
        pins = _pins(line.split("- ", 1)[-1] for line in direct.splitlines())
        assert pins.pop("torch") == "2.13.0"
        assert pins == runtime, name
        # what those bring: the lock's versions, not whatever is newest when the env is built
        brought = _pins(line.split("- ", 1)[-1] for line in brought.splitlines())
        assert len(brought) > 40 and {"numpy", "httpx2", "httpcore2", "regex"} <= set(brought)
        assert all(lock[package] == version for package, version in brought.items()), name
        assert (REPO / f"envs/{name}.post-deploy.sh").exists(), "installs sidpipe into the env"
    gpu = (REPO / "envs/gpu.yaml").read_text()
    assert "download.pytorch.org/whl/cu" in gpu


def test_the_envs_pin_what_this_install_brings_and_a_missing_pin_is_found():
    check = subprocess.run(
        [sys.executable, REPO / "envs/pin_dependencies.py", "--check"],
        capture_output=True,
        text=True,
        timeout=120,  # hang guard
    )
    assert check.returncode == 0, check.stderr
    text = (REPO / "envs/gpu.yaml").read_text()
    assert "      - numpy==" in text
    without = "".join(line for line in text.splitlines(True) if "- numpy==" not in line)
    assert PIN_DEPENDENCIES.pinned(without) == text


def test_make_install_refuses_an_unknown_torch_build_before_creating_the_venv(tmp_path):
    venv = tmp_path / "venv"
    result = _make("install", f"VENV={venv}", "TORCH_BUILD=gpu")
    assert result.returncode != 0
    assert "TORCH_BUILD=gpu: use cpu or cuda" in result.stderr
    assert not venv.exists()


def test_the_cpu_install_stops_on_a_plan_with_cuda_wheels_before_installing(tmp_path):
    """`make install` resolves torch first (pip --dry-run --report) and, for TORCH_BUILD=cpu,
    stops when the plan holds nvidia-*/triton wheels, before GBs of them are downloaded."""
    import json
    import sys

    show = 'show-plan-check: ; @echo "$$CUDA_IN_PLAN"'
    snippet = _make("-s", "--eval", show, "show-plan-check", check=True).stdout.strip()

    def status(*names: str) -> int:
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"install": [{"metadata": {"name": n}} for n in names]}))
        return subprocess.run([sys.executable, "-c", snippet, str(plan)]).returncode

    assert status("torch", "nvidia-cublas-cu12", "filelock") == 3
    assert status("torch", "Triton") == 3
    assert status("torch", "filelock", "sympy") == 0
    (tmp_path / "plan.json").write_text("{}")  # an unreadable plan is neither
    assert subprocess.run(
        [sys.executable, "-c", snippet, str(tmp_path / "plan.json")], capture_output=True
    ).returncode not in (0, 3)
    plan_step = _make_dry_run("install", "VENV=/tmp/sidpipe-dry-venv")
    assert plan_step.index("--dry-run") < plan_step.index("CUDA_IN_PLAN")
    assert plan_step.index("CUDA_IN_PLAN") < plan_step.index("pip install -q  torch==2.13.0")


@pytest.mark.parametrize(
    ("check_status", "message"),
    [
        (
            3,
            "pip would install torch's CUDA build here. On a CPU machine: make install "
            "TORCH_INDEX=https://download.pytorch.org/whl/cpu",
        ),
        (1, "cannot read pip's plan"),
    ],
)
def test_a_plan_with_cuda_wheels_stops_the_install_before_torch_arrives(
    tmp_path, check_status, message
):
    """End to end with the plan check's answer forced (CUDA wheels; an unreadable plan): the
    install stops saying so, and the venv holds no torch."""
    venv = tmp_path / "venv"
    result = _make("install", f"VENV={venv}", f"CUDA_IN_PLAN=import sys; sys.exit({check_status})")
    assert result.returncode != 0
    assert message in result.stderr
    assert not list(venv.glob("lib/python*/site-packages/torch"))
    assert not (venv / ".installed").exists()


def test_the_post_deploy_step_installs_this_checkout_from_any_working_directory(tmp_path):
    """Snakemake runs an env's post-deploy step in the working directory, which `--directory`
    may put outside the checkout (results on scratch): the step installs the checkout the
    workflow names (SIDPIPE_CHECKOUT, from rules/common.smk), and says so where there is none."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text('#!/bin/sh\necho "python $*"\n')  # records the pip call
    (shim / "python").chmod(0o755)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    for name in ("cpu", "gpu"):
        script = REPO / f"envs/{name}.post-deploy.sh"
        done = subprocess.run(
            ["bash", script],
            cwd=scratch,
            env={**env, "SIDPIPE_CHECKOUT": str(REPO)},
            capture_output=True,
            text=True,
            timeout=60,  # hang guard
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"python -m pip install --no-deps -e {REPO}"
        lost = subprocess.run(
            ["bash", script], cwd=scratch, env=env, capture_output=True, text=True, timeout=60
        )
        assert lost.returncode == 1 and f"no sidpipe checkout at or above {scratch}" in lost.stderr
    common = (REPO / "rules/common.smk").read_text()
    assert "os.environ.update(SIDPIPE_CHECKOUT=str(Path(workflow.basedir)))" in common
