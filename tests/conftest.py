"""Fixtures shared by several test modules."""

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from snakemake.utils import update_config

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


# What the tests keep of the plain demo before its biases layer runs in the same folder.
PLAIN_DEMO_KEPT = ("results/experiments", "results/metrics", "results/human_study")


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`make demo` then `make world-biases`, run once per session with their profile: the
    folder of both, and a copy of what the plain demo had made (PLAIN_DEMO_KEPT) before the
    layer ran. The folder's config.yaml is then the two config files merged as Snakemake merges
    them, so a plain `--configfile config.yaml` there sees the finished layered run. Tests only
    read them (copy them to change anything)."""
    root = tmp_path_factory.mktemp("demo")
    workdir = root / "demo"
    shutil.copytree(REPO / "demo", workdir, ignore=shutil.ignore_patterns("results", ".snakemake"))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--profile", str(REPO / "demo/profile"), "--directory", str(workdir)]
    cmd += ["--configfile", str(workdir / "config.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name, layer in (("the demo", []), ("the biases layer", [str(workdir / "biases.yaml")])):
        result = subprocess.run(
            cmd + layer, capture_output=True, text=True, env=env, timeout=3600
        )  # hang guard
        assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
        if not layer:
            plain = root / "plain"
            for kept in PLAIN_DEMO_KEPT:
                shutil.copytree(workdir / kept, plain / kept)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    update_config(config, yaml.safe_load((workdir / "biases.yaml").read_text()))
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir, plain


@pytest.fixture(scope="session")
def demo_run(demo_runs: tuple[Path, Path]) -> Path:
    """The demo with its biases layer (the grid of the README's world figures)."""
    return demo_runs[0]


@pytest.fixture(scope="session")
def plain_demo(demo_runs: tuple[Path, Path]) -> Path:
    """What `make demo` alone made (PLAIN_DEMO_KEPT under results/)."""
    return demo_runs[1]
