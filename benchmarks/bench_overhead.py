"""Per-job overhead, new code against the baseline commit, timed side by side in the same run.

1. The demo's whole workflow (the baseline commit's demo/: 3 subjects, tiny models, 64 px),
   run by the baseline's Snakefile and package, then by this tree's, on the demo profile's 2
   cores (`--notemp`, so the trained weights stay for step 2): wall time, jobs, and each rule's
   mean job time from its benchmark files. Target: the new workflow at least 2x faster.
2. Per adapter, what a job spends before its first real computation: interpreter start-up,
   Snakemake's script preamble, the adapter's imports and its model loads (the files of the new
   run of step 1, the same for both codes), each in a fresh process as a job is, old and new
   interleaved, median of `repeats`. Target: score, sample and train at most 4 s.

The baseline is checked out with `git worktree add` into a temporary folder (removed after);
where the commit is missing (a shallow clone), the baseline is reported as skipped with the
reason and only the new code is timed, on tests/data/tiny_demo (the same demo).

    python benchmarks/bench_overhead.py [--repeats 3] [--workflow-repeats 1] [--no-workflow]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "92c3980"  # the code before issue #16 (per-job overhead)
FIXTURE_DEMO = REPO / "tests/data/tiny_demo"  # a frozen copy of that commit's demo/
TARGET_SECONDS = 4.0  # score, sample and train: before their first real computation
TARGET_SPEEDUP = 2.0  # the demo's workflow
LIMIT_SECONDS = 3600  # one workflow run; a hang guard, far above either run's time
ARM = "dreambooth/case1"  # weights timed by the sample stages (9 of the demo's 16 sample jobs)

# What each job does before its first real computation, in a fresh interpreter: `imports`
# (the adapter's modules, as it imports them), then `load` (its model loads, code run with the
# demo's model folders in `P`). `setup`: the new adapter first calls setup_job (torch threads,
# bitsandbytes hidden). A stage may give per-code imports and loads as {"old": ..., "new": ...}
# (a module the baseline had under another name).
PREAMBLE = ["snakemake.logging", "snakemake.iocontainers"]  # Snakemake's script preamble
_PIPELINE = "load_arm_pipeline(P['sd'], 'dreambooth', P['weights'], 'float32', 'cpu')"
_MASKERS = "load_grounding_dino(P['grounding_dino'], 'cpu'); load_sam(P['sam'], 'cpu')"
STAGES: dict[str, dict] = {
    "score": {
        "imports": ["sidpipe.io", "sidpipe.metrics"],
        "load": "from sidpipe.models import load_clip, load_dino\n"
        "load_clip(P['clip'], 'cpu'); load_dino(P['dino'], 'cpu')",
    },
    "sample": {
        "setup": True,
        "imports": ["sidpipe.io", "sidpipe.sampling"],
        "load": f"from sidpipe.sampling import load_arm_pipeline\n{_PIPELINE}",
    },
    "attention_maps": {  # the baseline's separate job; the new code runs it inside sample
        "imports": ["sidpipe.io", "sidpipe.attention", "sidpipe.sampling"],
        "load": "from sidpipe.sampling import load_arm_pipeline\n"
        "from sidpipe.models import load_grounding_dino, load_sam\n"
        f"{_PIPELINE}\n{_MASKERS}",
    },
    "sample_and_attention": {  # new code only: one job, one pipeline load, then the maskers
        "setup": True,
        "imports": ["sidpipe.io", "sidpipe.sampling"],
        "load": "from sidpipe.sampling import load_arm_pipeline\n"
        f"{_PIPELINE}\nimport sidpipe.attention\n"
        f"from sidpipe.models import load_grounding_dino, load_sam\n{_MASKERS}",
    },
    "train": {
        "setup": True,
        "imports": ["sidpipe.io", "sidpipe.training.loop"],
        "load": "from sidpipe.models import load_sd_components\n"
        "from sidpipe.training import trainer_class\n"
        "load_sd_components(P['sd'], device='cpu'); trainer_class('dreambooth')",
    },
    "class_images": {
        "setup": True,
        "imports": ["sidpipe.io", "sidpipe.class_images"],
        "load": "from sidpipe.models import load_sd_pipeline\n"
        "load_sd_pipeline(P['sd'], device='cpu')",
    },
    "segment_references_grounded_sam": {
        "setup": True,
        "imports": ["sidpipe.io", "sidpipe.masks"],
        "load": f"from sidpipe.models import load_grounding_dino, load_sam\n{_MASKERS}",
    },
    "segment_references_provided": {
        "setup": True,
        "imports": ["sidpipe.io", "sidpipe.masks"],
        "load": "",
    },
    "describe_references_manual": {
        "imports": {
            "old": ["sidpipe.io", "sidpipe.descriptions"],
            "new": ["sidpipe.io", "sidpipe.descriptions.stage"],
        },
        "load": {
            "old": "from sidpipe.descriptions import load_base_tokenizer\n"
            "load_base_tokenizer(P['sd'])",
            "new": "from sidpipe.descriptions.text import load_base_tokenizer\n"
            "load_base_tokenizer(P['sd'])",
        },
    },
    "compare_samples": {
        "imports": {
            "old": ["sidpipe.io", "sidpipe.sampling"],
            "new": ["sidpipe.io", "sidpipe.sample_grids"],
        },
        "load": "",
    },
    "build_tiny_models": {
        "setup": True,
        "imports": {"old": ["sidpipe.io", "sidpipe.models"], "new": ["sidpipe.tiny_models"]},
        "load": "",
    },
}
# The baseline ran sample and attention_maps as two jobs of a mapped arm; the new code one.
COMBINED = {"sample_and_attention": {"old": ["sample", "attention_maps"]}}
TARGETED = ("score", "sample", "train")

_CHILD = r"""
import importlib, json, sys, time
start = time.time()
spec = json.loads(sys.argv[1])
for name in spec["preamble"]:
    importlib.import_module(name)
