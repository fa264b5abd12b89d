"""What a job asks of the scheduler: a rule's memory and runtime, from the config's
`job_resources` or the rule's default, grown with the retry's attempt number; and a warning when
the run's global `resources:` would lower it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def attempt_scaled(
    config: dict, rule: str, key: str, default: int | Callable[[Any], int]
) -> Callable[[Any, int], int]:
    """A Snakemake resource function for `rule`'s `key` (mem_mb, runtime): the config's
    `job_resources.<rule>.<key>` or else `default` (a number, or a function of the wildcards),
    times the attempt number, so a job killed for memory or time is retried with more."""
    base = config.get("job_resources", {}).get(rule, {}).get(key, default)

    def resource(wildcards: Any, attempt: int) -> int:
        return (base(wildcards) if callable(base) else int(base)) * attempt

    return resource


def warn_over_cap(
    resource: Callable[[Any, int], int],
    rule: str,
    key: str,
    cap: int | None,
    warn: Callable[[str], Any],
) -> Callable[[Any, int], int]:
    """`resource`, calling `warn` once per rule when a job asks for more `key` than the run's
    global `resources:` (a profile's, or --resources) allows: Snakemake lowers every job to that
    cap, and on SLURM the lowered value is the job's --mem, which no retry raises."""
    warned: list[bool] = []

    def checked(wildcards: Any, attempt: int) -> int:
        value = resource(wildcards, attempt)
        if cap is not None and value > cap and not warned:
            warned.append(True)
            warn(
                f"rule {rule} asks for {key}={value}, but the run's `resources: {key}: {cap}` "
                f"(the profile's, or --resources) lowers every job to {cap} (on SLURM, its "
                "--mem, on every retry); raise it to what one node has"
            )
        return value

    return checked
