"""Pin what the conda envs' direct requirements bring, at the versions of this virtualenv (the
lock, constraints.txt, which the tests ran with): without it, pip resolves numpy, httpx2 and the
rest to whatever is newest on the day an env is built. Run by `make lock`; `--check` (a test)
fails where an env's block is not what this install gives.

The block is everything after MARKER in each env's pip list, regenerated whole; the lines above
it (the direct pins, kept equal to requirements.txt) are the roots."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ENVS = [Path(__file__).with_name(f"{name}.yaml") for name in ("cpu", "gpu")]
MARKER = "      # what those bring, at the lock's versions (envs/pin_dependencies.py, make lock)\n"


def direct_pins(text: str) -> list[str]:
    """The names pinned above the marker."""
    head = text.split(MARKER)[0]
    return [line.split("- ", 1)[1].split("==")[0] for line in head.splitlines() if "==" in line]


def _left_out(key: str, roots: set[str]) -> bool:
    """The roots; the packaging tools an env brings itself (pip freeze leaves them out too); and
    a CUDA torch's own wheels (nvidia-*, triton), which torch pins exactly for its build, so
    that a CUDA install writes the same pins as a CPU one."""
    return (
        key in roots
        or key in {"pip", "setuptools", "wheel"}
        or key.startswith(("nvidia-", "triton"))
    )


def dependency_pins(roots: list[str]) -> list[str]:
    """`name==version` for every installed distribution the roots need (markers evaluated for
    this interpreter and platform, no extras), less `_left_out`. A package needed only under a
    marker (hf-xet: some machines) keeps that marker, so other platforms skip it as pip would."""
    found: dict[str, tuple[str, str]] = {}
    markers: dict[str, set[str] | None] = {}  # None: needed unconditionally somewhere
    stack: list[tuple[str, str | None]] = [(root, None) for root in roots]
    while stack:
        name, marker = stack.pop()
        key = canonicalize_name(name)
        if marker is None or markers.get(key, set()) is None:
            markers[key] = None
        else:
            markers.setdefault(key, set()).add(marker)
        if key in found:
            continue
        dist = metadata.distribution(key)
        found[key] = (dist.metadata["Name"], dist.version)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None:
                stack.append((requirement.name, None))
            elif requirement.marker.evaluate({"extra": ""}):
                stack.append((requirement.name, str(requirement.marker)))
    root_keys = {canonicalize_name(root) for root in roots}
    pins = []
    for key, (name, version) in found.items():
        if _left_out(key, root_keys):
            continue
        only = markers[key]
        condition = "" if only is None else "; " + " or ".join(f"({m})" for m in sorted(only))
        pins.append(f"{name}=={version}{condition}")
    return sorted(pins, key=str.lower)


def pinned(text: str) -> str:
    """The env file with its block regenerated."""
    head = text.split(MARKER)[0]
    block = "".join(f"      - {pin}\n" for pin in dependency_pins(direct_pins(text)))
    return head + MARKER + block


def main(check: bool) -> int:
    stale = []
    for env in ENVS:
        text = env.read_text()
        if MARKER not in text:
            sys.exit(f"{env}: no line {MARKER.strip()!r} ending its pip list")
        if pinned(text) != text:
            stale.append(env.name)
            if not check:
                env.write_text(pinned(text))
    if check and stale:
        print(f"not this install's pins: {', '.join(stale)}; run `make lock`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv[1:]))
