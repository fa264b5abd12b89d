"""The install: pinned, CPU torch kept, no CUDA or torchvision wheels, conda envs in step."""

import re
from importlib import metadata
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"torchvision", "open-clip-torch", "segment-anything", "groundingdino-py"}


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if match := re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line):
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
    names = {dist.metadata["Name"].lower() for dist in metadata.distributions()}
    assert not {n for n in names if n.startswith(("nvidia-", "triton"))}
    assert not FORBIDDEN & names
    assert metadata.version("torch").startswith("2.13.0")


def test_conda_envs_pin_the_same_versions():
    requirements = _pins((REPO / "requirements.txt").read_text().splitlines())
    runtime = {
        k: v for k, v in requirements.items() if not k.startswith(("snakemake", "pytest", "ruff"))
    }
    runtime.pop("snakefmt")
    for name in ("cpu", "gpu"):
        env = yaml.safe_load((REPO / f"envs/{name}.yaml").read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        pins = _pins(pip)
        assert pins.pop("torch") == "2.13.0"
        assert pins == runtime, name
        assert (REPO / f"envs/{name}.post-deploy.sh").exists(), "installs sidpipe into the env"
    gpu = (REPO / "envs/gpu.yaml").read_text()
    assert "download.pytorch.org/whl/cu" in gpu
