"""Fixtures shared by several test modules."""

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: extra OpenMP threads only add synchronisation (10x slower on a busy
    2-core machine), so a module that asks for this runs torch on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed here if missing (the test set-up; needs root); the test
    skips only where it is absent and cannot be installed (not root)."""
    if not shutil.which("chromium") and os.geteuid() == 0:
        subprocess.run(
            ["timeout", "-k", "10", "600", "apt-get", "install", "-y", "-q", "chromium"],
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed and cannot be installed here (not root)")
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole demo, run once per session, as `make demo` runs it (same profile); tests only
    read it (copy it to change anything)."""
    workdir = tmp_path_factory.mktemp("demo") / "demo"
    shutil.copytree(REPO / "demo", workdir, ignore=shutil.ignore_patterns("results", ".snakemake"))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--profile", str(REPO / "demo/profile"), "--directory", str(workdir)]
    cmd += ["--configfile", str(workdir / "config.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=3600
    )  # hang guard
    assert result.returncode == 0, f"the demo failed:\n{result.stdout}\n{result.stderr}"
    return workdir
