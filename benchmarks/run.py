"""`make bench`: speed figures as JSON under results/bench/.

training.json: steps/s and peak memory per method (tiny, CPU), the latent-caching speed-up, and
the share of a DreamBooth step's compute that caching removes (tiny and SD-2.1-base size).
training_memory.json: peak memory of DreamBooth training at SD-2.1-base size (512 px) with each
combination of the memory options, counted on fake tensors (no GPU needed; the 24 GiB target).
training_real_size.json: the same job measured at SD-2.1-base size on a GPU (random weights,
512 px; CUDA only): steps/s, peak allocated/reserved memory per option set, caching speed-up.
sampling.json: images/s of batched sampling against a naive per-image pipeline loop.
scoring.json: images/s of batched scoring against naive pairwise re-encoding.
sampling_real_size.json: the same at SD-2.1-base size with peak GPU memory (CUDA only).
segment.json: images per second of Grounded-SAM masking on the tiny models (CPU).
dag.json: wall time and job count of building the DAG of the paper's full grid (config.yaml,
a dry-run), median of a few repeats, so a change that slows Snakemake's start-up shows.
slurm.json: wall time of the demo through the local SLURM test cluster against a local run, and
sbatch submissions with and without job grouping (root only; about 25 minutes on 2 cores).
overhead.json: per adapter, seconds before a job's first real computation (start-up, imports,
model loads), and the demo's workflow time, each against the baseline commit's code timed in the
same run (a git worktree; about 20 minutes on 2 cores).
world.json: the synthetic world: pretraining time per part, peak memory, the judge's accuracy,
the base model's competence on held-out combinations (overall, per class and per colour) and
what limits it: the text encoder's class and colour words, the world CLIP's zero-shot reading
(benchmarks/bench_world.py --regenerate also retrains and compares).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_DEMO = REPO / "tests/data/tiny_demo"  # tiny random models at 64 px


def _arm_subject_pairs() -> int:
    """(arm, subject) pairs of the paper grid: the train/sample/score jobs per stage."""
    from sidpipe.config import load_config, load_subjects
    from sidpipe.grid import all_arm_subjects

    config = load_config(REPO / "config.yaml")
    subjects = [row["subject"] for row in load_subjects(REPO / "subjects.tsv", config, REPO)]
    return len(all_arm_subjects(config, subjects))


def bench_dag(repeats: int) -> dict:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--directory", str(REPO), "--dry-run", "--quiet", "rules"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    times, out = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        times.append(time.perf_counter() - start)
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", out, re.MULTILINE)}
    return {
        "name": "dag_paper_grid",
        "config": "config.yaml",
        "repeats": repeats,
        "wall_seconds_median": round(statistics.median(times), 3),
        "wall_seconds_all": [round(t, 3) for t in times],
        "jobs_total": jobs.pop("total", None),
        "jobs_per_rule": jobs,
        "arm_subject_pairs": _arm_subject_pairs(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def bench_segment(repeats: int) -> dict:
    """Images per second of segment_references (Grounded-SAM) on the tiny models, CPU."""
    import tempfile

    from sidpipe.config import tokenizer_corpus
    from sidpipe.masks import segment_references
    from sidpipe.models import build_tiny_models
    from sidpipe.references import prepare_references

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tokenizer_corpus([TINY_DEMO / "prompts.yaml"], ["robot"], "sks")
        models = build_tiny_models(tmp / "models", corpus)
        rows = prepare_references(TINY_DEMO / "subjects/toy_robot", tmp / "refs", "toy_robot", 64)
        kwargs = dict(class_name="robot", detector=models["grounding_dino"])
        kwargs |= dict(segmenter=models["sam"], box_threshold=0.0, text_threshold=0.0)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            segment_references(tmp / "refs", tmp / "masks", "toy_robot", device="cpu", **kwargs)
            times.append(time.perf_counter() - start)
    best = statistics.median(times)
    return {
        "name": "segment_references_tiny_cpu",
        "images": len(rows),
        "repeats": repeats,
        "wall_seconds_median": round(best, 3),
        "images_per_second": round(len(rows) / best, 2),
        "note": "includes loading both tiny models once per call, as a job does",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "results/bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", action="append", help="run only these benchmarks")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_overhead import bench_overhead
    from bench_sampling import bench_sampling
    from bench_scoring import bench_scoring
    from bench_slurm import bench_slurm
    from bench_training import bench_training
    from bench_training_memory import bench_training_memory
    from bench_training_real_size import bench_training_real_size
    from bench_world import bench_world

    benches = {
        "dag": lambda: bench_dag(args.repeats),
        "segment": lambda: bench_segment(args.repeats),
        "training": lambda: bench_training(repeats=args.repeats),
        "training_memory": lambda: bench_training_memory(),
        "training_real_size": lambda: bench_training_real_size(),  # skipped without CUDA
        "sampling": lambda: bench_sampling(threads=1),
        "sampling_real_size": lambda: bench_sampling(real_size=True),  # skipped without CUDA
        "scoring": lambda: bench_scoring(),
        "slurm": lambda: bench_slurm(),  # skipped without root
        "overhead": lambda: bench_overhead(repeats=args.repeats),
        "world": lambda: bench_world(),  # shipped weights; --regenerate by hand (~40 min)
    }
    for name, bench in benches.items():
        if args.only and name not in args.only:
            continue
        result = bench()
        path = args.out / f"{name}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"written {path}")


if __name__ == "__main__":
    main()