if spec["setup"]:
    from sidpipe.models import setup_job
    setup_job(1)
for name in spec["imports"]:
    importlib.import_module(name)
imported = time.time()
exec(spec["load"], {"P": spec["paths"]})
loaded = time.time()
real = [m for m in ("diffusers", "bitsandbytes", "torch") if sys.modules.get(m) is not None]
print("RESULT " + json.dumps({"start": start, "imported": imported, "loaded": loaded,
                              "libraries": real}))
"""


def _env(src: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return env


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@contextmanager
def _baseline_tree(tmp: Path, commit: str):
    """The baseline commit checked out in `tmp` (None and the reason when it cannot be)."""
    folder = tmp / "baseline"
    found = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        yield None, f"commit {commit} is not in this clone (shallow?); fetch it to compare"
        return
    add = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(folder), commit],
        capture_output=True,
        text=True,
    )
    if add.returncode != 0:
        yield None, f"git worktree add failed: {add.stderr.strip()[-500:]}"
        return
    try:
        yield folder, None
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)],
            capture_output=True,
        )
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)


def _rule_means(workdir: Path) -> dict[str, dict]:
    """Per rule: jobs, mean job wall and CPU seconds, from the jobs' benchmark files. CPU time
    depends less than wall time on what else the machine runs."""
    out = {}
    root = workdir / "results/benchmarks"
    for rule_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        rows = []
        for tsv in rule_dir.rglob("*.tsv"):
            with open(tsv) as handle:
                rows += list(csv.DictReader(handle, delimiter="\t"))
        if rows:
            out[rule_dir.name] = {
                "jobs": len(rows),
                "mean_s": round(statistics.mean(float(r["s"]) for r in rows), 2),
                "mean_cpu_s": round(statistics.mean(float(r["cpu_time"]) for r in rows), 2),
            }
    return out


def run_workflow(tree: Path, demo: Path, workdir: Path, cores: int = 2) -> dict:
    """The demo's `all` by `tree`'s Snakefile and package, from scratch in `workdir`."""
    shutil.copytree(demo, workdir, ignore=shutil.ignore_patterns("results", ".snakemake"))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(tree / "Snakefile")]
    cmd += ["--directory", str(workdir), "--configfile", str(workdir / "config.yaml")]
    cmd += ["--cores", str(cores), "--resources", "gpu=0", "--notemp"]
    start = time.perf_counter()
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(tree / "src"), timeout=LIMIT_SECONDS
    )
    wall = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        return {"error": output[-3000:], "wall_seconds": round(wall, 1)}
    done = re.findall(r"(\d+) of (\d+) steps \(100%\) done", output)
    rules = _rule_means(workdir)
    return {
        "wall_seconds": round(wall, 1),
        "jobs": int(done[-1][1]) if done else None,
        # the jobs with a benchmark file: every model-loading one
        "benchmarked_jobs_cpu_seconds": round(
            sum(r["jobs"] * r["mean_cpu_s"] for r in rules.values()), 1
        ),
        "load_average_after": _load_average(),
        "rules": rules,
    }


def _models(workdir: Path) -> dict[str, str]:
    tiny = workdir / "results/models/tiny"
    paths = {name: str(tiny / name) for name in ("sd", "clip", "dino", "grounding_dino", "sam")}
    paths["weights"] = str(workdir / f"results/train/{ARM}/red_mug/weights")
    return paths


def time_stage(src: Path, stage: str, version: str, paths: dict[str, str]) -> dict:
    """One fresh interpreter doing `stage`'s imports and model loads with `src`'s package."""
    spec = STAGES[stage]
    imports = spec["imports"]
    if isinstance(imports, dict):
        imports = imports[version]
    load = spec["load"]
    if isinstance(load, dict):
        load = load[version]
    child = {
        "preamble": PREAMBLE,
        "setup": bool(spec.get("setup")) and version == "new",
        "imports": imports,
        "load": load,
        "paths": paths,
    }
    spawned = time.time()
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(child)],
        capture_output=True,
        text=True,
        env=_env(src),
        timeout=600,
    )
    found = re.search(r"^RESULT (.*)$", result.stdout, re.MULTILINE)
    if result.returncode != 0 or not found:
        return {"error": (result.stderr or result.stdout)[-1500:]}
    times = json.loads(found.group(1))
    return {
        "startup_s": times["start"] - spawned,
        "import_s": times["imported"] - times["start"],
        "load_s": times["loaded"] - times["imported"],
        "total_s": times["loaded"] - spawned,
        "libraries": times["libraries"],
    }


def _median(runs: list[dict]) -> dict:
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0]["error"] if runs else "not run"}
    out = {
        key: round(statistics.median(r[key] for r in good), 3)
        for key in ("startup_s", "import_s", "load_s", "total_s")
    }
    out["total_s_all"] = [round(r["total_s"], 3) for r in good]
    out["libraries"] = good[0]["libraries"]
    return out


def time_stages(trees: dict[str, Path], paths: dict[str, str], repeats: int) -> dict:
    """Every stage under every code, interleaved (old, new, old, new, ...), median of repeats."""
    runs: dict[str, dict[str, list]] = {stage: {v: [] for v in trees} for stage in STAGES}
    for _ in range(repeats):
        for stage in STAGES:
            for version, tree in trees.items():
                if stage == "sample_and_attention" and version == "old":
                    continue  # the baseline has no such job: its parts are timed instead
                if stage == "attention_maps" and version == "new":
                    continue  # folded into sample_and_attention
                runs[stage][version].append(time_stage(tree / "src", stage, version, paths))
    results = {stage: {v: _median(r) for v, r in per.items() if r} for stage, per in runs.items()}
    for stage, parts in COMBINED.items():
        if "old" in trees:
            old = [results[p].get("old", {}).get("total_s") for p in parts["old"]]
            if None not in old:
                results[stage]["old"] = {"total_s": round(sum(old), 3), "jobs": parts["old"]}
    for per in results.values():
        old, new = per.get("old", {}).get("total_s"), per.get("new", {}).get("total_s")
        if old and new:
            per["old_over_new"] = round(old / new, 2)
    return results


def _compare_workflows(runs: dict[str, list[dict]], cores: int) -> dict:
    """Medians of each code's runs: wall time (the target) and the jobs' summed CPU time."""
    out: dict = {"cores": cores, "runs": runs}
    if "old" not in runs or any("error" in run for run in runs["old"]):
        return out
    for key, ratio in (
        ("wall_seconds", "old_over_new"),
        ("benchmarked_jobs_cpu_seconds", "cpu_old_over_new"),
    ):
        median = {v: statistics.median(run[key] for run in runs[v]) for v in ("old", "new")}
        out[f"{key}_median"] = median
        out[ratio] = round(median["old"] / median["new"], 2)
    out["target_old_over_new"] = TARGET_SPEEDUP
    out["target_met"] = out["old_over_new"] >= TARGET_SPEEDUP
    return out


def bench_overhead(
    repeats: int = 3,
    workflow: bool = True,
    baseline: str = BASELINE,
    cores: int = 2,
    workflow_repeats: int = 1,
) -> dict:
    result: dict = {
        "name": "per_job_overhead",
        "baseline_commit": baseline,
        "cpus": os.cpu_count(),
        "load_average_before": _load_average(),
        "repeats": repeats,
    }
    with tempfile.TemporaryDirectory(prefix="sidpipe-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        with _baseline_tree(tmp, baseline) as (old_tree, reason):
            trees = {"new": REPO} if old_tree is None else {"old": old_tree, "new": REPO}
            result["baseline"] = "ok" if old_tree else {"skipped": reason}
            demo = old_tree / "demo" if old_tree else FIXTURE_DEMO
            result["demo"] = (
                f"{baseline}:demo/" if old_tree else str(FIXTURE_DEMO.relative_to(REPO))
            )

            # Pairs of runs, old then new, then new then old (ABBA...), so neither code always
            # gets the warmer caches or the quieter minutes; median of each.
            runs: dict[str, list[dict]] = {version: [] for version in trees}
            pairs = workflow_repeats if workflow else 0
            for index in range(max(pairs, 1)):
                order = list(trees) if index % 2 == 0 else list(reversed(trees))
                for version in order:
                    if workflow or version == "new":  # the new run's files feed step 2
                        folder = tmp / f"{version}_demo_{index}"
                        runs[version].append(run_workflow(trees[version], demo, folder, cores))
            new_dir = tmp / f"new_demo_{max(pairs, 1) - 1}"
            if any("error" in run for run in runs["new"]):
                result["error"] = "the new code's demo run failed"
                result["workflow"] = runs
                return result
            if workflow:
                result["workflow"] = _compare_workflows(runs, cores)
            stages = time_stages(trees, _models(new_dir), repeats)
            result["adapters"] = stages
            result["before_first_computation"] = {
                stage: {
                    "new_s": stages[stage]["new"].get("total_s"),
                    "target_s": TARGET_SECONDS,
                    "target_met": (stages[stage]["new"].get("total_s") or 1e9) <= TARGET_SECONDS,
                }
                for stage in TARGETED
            }
    result["load_average_after"] = _load_average()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--workflow-repeats", type=int, default=1, help="pairs of demo runs")
    parser.add_argument(
        "--no-workflow", action="store_true", help="time the adapters only (one demo run)"
    )
    args = parser.parse_args()
    result = bench_overhead(
        args.repeats, not args.no_workflow, args.baseline, workflow_repeats=args.workflow_repeats
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
