"""What each job imports: real jobs, run by Snakemake on tests/data/tiny_demo, record the modules
their process holds at exit (a sitecustomize on PYTHONPATH), and each stage's set is pinned.

Every job is a fresh Python process, so a module imported without being used costs every job
of the rule (torch + transformers take ~5 s; diffusers, bitsandbytes and torch._inductor
another 3-5 s). The same run checks the attention fold: mapped arms are sampled and mapped by
one job (`sample_and_attention`), the others only sampled (`sample`), and a changed attention
setting reruns the mapped arm's job without regenerating its samples.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests/data/tiny_demo"
ARM = "textual_inversion/case1/standard/red_mug"  # attention.experiments: [main] maps it
UNMAPPED = "dreambooth/case1/negative_prompt/red_mug"  # experiment `alternatives` only
TARGETS = [
    f"results/metrics/{ARM}.csv",  # tiny models, references, provided masks, descriptions,
    f"results/samples/{UNMAPPED}/manifest.csv",  # class images, both training rules, sample,
    "results/masks/toy_robot/manifest.csv",  # sample_and_attention, score; Grounded-SAM masks
]

# Runs in every Python process of the workflow; a job's adapter is Snakemake's temporary copy
# of workflow_scripts/<name>.py, whose globals hold the `snakemake` object.
SITECUSTOMIZE = textwrap.dedent(
    """
    import atexit, json, os, sys

    def _record_imports():
        main = sys.modules.get("__main__")
        smk = getattr(main, "snakemake", None)
        if smk is None or not os.environ.get("SIDPIPE_IMPORT_LOG"):
            return
        record = {
            "rule": smk.rule,
            "wildcards": dict(smk.wildcards.items()),
            "modules": sorted(k for k, v in sys.modules.items() if v is not None),
            "hidden": sorted(k for k, v in sys.modules.items() if v is None),
            "job_threads": smk.threads,
        }
        if sys.modules.get("torch") is not None:
            record["torch_threads"] = sys.modules["torch"].get_num_threads()
        path = os.path.join(os.environ["SIDPIPE_IMPORT_LOG"], f"{os.getpid()}.json")
        with open(path, "w") as handle:
            json.dump(record, handle)

    atexit.register(_record_imports)
    """
)


def _snakemake(workdir: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def _job(records: list[dict], rule: str, **wildcards: str) -> set[str]:
    found = [
        r for r in records if r["rule"] == rule and wildcards.items() <= r["wildcards"].items()
    ]
    assert len(found) == 1, f"{rule} {wildcards}: {[(r['rule'], r['wildcards']) for r in records]}"
    return set(found[0]["modules"])


def _loaded(modules: set[str], package: str) -> bool:
    return any(m == package or m.startswith(package + ".") for m in modules)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("imports")
    workdir = Path(shutil.copytree(FIXTURE, root / "demo"))
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = root / "imports"
    log.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["SIDPIPE_IMPORT_LOG"] = str(log)
    _snakemake(workdir, env, "--cores", "2", *TARGETS)
    return {"workdir": workdir, "env": env, "log": log, "records": _records(log)}


# Subpackages of the heavy libraries, by what uses them.
DIFFUSERS = "diffusers"
CLIP = "transformers.models.clip.modeling_clip"
VIT = "transformers.models.vit.modeling_vit"
GROUNDING_DINO = "transformers.models.grounding_dino.modeling_grounding_dino"
SAM = "transformers.models.sam.modeling_sam"


def test_no_job_imports_bitsandbytes_without_8bit_adam(run: dict) -> None:
    """diffusers and peft import it (and torch._inductor with it) whenever it is installed;
    the demo trains with AdamW, so no job may load it."""
    assert len(run["records"]) == 13
    for record in run["records"]:
        assert not _loaded(set(record["modules"]), "bitsandbytes"), record["rule"]
        if _loaded(set(record["modules"]), DIFFUSERS):
            assert "bitsandbytes" in record["hidden"], record["rule"]
            assert "torch._inductor.compile_fx" not in record["modules"], record["rule"]


# Rules whose adapters call sidpipe.models.setup_job (score's does not yet).
SETUP_JOB_RULES = {"build_tiny_models", "segment_references", "class_images", "train"}
SETUP_JOB_RULES |= {"train_full_finetune", "sample", "sample_and_attention"}


def test_jobs_run_torch_on_their_own_threads(run: dict) -> None:
    """Two jobs side by side on 2 cores, each with torch's default of one thread per core,
    spin against each other (a tiny pipeline call: 0.7-3.8 s instead of 0.07 s)."""
    checked = set()
    for record in run["records"]:
        if record["rule"] in SETUP_JOB_RULES and "torch_threads" in record:
            assert record["torch_threads"] == record["job_threads"] == 1, record["rule"]
            checked.add(record["rule"])
    assert checked == SETUP_JOB_RULES


def test_scoring_imports_clip_and_vit_but_no_diffusers(run: dict) -> None:
    modules = _job(run["records"], "score", subject="red_mug")
    assert {"torch", CLIP, VIT} <= modules
    for package in (DIFFUSERS, "peft", GROUNDING_DINO, SAM, "sidpipe.training"):
        assert not _loaded(modules, package), package


def test_masks_import_no_diffusers_and_provided_masks_no_torch(run: dict) -> None:
    provided = _job(run["records"], "segment_references", subject="red_mug")
    assert not _loaded(provided, "torch") and not _loaded(provided, "transformers")
    grounded = _job(run["records"], "segment_references", subject="toy_robot")
    assert {"torch", GROUNDING_DINO, SAM} <= grounded
    for package in (DIFFUSERS, "peft", CLIP):
        assert not _loaded(grounded, package), package


def test_training_and_sampling_import_diffusers_but_no_scoring_or_masking(run: dict) -> None:
    records = run["records"]
    train = _job(records, "train", method="textual_inversion")
    finetune = _job(records, "train_full_finetune", method="dreambooth")
    classes = _job(records, "class_images", class_slug="mug")
    sample = _job(records, "sample", inference="negative_prompt")
    for modules in (train, finetune, classes, sample):
        assert "torch" in modules and _loaded(modules, DIFFUSERS)
        for package in (GROUNDING_DINO, SAM, VIT, "sidpipe.metrics", "sidpipe.attention"):
            assert not _loaded(modules, package), package
    assert not _loaded(sample, "sidpipe.training.loop")
    mapped = _job(records, "sample_and_attention", method="textual_inversion")
    assert {"sidpipe.attention", GROUNDING_DINO, SAM} <= mapped
    assert not _loaded(mapped, "sidpipe.metrics") and not _loaded(mapped, VIT)


def test_mapped_arms_sample_and_map_in_one_job(run: dict) -> None:
    workdir = run["workdir"]
    logs = workdir / "results/logs"
    assert (logs / f"sample_and_attention/{ARM}.log").is_file()
    assert (logs / f"sample/{UNMAPPED}.log").is_file()
    assert not (logs / f"sample/{ARM}.log").exists() and not (logs / "attention_maps").exists()
    assert not (workdir / f"results/attention/{UNMAPPED}").exists()
    rows = list(csv.DictReader(open(workdir / f"results/attention/{ARM}/attention.csv")))
    assert [(r["prompt_id"], r["seed"]) for r in rows] == [("0", "0")]
    assert (workdir / f"results/attention/{ARM}/overlays.png").stat().st_size > 0
    log = (logs / f"sample_and_attention/{ARM}.log").read_text()
    assert "6 of 6 images to generate" in log


def test_a_new_attention_setting_reruns_the_mapped_job_without_resampling(run: dict) -> None:
    workdir = Path(shutil.copytree(run["workdir"], run["workdir"].with_name("rerun")))
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["attention"]["seeds"] = [0, 1]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    dry = _snakemake(workdir, run["env"], "--dry-run", *TARGETS).stdout
    scheduled = set(re.findall(r"^rule (\w+):$", dry, re.MULTILINE))
    assert scheduled == {"sample_and_attention", "score"}, dry[-3000:]
    images = sorted((workdir / f"results/samples/{ARM}").glob("*.png"))
    before = {p.name: p.stat().st_mtime_ns for p in images if p.name != "grid.png"}
    _snakemake(workdir, run["env"], "--cores", "2", *TARGETS)
    log = (workdir / f"results/logs/sample_and_attention/{ARM}.log").read_text()
    assert "0 of 6 images to generate (6 kept from an earlier run)" in log
    after = {p: (workdir / f"results/samples/{ARM}" / p).stat().st_mtime_ns for p in before}
    assert after == before  # the samples were kept, only the maps were redone
    rows = list(csv.DictReader(open(workdir / f"results/attention/{ARM}/attention.csv")))
    assert [(r["prompt_id"], r["seed"]) for r in rows] == [("0", "0"), ("0", "1")]


LIGHT_MODULES = ["sidpipe.models", "sidpipe.sampling", "sidpipe.sample_grids", "sidpipe.masks"]
LIGHT_MODULES += ["sidpipe.grounded_sam", "sidpipe.references", "sidpipe.encoders"]
LIGHT_MODULES += ["sidpipe.subsets", "sidpipe.descriptions.stage", "sidpipe.vlm.local"]


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_light_modules_import_no_torch(module: str) -> None:
    """Imported by jobs that may need no model (compare_samples, provided masks, describe with
    the template, a hand-written file or a server; a local VLM loads torch when it is made)."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in "
    code += "('torch', 'transformers', 'diffusers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
