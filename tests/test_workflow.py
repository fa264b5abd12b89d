"""The Snakemake DAG: dry-run of the paper grid, lint, the demo end to end, rerun scope."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from hashlib import sha256
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
# Rules that gather over subjects or arms: any change upstream may reschedule them.
GATHERS = {"all", "summarize_references", "plan_experiments", "gather_metrics", "analyze"}
GATHERS |= {"human_study"}
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    config = workdir / "config.yaml"
    cmd = [*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(config), *args]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout}\n{result.stderr}")
    return result


def scheduled_jobs(workdir: Path) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a dry-run would execute."""
    out = snakemake(workdir, "--dry-run").stdout
    jobs, rule = [], None
    for line in out.splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):$", line.strip()):
            rule = match.group(1)
            jobs.append((rule, {}))
        elif rule and (match := re.match(r"^\s+wildcards: (.*)$", line)):
            jobs[-1][1].update(kv.split("=", 1) for kv in match.group(1).split(", "))
    return jobs


def copy_demo(dest: Path) -> Path:
    shutil.copytree(REPO / "demo", dest, ignore=shutil.ignore_patterns("results", ".snakemake"))
    return dest


@pytest.fixture
def finished_demo(demo_run, tmp_path) -> Path:
    """A private copy of the finished demo (mtimes and Snakemake metadata kept)."""
    return Path(shutil.copytree(demo_run, tmp_path / "demo", symlinks=True))


def paper_grid_dry_run(*args: str) -> subprocess.CompletedProcess:
    """A dry run of the paper's config in the repository."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.defpath}"
    result = subprocess.run(
        [*SNAKEMAKE, "--directory", str(REPO), "--dry-run", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV, "PATH": path},
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("profile", [[], ["--profile", "profiles/local"]], ids=["", "workstation"])
def test_paper_grid_dry_run_has_the_expected_jobs_per_rule(profile):
    """The paper's grid, also through the one-GPU workstation's profile, whose jobs run in this
    virtualenv: no conda needed on the PATH."""
    result = paper_grid_dry_run(*profile, "--quiet", "rules")
    assert "Experiment grid: 375 arm x subject pairs, 25 arms, 15 subjects" in result.stdout
    counts = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^(\w+)\s+(\d+)$", result.stdout, re.MULTILINE)
    }
    assert counts == {
        "download_dataset": 3,
        # every hub model the jobs load, once, on the submitting host: SD-2.1-base, CLIP,
        # DINO, GroundingDINO, SAM, LLaVA, BLIP-2, BLIP-Diffusion and its BERT tokenizer,
        # ELITE's SD-1.4 and CLIP ViT-L
        "fetch_model": 11,
        # ELITE's two mappers, downloaded by hand: checked (here: named as missing) first
        "check_manual_file": 2,
        "prepare_references": 15,
        "segment_references": 15,
        "describe_references": 15 * 3,  # case1, sid_llava, sid_blip2 (on the nodes)
        "describe_references_api": 15 * 3,  # GPT-4o's case2, sid, case4 (submitting host)
        "descriptions_report": 15,
        "class_images": 11,  # one per class noun, shared by its subjects and methods
        # dreambooth x 6 description sets + dreambooth_masked + dreambooth--first1 x 2
        "train_full_finetune": 15 * 9,
        # custom_diffusion, svdiff, textual_inversion, sefi_ide, and the single-reference
        # custom_diffusion--first1, svdiff--first1, each x {case1, sid}
        "train": 15 * 12,
        # every arm x subject, the negative-prompt arm sharing its weights; each with its
        # attention maps (attention.experiments: all), drawn by the job that samples it
        "sample_and_attention": 330,
        "compare_samples": 15 * 8,
        # the encoder arms (blip_diffusion, elite on one reference) and the base model: no
        # training, no [V] maps
        "sample_encoder": 15 * 3,
        "score": 375,
        "gather_metrics": 1,
        "analyze": 1,
        "summarize_references": 1,
        "plan_experiments": 1,
        # the human study's site (App. B); its analysis waits for participants' responses
        "human_study": 1,
        "all": 1,
        "total": 1353,
    }


def test_every_job_loading_a_hub_model_waits_for_its_fetch_on_the_submitting_host():
    """Through the SLURM profile (conda swapped for env-modules: none here): every job loading
    a hub model waits for its fetch, and the profile's node size holds every rule's memory (no
    job is lowered to it)."""
    run = paper_grid_dry_run("--profile", "slurm", "--sdm=env-modules", "all")
    out = run.stdout
    assert "asks for mem_mb" not in run.stdout + run.stderr
    waits: dict[str, set[str]] = {}
    threads: dict[str, set[int]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", out):
        if not (head := re.match(r"(local)?rule (\w+):", block)):
            continue
        found = re.search(r"^\s+threads: (\d+)$", block, re.MULTILINE)
        threads.setdefault(head.group(2), set()).add(int(found.group(1)) if found else 1)
        if inputs := re.search(r"^\s+input: (.*)$", block, re.MULTILINE):
            hub = set(re.findall(r"results/models/hub/([\w.-]+)\.json", inputs.group(1)))
            waits.setdefault(head.group(2), set()).update(hub)
    # GPU jobs get CPUs beside the GPU (the profile's set-threads), CPU jobs one
    for rule in ("train", "train_full_finetune", "sample_and_attention", "score", "class_images"):
        assert threads[rule] == {4}, (rule, threads[rule])
    assert threads["prepare_references"] == threads["fetch_model"] == {1}
    sd, clip, dino = (
        "sd2-community--stable-diffusion-2-1-base",
        "openai--clip-vit-base-patch32",
        "facebook--dino-vits16",
    )
    for rule in ("class_images", "train", "train_full_finetune", "describe_references"):
        assert sd in waits[rule], (rule, waits.get(rule))
    assert waits["score"] == {clip, dino}
    assert waits["segment_references"] == {
        "IDEA-Research--grounding-dino-tiny",
        "facebook--sam-vit-huge",
    }
    assert {"llava-hf--llava-1.5-13b-hf", "Salesforce--blip2-opt-2.7b"} <= waits[
        "describe_references"
    ]
    assert {"Salesforce--blipdiffusion", "bert-base-uncased", "CompVis--stable-diffusion-v1-4"} <= (
        waits["sample_encoder"]
    )
    elite = [
        block
        for block in re.split(r"\n(?=rule )", out)
        if block.startswith("rule sample_encoder:") and "method=elite--first1" in block
    ]
    mapper = "results/models/manual/methods.elite.global_mapper.json"
    assert elite and all(mapper in block for block in elite), "the mappers' check is an input"


def test_a_file_downloaded_by_hand_is_checked_and_named_with_where_to_get_it(tmp_path):
    for name in ("config.yaml", "subjects.tsv", "prompts"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, tmp_path / name)
    target = "results/models/manual/methods.elite.global_mapper.json"
    missing = snakemake(tmp_path, "--cores", "1", target, check=False)
    assert missing.returncode != 0
    log = tmp_path / "results/logs/check_manual_file/methods.elite.global_mapper.log"
    said = log.read_text()
    assert "resources/elite/global_mapper.pt (methods.elite.global_mapper) does not exist" in said
    assert "github.com/csyxwei/ELITE" in said and not (tmp_path / target).exists()
    mapper = tmp_path / "resources/elite/global_mapper.pt"
    mapper.parent.mkdir(parents=True)
    mapper.write_bytes(b"weights")
    snakemake(tmp_path, "--cores", "1", target)
    record = json.loads((tmp_path / target).read_text())
    assert record["bytes"] == 7 and record["sha256"] == sha256(b"weights").hexdigest()
    assert mapper.read_bytes() == b"weights", "the user's file is never an output"


def test_a_memory_cap_below_a_rule_s_request_is_named():
    run = paper_grid_dry_run("--quiet", "rules", "--resources", "mem_mb=8000")
    said = run.stdout + run.stderr
    assert "rule train asks for mem_mb=32000, but the run's `resources: mem_mb: 8000`" in said
    assert said.count("rule train asks for") == 1, "once per rule, not per job"


def layer_dry_run(*layers: str) -> subprocess.CompletedProcess:
    """`snakemake --dry-run` of the demo with the layers' config files on top (none: the demo
    alone); it must succeed."""
    result = subprocess.run(
        [*SNAKEMAKE, "--directory", str(REPO / "demo"), "--dry-run", "--quiet", "rules"]
        + [
            "--configfile",
            str(REPO / "demo/config.yaml"),
            *(str(REPO / layer) for layer in layers),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


def idle_subjects(result: subprocess.CompletedProcess) -> list[str]:
    """The subjects the start-up warns are in no experiment (none: no warning)."""
    idle = re.search(
        r"subject\(s\) in no experiment \(references and masks only\): ([\w, ]*);",
        result.stdout + result.stderr,
    )
    return idle.group(1).split(", ") if idle else []


def grid_size(result: subprocess.CompletedProcess) -> int | None:
    """The arm x subject pairs a dry run's start-up reports (None: it reported none)."""
    found = re.search(r"Experiment grid: (\d+) arm x subject pairs", result.stdout)
    return int(found.group(1)) if found else None


def test_seeds_methods_layer_on_the_demo():
    """demo/seeds.yaml adds SeFi-IDE x {Case 1, SID} beside Textual Inversion and DreamBooth on
    the three background subjects."""
    result = layer_dry_run("demo/seeds.yaml")
    sefi = re.search(r"^  sefi: (.*)$", result.stdout, re.MULTILINE)
    assert sefi and set(sefi.group(1).split(", ")) == {
        f"{method}/{case}/standard"
        for method in ("sefi_ide", "textual_inversion", "dreambooth")
        for case in ("case1", "sid")
    }
    grid = grid_size(result)
    # sefi_ide x 2 on 3 subjects; textual_inversion and dreambooth x 2 on the 2 subjects the
    # demo (13 arm x subject pairs, all on blue_mug) lacks them on
    assert grid == 13 + 2 * 3 + 2 * 2 * 2


def test_strength_sweep_layers_on_the_demo():
    """demo/strength.yaml adds DreamBooth at 100 and 300 steps (Case 1, SID) to the demo's 600."""
    result = layer_dry_run("demo/strength.yaml")
    # two more strengths x 2 x 3 subjects, and the demo's strength on the 2 it lacks it on
    assert grid_size(result) == 13 + 2 * 2 * 3 + 2 * 2
    strength = re.search(r"^  strength: (.*)$", result.stdout, re.MULTILINE)
    assert strength and strength.group(1).split(", ") == [
        f"dreambooth{steps}/{case}/standard"
        for steps in ("", "_100steps", "_300steps")
        for case in ("case1", "sid")
    ]


def test_training_seeds_layer_on_the_demo():
    """demo/training_seeds.yaml adds DreamBooth from training seeds 1 and 2 (Case 1, SID) to the
    demo's seed 0, each seed an arm of its own."""
    result = layer_dry_run("demo/training_seeds.yaml")
    # two more seeds x 2 x 3 subjects, and the demo's seed on the 2 it lacks it on
    assert grid_size(result) == 13 + 2 * 2 * 3 + 2 * 2
    seeds = re.search(r"^  training_seeds: (.*)$", result.stdout, re.MULTILINE)
    assert seeds and seeds.group(1).split(", ") == [
        f"dreambooth{seed}/{case}/standard"
        for seed in ("", "_seed1", "_seed2")
        for case in ("case1", "sid")
    ]


def test_lego_layers_on_the_demo():
    """demo/lego.yaml adds Lego, multi-vector Textual Inversion and the base model on the
    demo's four concept subjects, each Lego arm again with its tokens initialised from its
    concept's words, and nothing else."""
    result = layer_dry_run("demo/lego.yaml")
    lego = re.search(r"^  lego: (.*)$", result.stdout, re.MULTILINE)
    methods = ["lego", "textual_inversion_multi", "base_model"]
    methods += ["lego_concept_init", "textual_inversion_multi_concept_init"]
    methods += ["lego_hat_init", "textual_inversion_multi_hat_init"]
    assert lego and set(lego.group(1).split(", ")) == {f"{m}/case1/standard" for m in methods}
    # 3 arms x 4 concept subjects; 2 concept-word arms x 2 subjects of each concept
    assert grid_size(result) == 13 + 3 * 4 + 2 * 2 + 2 * 2
    idle = idle_subjects(result)
    assert idle and not any(s.startswith(("upside_down", "red_hat")) for s in idle)


def test_a_prompt_a_subject_gets_twice_is_named_at_start_up(tmp_path):
    """Two templates that give a subject the same prompt draw the same images (same seeds),
    which would count twice; the start-up names the subject and the two templates. The shipped
    demo and its layers get no such warning."""
    assert "give it the same prompt" not in layer_dry_run("demo/lego.yaml").stdout
    workdir = copy_demo(tmp_path / "w")
    prompts = yaml.safe_load((workdir / "prompts.yaml").read_text())
    prompts["object"][3] = "a {token} {class}"  # template 0 again
    (workdir / "prompts.yaml").write_text(yaml.safe_dump(prompts, sort_keys=False))
    result = snakemake(workdir, "--dry-run", "--quiet", "rules")
    warning = "subject blue_mug: prompt templates 0 and 3 of prompts.yaml give it the same prompt"
    assert warning in result.stdout + result.stderr


def test_cases_layer_on_the_demo():
    """demo/cases.yaml runs Case 1-4 and both alternatives on all five biased subjects (the
    demo: on `blue_mug`), so metrics.comparisons pairs SID with each over the five."""
    result = layer_dry_run("demo/cases.yaml")
    found = {
        name: set(re.search(rf"^  {name}: (.*)$", result.stdout, re.MULTILINE).group(1).split(", "))
        for name in ("cases", "alternatives")
    }
    assert found["cases"] == {
        f"dreambooth/{c}/standard" for c in ("case1", "case2", "sid", "case4")
    }
    assert found["alternatives"] == {
        "dreambooth/case1/standard",
        "dreambooth/case1/negative_prompt",
        "dreambooth_masked/case1/standard",
    }
    # 6 arms of cases and alternatives (Case 1 in both) on 4 more subjects
    assert grid_size(result) == 13 + 6 * 4
    assert idle_subjects(result) == [
        "red_hat_dog",
        "red_hat_robot",
        "upside_down_car",
        "upside_down_dog",
    ]


def test_a_compared_arm_that_does_not_run_is_named_at_start_up(tmp_path):
    """A typo in metrics.comparisons is named before any job runs, not found as an empty table
    at the end; the run goes on without that pair (a run of fewer experiments than the config
    compares is not stopped by it)."""
    workdir = copy_demo(tmp_path / "w")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["metrics"]["comparisons"].append(
        ["dreambooth/sid/standard", "dreambooth/case3/standard"]
    )
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = snakemake(workdir, "--dry-run", "--quiet", "rules")
    message = "metrics.comparisons[4]: arm 'dreambooth/case3/standard' is in no experiment"
    assert message in result.stdout + result.stderr
    assert "metrics.comparisons[3]" not in result.stdout + result.stderr  # the shipped ones run


def test_biases_layer_on_the_demo():
    """demo/biases.yaml adds DreamBooth x {Case 1, SID} and the base model on the four other
    biased subjects, and the single-reference experiment: every subject but the concept ones
    then runs (the grid of the README's world figures)."""
    plain = layer_dry_run()
    assert grid_size(plain) == 13  # main, cases and alternatives on blue_mug
    result = layer_dry_run("demo/biases.yaml")
    biases = re.search(r"^  biases: (.*)$", result.stdout, re.MULTILINE)
    assert biases and set(biases.group(1).split(", ")) == {
        "dreambooth/case1/standard",
        "dreambooth/sid/standard",
        "base_model/case1/standard",
    }
    # DreamBooth x 2 and the base model on 4 more subjects; dreambooth--first1 x 2, BLIP-Diffusion
    assert grid_size(result) == 13 + 4 * 3 + 3
    assert idle_subjects(result) == [
        "red_hat_dog",
        "red_hat_robot",
        "upside_down_car",
        "upside_down_dog",
    ]


@pytest.mark.parametrize("config", ["config.yaml", "demo/config.yaml"])
def test_lint_is_clean(config):
    workdir = REPO if config == "config.yaml" else REPO / "demo"
    result = subprocess.run(
        [*SNAKEMAKE, "--lint", "--directory", str(workdir), "--configfile", str(REPO / config)],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_demo_outputs(demo_run):
    subjects = ("blue_mug", "toy_robot", "spotted_dog", "balloon_car", "upside_robot")
    # references only (make world-lego)
    concept_subjects = ("upside_down_dog", "upside_down_car", "red_hat_dog", "red_hat_robot")
    summary = list(csv.DictReader(open(demo_run / "results/references/summary.csv")))
    assert Counter(r["subject"] for r in summary) == dict.fromkeys(subjects + concept_subjects, 4)
    for row in summary:
        image = Image.open(demo_run / "results/references" / row["subject"] / row["path"])
        assert image.size == (32, 32) and image.mode == "RGB"
        assert row["mask_path"]  # the world draws ground-truth masks for every image
    arms = list(csv.DictReader(open(demo_run / "results/experiments/arms.csv")))
    assert {r["experiment"] for r in arms} == {
        "main",
        "cases",
        "alternatives",
        "biases",
        "single_reference",
    }
    assert sum(r["experiment"] == "main" for r in arms) == 8 + 1  # + the base model on the mug
    assert sum(r["experiment"] == "biases" for r in arms) == 2 * 5 + 5  # + the base model
    single = [r for r in arms if r["experiment"] == "single_reference"]
    assert {(r["method"], r["algorithm"], r["references"]) for r in single} == {
        ("dreambooth--first1", "dreambooth", "1"),
        ("blip_diffusion--first1", "blip_diffusion", "1"),
    }
    assert len({(r["arm"], r["subject"]) for r in arms}) == 28
    samples = list((demo_run / "results/samples").glob("*/*/*/*/manifest.csv"))
    assert len(samples) == 28
    # the encoder arm: no training job, the same prompts and seeds as the trained arms
    encoder = "results/samples/blip_diffusion--first1/case1/standard/blue_mug/manifest.csv"
    trained = "results/samples/dreambooth--first1/case1/standard/blue_mug/manifest.csv"
    pairs_of = [
        [(r["prompt_id"], r["seed"], r["prompt_plain"]) for r in csv.DictReader(open(demo_run / m))]
        for m in (encoder, trained)
    ]
    assert sorted(pairs_of[0]) == sorted(pairs_of[1])
    assert not (demo_run / "results/train/blip_diffusion--first1").exists()
    # the base model: no training job, the trained arms' prompts without the identifier and
    # their seeds (the same starting noise), so its images pair with theirs
    base = demo_run / "results/samples/base_model/case1/standard/spotted_dog"
    finetuned = demo_run / "results/samples/dreambooth/case1/standard/spotted_dog"
    base_rows, trained_rows = (
        list(csv.DictReader(open(d / "manifest.csv"))) for d in (base, finetuned)
    )
    assert [r["prompt"] for r in base_rows] == [r["prompt_plain"] for r in trained_rows]
    assert base_rows[0]["prompt"] == "a dog" and [r["seed"] for r in base_rows] == [
        r["seed"] for r in trained_rows
    ]
    assert not (demo_run / "results/train/base_model").exists()
    assert not (demo_run / "results/attention/base_model").exists()
    base_pixels = np.asarray(Image.open(base / base_rows[0]["path"]), dtype=float)
    trained_pixels = np.asarray(Image.open(finetuned / trained_rows[0]["path"]), dtype=float)
    assert np.abs(base_pixels - trained_pixels).mean() > 5  # fine-tuning changed the image
    for manifest in samples:
        rows = list(csv.DictReader(open(manifest)))
        assert len(rows) == 14 * 4  # the world's prompts x seeds
        assert all((manifest.parent / r["path"]).exists() for r in rows)
        assert all("sks" not in r["prompt_plain"] for r in rows)
    negative = demo_run / "results/samples/dreambooth/case1/negative_prompt/blue_mug/manifest.csv"
    assert "tablecloth" in next(csv.DictReader(open(negative)))["negative_prompt"]
    attention = list((demo_run / "results/attention").glob("*/*/*/*/attention.csv"))
    assert len(attention) == 16  # attention.experiments: [main, biases]
    # A method's own checkpoint_every reaches its jobs; the others keep training's.
    intervals = {
        path.parts[-4]: json.loads(path.read_text())["checkpoint_every"]
        for path in (demo_run / "results/train").glob("*/case1/blue_mug/train_info.json")
    }
    assert intervals == {
        "dreambooth": 300,  # demo/config.yaml's DreamBooth (600 steps) checkpoints at 300
        "dreambooth--first1": 300,
        "dreambooth_masked": 1000,
        "custom_diffusion": 1000,
        "svdiff": 1000,
        "textual_inversion": 1000,
    }
    weights = demo_run / "results/train/svdiff/sid/blue_mug/weights"
    assert (weights / "spectral_shifts.safetensors").exists()
    # full fine-tunes are temp() in the demo (keep_full_weights: false): gone after sampling
    assert not (demo_run / "results/train/dreambooth/sid/blue_mug/weights").exists()
    assert len(list((demo_run / "results/samples/compare").glob("*/*.png"))) == 4 + 4 + 1
    # the single-reference arm trained on the first reference only, the full arm on all four
    for method, ids in (("dreambooth--first1", ["01"]), ("dreambooth", ["01", "02", "03", "04"])):
        info = json.loads(
            (demo_run / f"results/train/{method}/sid/blue_mug/train_info.json").read_text()
        )
        assert sorted(row["image_id"] for row in info["images"]) == ids
    metrics = pd.read_csv(demo_run / "results/metrics/all.csv")
    clip_metrics = {"SA", "NSD", "TA", "CLIP-I", "DINO"}
    world = {"leak_background", "leak_object", "leak_pose", "subject_kept", "prompt_followed"}
    world |= {"kept_class", "kept_colour", "kept_pattern", "kept_accent"}
    assert set(metrics["metric"]) == clip_metrics | world
    assert (metrics["metric"].isin(clip_metrics)).sum() == 28 * 56 * 5  # pairs x images
    # the accent's part only for subjects with a pattern; each part where subject_kept is
    parts = metrics[metrics["metric"].str.startswith("kept_")]
    kept = metrics[metrics["metric"] == "subject_kept"]
    assert (parts.groupby("metric").size() <= len(kept)).all()
    assert (parts[parts["metric"] == "kept_class"]["image"].sort_values().tolist()) == sorted(
        kept["image"]
    )
    assert "blip_diffusion--first1" in set(metrics["method"])
    # the pose leak exists only for the upside-down subject, the object leak not for it
    assert set(metrics.loc[metrics["metric"] == "leak_pose", "subject"]) == {"upside_robot"}
    assert "upside_robot" not in set(metrics.loc[metrics["metric"] == "leak_object", "subject"])
    summary = pd.read_csv(demo_run / "results/metrics/summary.csv")
    assert len(summary[summary["metric"].isin(clip_metrics)]) == 16 * 5  # arms x metrics
    # the base model is the tables' reference row, not a Case-1 baseline
    main_table = (demo_run / "results/metrics/tables/main.md").read_text()
    assert "| base_model | untrained |" in main_table
    single_table = pd.read_csv(demo_run / "results/metrics/tables/single_reference.csv")
    assert set(single_table["method"]) == {"dreambooth--first1", "blip_diffusion--first1"}
    assert set(single_table["setting"]) == {"baseline", "SID", "untrained"}
    encoder_rows = single_table[single_table["method"] == "blip_diffusion--first1"]
    assert set(encoder_rows["setting"]) == {"untrained"}
    pairs = pd.read_csv(demo_run / "results/metrics/method_pairs.csv")
    one_vs_all = pairs[
        (pairs["method_a"] == "dreambooth") & (pairs["method_b"] == "dreambooth--first1")
    ]
    assert set(one_vs_all["subjects"]) == {"blue_mug"} and set(one_vs_all["descriptions"]) == {
        "case1",
        "sid",
    }
    for name in ("pareto", "pareto_single_reference", "subjects", "improvements", "agreement"):
        assert (demo_run / f"results/metrics/plots/{name}.svg").stat().st_size > 1000
    agreement = pd.read_csv(demo_run / "results/metrics/agreement.csv")
    assert {"SA", "NSD", "TA", "CLIP-I", "DINO"} <= set(agreement["proxy"])
    for subject in subjects:
        masks = list(csv.DictReader(open(demo_run / f"results/masks/{subject}/manifest.csv")))
        assert [r["backend"] for r in masks] == ["provided"] * 4
        assert Image.open(demo_run / f"results/masks/{subject}/overlays.png").width > 0
    described = {
        p.parent.name + "/" + p.stem for p in (demo_run / "results/descriptions").glob("*/*.csv")
    }
    assert described == {
        *(f"{s}/{subject}" for s in ("case1", "sid") for subject in subjects),
        "case2/blue_mug",
        "case4/blue_mug",
    }
    sid = list(csv.DictReader(open(demo_run / "results/descriptions/sid/blue_mug.csv")))
    assert all(r["description"].count("[V] mug") == 1 and r["source"] == "manual" for r in sid)
    assert all("tablecloth" in r["description"] for r in sid)
    page = (demo_run / "results/descriptions/report/blue_mug.html").read_text()
    assert page.count("<img") == 4 and "sid (case 3)" in page
    for rule in ("prepare_references", "segment_references", "describe_references"):
        assert list((demo_run / "results/logs" / rule).rglob("*.log")), rule
    # the human study (App. B): a site of image pairs from the two DreamBooth arms
    study = demo_run / "results/human_study/dreambooth_sid"
    info = json.loads((study / "site/study.json").read_text())
    assert info["arms"] == ["dreambooth/case1/standard", "dreambooth/sid/standard"]
    assert len(info["participants"]) == 8 and info["screens_per_participant"] == 3 * 4
    assert len(list(csv.DictReader(open(study / "site/plan.csv")))) == 8 * 3 * 4
    files = list(csv.DictReader(open(study / "site/manifest.csv")))
    assert sum(r["kind"] == "generated" for r in files) == 5 * 2 * 2  # subjects x pairs x arms
    assert sum(r["kind"] == "reference" for r in files) == 5 * 4
    assert all((study / "site" / r["path"]).is_file() for r in files)
    design = list(csv.DictReader(open(study / "design.csv")))
    assert sum(int(r["screens"]) for r in design) == 8 * 3 * 4
    assert not (study / "responses.jsonl").exists()  # only participants write it
    assert scheduled_jobs(demo_run) == []  # a finished run is complete


def test_every_result_takes_the_umask(demo_run):
    """A lab mate in the group reads every result, weights included (safetensors writes 0600
    files; temporary folders are 0700): each file and folder has the mode the umask gives."""
    umask = os.umask(0o022)
    os.umask(umask)
    wrong = [
        f"{path.relative_to(demo_run)} {oct(stat_mode)}"
        for path in (demo_run / "results").rglob("*")
        if not path.is_symlink()
        and (stat_mode := path.stat().st_mode & 0o5777)  # a setgid folder may pass it on
        != (0o777 if path.is_dir() else 0o666) & ~umask
    ]
    assert not wrong, wrong[:10]
    assert list((demo_run / "results/train").rglob("*.safetensors"))


def test_plain_demo_outputs(plain_demo):
    """`make demo` alone: main, cases and alternatives on `blue_mug`, every table and plot
    written (the single-reference ones empty), a one-subject human study."""
    arms = list(csv.DictReader(open(plain_demo / "results/experiments/arms.csv")))
    assert {r["experiment"] for r in arms} == {"main", "cases", "alternatives"}
    assert {r["subject"] for r in arms} == {"blue_mug"}
    assert len({(r["arm"], r["subject"]) for r in arms}) == 13
    metrics = pd.read_csv(plain_demo / "results/metrics/all.csv")
    assert set(metrics["subject"]) == {"blue_mug"}
    ta = metrics[metrics["metric"] == "TA"]
    per_arm = ta.groupby(["method", "descriptions", "inference"]).size()
    assert {"/".join(arm): n for arm, n in per_arm.items()} == {r["arm"]: 14 * 4 for r in arms}
    single_table = pd.read_csv(plain_demo / "results/metrics/tables/single_reference.csv")
    assert single_table.empty
    for name in ("pareto", "subjects", "improvements", "comparisons", "agreement"):
        assert (plain_demo / f"results/metrics/plots/{name}.svg").stat().st_size > 1000
    # metrics.comparisons: SID against Case 2, Case 4 and the two alternatives, image by image
    chosen = pd.read_csv(plain_demo / "results/metrics/comparisons.csv")
    assert set(chosen["arm_a"]) == {"dreambooth/sid/standard"}
    assert set(chosen["arm_b"]) == {
        "dreambooth/case2/standard",
        "dreambooth/case4/standard",
        "dreambooth/case1/negative_prompt",
        "dreambooth_masked/case1/standard",
    }
    assert (chosen["n_pairs"] <= 14 * 4).all() and set(chosen["subjects"]) == {"blue_mug"}
    everywhere = chosen[chosen["metric"].isin(["SA", "NSD", "TA"])]
    # 4 pairs x 3 metrics x (all, and the mug's two bias types: background, nearby-object)
    assert len(everywhere) == 4 * 3 * 3 and (everywhere["n_pairs"] == 14 * 4).all()
    figure = (plain_demo / "results/metrics/plots/comparisons.svg").read_text()
    assert all(f"<!-- sid \u2212 {b} -->" in figure for b in ("case2", "case4"))
    # each side's mean is that arm's mean in summary.csv (the same images, the same estimate)
    summary = pd.read_csv(plain_demo / "results/metrics/summary.csv").set_index(["arm", "metric"])
    for row in everywhere[everywhere["bias"] == "all"].itertuples():
        assert row.mean_a == pytest.approx(summary.loc[(row.arm_a, row.metric), "mean"])
        assert row.mean_b == pytest.approx(summary.loc[(row.arm_b, row.metric), "mean"])
        assert row.diff == pytest.approx(row.mean_a - row.mean_b)
    study = plain_demo / "results/human_study/dreambooth_sid"
    info = json.loads((study / "site/study.json").read_text())
    assert len(info["participants"]) == 8 and info["screens_per_participant"] == 1 * 4
    plan = list(csv.DictReader(open(study / "site/plan.csv")))
    assert len(plan) == 8 * 4 and {r["subject"] for r in plan} == {"blue_mug"}
    assert {(r["prompt_id"], r["seed"]) for r in plan} == {
        (p, s) for p in ("1", "3") for s in ("0", "1")
    }


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",  # let the report's JavaScript render
]


def test_report_in_a_real_browser(demo_run, chromium, tmp_path):
    report = demo_run / "results/report.html"
    snakemake(demo_run, "--report", str(report))
    browser = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    screenshot = tmp_path / "report.png"
    shot = subprocess.run(
        [*browser, "--window-size=1400,1000", f"--screenshot={screenshot}", report.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    dom = subprocess.run(
        [*browser, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    for category in (
        "References and masks",
        "Descriptions",
        "Training",
        "Samples",
        "Attention",
        "Metrics",
        "Pareto",
    ):
        # a <span> exists only once the report's JavaScript has rendered the navigation
        assert f"<span>{category}</span>" in dom, category
    assert '"filename": "pareto.png"' in dom and "Pareto fronts" in dom


def test_touching_inputs_without_changing_content_schedules_nothing(finished_demo):
    later = os.stat(finished_demo / "results/references/summary.csv").st_mtime + 100
    for path in (finished_demo / "subjects").rglob("*"):
        os.utime(path, (later, later))
    for name in ("subjects.tsv", "prompts.yaml"):
        os.utime(finished_demo / name, (later, later))
    assert scheduled_jobs(finished_demo) == []


def test_changing_one_image_reruns_only_that_subject_and_the_gathers(finished_demo):
    path = finished_demo / "subjects/toy_robot/02.png"
    pixels = np.array(Image.open(path))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(path)
    jobs = scheduled_jobs(finished_demo)
    assert ("prepare_references", {"subject": "toy_robot"}) in jobs
    for rule, wildcards in jobs:
        assert rule in GATHERS or wildcards.get("subject") == "toy_robot", (rule, wildcards)


def test_changing_one_method_setting_reruns_only_that_method_and_the_gathers(finished_demo):
    config_path = finished_demo / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["methods"]["svdiff"]["steps"] += 1
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    jobs = scheduled_jobs(finished_demo)
    assert ("plan_experiments", {}) in jobs
    for rule, wildcards in jobs:
        assert rule in GATHERS or wildcards.get("method") == "svdiff", (rule, wildcards)


def test_a_methods_own_training_seed_is_another_arm(tmp_path):
    """`seed` in a method's settings overrides training.seed: the same settings trained from
    another seed are another arm (the spread over training runs); naming training.seed's own
    value there changes no training, so none reruns."""
    workdir = copy_demo(tmp_path / "w")
    config_path = workdir / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    short = config["methods"]["dreambooth"] | {"steps": 4, "prior_preservation": False}
    config["methods"] = {"db": short, "db_seed1": short | {"seed": 1}}
    grid = {"methods": ["db", "db_seed1"], "descriptions": ["case1"], "subjects": ["blue_mug"]}
    config["experiments"] = {"training_seeds": [grid]}
    config["attention"]["experiments"] = ["training_seeds"]
    del config["human_study"]  # its arms are not in this grid
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    targets = [f"results/train/{m}/case1/blue_mug/train_info.json" for m in ("db", "db_seed1")]
    runs = [(workdir / target).parent for target in targets]
    snakemake(workdir, "--cores", "2", *targets, timeout=1200)  # hang guard
    infos = [json.loads((run / "train_info.json").read_text()) for run in runs]
    assert [info["seed"] for info in infos] == [0, 1]
    assert infos[0]["settings"] == infos[1]["settings"]  # the seed is not a method setting
    unet = "weights/unet/diffusion_pytorch_model.safetensors"
    assert (runs[0] / unet).read_bytes() != (runs[1] / unet).read_bytes()

    config["methods"]["db"]["seed"] = config["training"]["seed"]
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert "Nothing to be done" in snakemake(workdir, "--dry-run", *targets).stdout


def test_downloaded_subject_through_the_workflow(tmp_path):
    """A dataset fetched from a local file:// copy feeds prepare_references."""
    workdir = copy_demo(tmp_path / "w")
    archive = tmp_path / "mini.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for image in sorted((REPO / "demo/subjects/blue_mug").glob("0?.png")):
            zf.write(image, f"mini-main/dataset/mug/{image.name}")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["datasets"] = {
        "mini": {
            "downloads": [
                {"url": archive.as_uri(), "sha256": None, "extract": True, "strip_components": 1}
            ]
        }
    }
    config["experiments"] = {"main": [{"methods": ["dreambooth"], "descriptions": ["case1"]}]}
    del config["human_study"]  # its SID arm is not in this grid (a config error otherwise)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (workdir / "subjects.tsv").write_text(
        "subject\tclass\tkind\timages\tsource\nmug\tmug\tobject\tresources/mini/dataset/mug\tmini\n"
    )
    snakemake(workdir, "--cores", "2", "results/references/summary.csv")
    manifest = list(csv.DictReader(open(workdir / "resources/mini.manifest.csv")))
    assert len(manifest) == 4
    rows = list(csv.DictReader(open(workdir / "results/references/mug/manifest.csv")))
    assert [r["image_id"] for r in rows] == ["01", "02", "03", "04"]
    assert (
        "pin it in the config" in (workdir / "results/logs/download_dataset/mini.log").read_text()
    )


def test_concept_subject_runs_lego_on_transfer_prompts(tmp_path):
    """The demo's concept subjects (kind concept: "upside down" on a dog and on a car, "wearing
    a red hat" on a dog and on a robot, drawn by the world): a `kinds: [concept]` grid runs on
    them alone, their prompts (the hat's own list) carry the concept to other classes, and text
    alignment and the judge read each prompt with the concept's words for the tokens; the
    carrier/transfer tables split and pair the arms per concept."""
    workdir = copy_demo(tmp_path / "w")
    concept_subjects = ["red_hat_dog", "red_hat_robot", "upside_down_car", "upside_down_dog"]
    # the demo's own grids skip the concept subjects, and the start-up says so
    assert set(concept_subjects) <= set(idle_subjects(snakemake(workdir, "--dry-run")))
    assert not set(concept_subjects) & {
        w.get("subject") for r, w in scheduled_jobs(workdir) if r == "train"
    }
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    lego = {"algorithm": "lego", "steps": 6, "learning_rate": 5.0e-3, "masked": True}
    config["methods"] = {
        "lego": lego | {"num_tokens": 2},
        "textual_inversion_multi": lego
        | {"num_tokens": 2, "subject_separation": "none", "context_weight": 0.0, "masked": False},
    }
    methods = ["lego", "textual_inversion_multi"]
    config["methods"]["base_model"] = {"algorithm": "base_model"}  # the concept from its words
    # the concept's own context words reach Lego (textual_inversion_multi keeps weight 0)
    config["concept_words"] = {"upside down": {"positive": ["upside down"], "negative": ["red"]}}
    grid = {"methods": [*methods, "base_model"], "descriptions": ["case1"]}
    config["experiments"] = {"lego": [grid]}
    config["experiments"]["lego"][0]["kinds"] = ["concept"]
    config["attention"]["experiments"] = ["lego"]
    config["sampling"]["seeds"] = 1
    config["attention"]["seeds"] = [0]  # the one seed sampled
    del config["human_study"]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    jobs = scheduled_jobs(workdir)
    trained = {(w["method"], w["subject"]) for rule, w in jobs if rule.startswith("train")}
    assert trained == {(m, s) for m in methods for s in concept_subjects}
    snakemake(workdir, "--cores", "2", "results/metrics/concepts.csv", timeout=1800)  # hang guard
    manifest = workdir / "results/samples/lego/case1/standard/upside_down_car/manifest.csv"
    rows = list(csv.DictReader(open(manifest)))
    assert rows[5]["prompt"] == "a <sks_1> <sks_2> mug"  # the tokens on another class
    assert rows[5]["prompt_plain"] == "an upside down mug"
    assert rows[2]["prompt_plain"] == "an upside down car on the beach"
    manifest = workdir / "results/samples/lego/case1/standard/red_hat_robot/manifest.csv"
    hat_rows = list(csv.DictReader(open(manifest)))
    # the hat's own list: the two classes with a head, the other one the transfer class
    assert [r["prompt_plain"] for r in hat_rows[:3]] == [
        "a wearing a red hat dog",
        "a wearing a red hat robot",
        "a wearing a red hat dog in the jungle",
    ]
    weights = workdir / "results/train/lego/case1/upside_down_car/weights"
    assert {p.name for p in weights.glob("sks_*.safetensors")} == {
        "sks_1.safetensors",
        "sks_2.safetensors",
    }
    base = workdir / "results/samples/base_model/case1/standard/upside_down_car/manifest.csv"
    base_rows = list(csv.DictReader(open(base)))
    assert base_rows[5]["prompt"] == base_rows[5]["prompt_plain"] == "an upside down mug"
    scores = pd.read_csv(workdir / "results/metrics/all.csv")
    assert set(scores["subject"]) == set(concept_subjects)
    assert set(scores["method"]) == {*methods, "base_model"}
    ta = scores[(scores["metric"] == "TA") & (scores["method"] == "lego")]
    assert len(ta) == 56 and ta["value"].notna().all()
    # The judge reads what each prompt asks: the concept everywhere (prompt_followed on all 56,
    # never a pose leak of a hat subject); the carrier where the prompt names its class
    # (subject_kept on 6 prompts per upside-down subject, 7 per hat subject), the carrier
    # leaking into the other classes' (leak_subject on 8 and 7).
    lego_rows = scores[scores["method"] == "lego"]
    counts = lego_rows["metric"].value_counts()
    assert counts["prompt_followed"] == 56 and counts["subject_kept"] == 2 * 6 + 2 * 7
    assert counts["leak_subject"] == 2 * 8 + 2 * 7 and "leak_pose" not in counts
    logs = workdir / "results/logs/train"
    assert "no context loss" not in (logs / "lego/case1/upside_down_car.log").read_text()
    assert (
        "no context loss"
        in (logs / "textual_inversion_multi/case1/upside_down_car.log").read_text()
    )
    # SA split per concept: upside down on 12 carrier prompts (keeping the carrier) and 16
    # transfer prompts (it leaking); the hat on 14 and 14
    split = pd.read_csv(workdir / "results/metrics/concepts.csv")
    sa = split[(split["metric"] == "SA") & (split["method"] == "lego")]
    assert sa.set_index(["concept", "prompts"])["n_images"].to_dict() == {
        ("upside down", "carrier"): 12,
        ("upside down", "transfer"): 16,
        ("wearing a red hat", "carrier"): 14,
        ("wearing a red hat", "transfer"): 14,
    }
    split = split[split["concept"] == "upside down"]
    # and paired: Lego minus multi-vector Textual Inversion on the same images' conditions
    pairs = pd.read_csv(workdir / "results/metrics/concept_pairs.csv")
    pairs = pairs[pairs["concept"] == "upside down"]
    leak = pairs[(pairs["metric"] == "leak_subject") & (pairs["method_a"] == "lego")]
    assert list(leak["method_b"]) == ["textual_inversion_multi"]
    assert list(leak["prompts"]) == ["transfer"] and list(leak["n_pairs"]) == [16]
    # its two means are the arms' transfer means of concepts.csv, and its difference theirs
    means = split[(split["metric"] == "leak_subject")].set_index("method")["mean"]
    row = leak.iloc[0]
    assert (row["mean_a"], row["mean_b"]) == pytest.approx(
        (means["lego"], means["textual_inversion_multi"])
    )
    assert row["diff"] == pytest.approx(row["mean_a"] - row["mean_b"])
    assert not row["higher_is_better"]  # a leak: lower is better
    # a concept subject gets no attention maps (its mask would look for the carrier's class)
    assert not (workdir / "results/attention/lego").exists()


def test_attention_without_its_mask_models_is_a_load_error(tmp_path):
    """The demo has no Grounded-SAM: without its `attention.masks: judge`, the attention maps
    would need it; the start-up says so instead of a job failing at its first map."""
    workdir = copy_demo(tmp_path / "w")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    del config["attention"]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "--dry-run", check=False)
    assert result.returncode != 0
    assert "models.grounding_dino and models.sam not set, but attention maps" in result.stdout
    assert not (workdir / "results").exists()


def test_missing_hand_written_descriptions_are_a_load_error(tmp_path):
    """A manual description set without its descriptions.yaml was a bare MissingInputException;
    the start-up names the file, the subject, the sets that read it and the fix."""
    workdir = copy_demo(tmp_path / "w")
    (workdir / "subjects/blue_mug/descriptions.yaml").unlink()
    result = snakemake(workdir, "--dry-run", check=False)
    assert result.returncode != 0
    assert (
        "subjects/blue_mug/descriptions.yaml (subject blue_mug, sets case2, case4, sid) does "
        "not exist: write it" in result.stdout + result.stderr
    )


def test_hand_written_descriptions_for_a_downloaded_subject_are_a_load_error(tmp_path):
    """A downloaded subject's folder is the dataset's: no descriptions.yaml is read there, so a
    manual set on it failed in its job naming a file "None"."""
    workdir = copy_demo(tmp_path / "w")
    table = workdir / "subjects.tsv"
    table.write_text(
        table.read_text().replace("subjects/blue_mug\tlocal", "dataset/blue_mug\tmine")
    )
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["datasets"] = {
        "mine": {"downloads": [{"url": "https://example.org/m.zip", "sha256": None}]}
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "--dry-run", check=False)
    assert result.returncode != 0
    assert (
        "these subjects are downloaded: blue_mug (dataset mine; sets case2, case4, sid). Copy "
        in result.stdout + result.stderr
    )


def test_experiments_that_run_on_no_subject_are_a_load_error(tmp_path):
    """Otherwise the arms table's job would fail on an empty grid, after the references ran."""
    workdir = copy_demo(tmp_path / "w")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    for grids in config["experiments"].values():
        for grid in grids:
            grid.pop("subjects", None)
            grid["kinds"] = ["style"]  # the demo has none
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "--dry-run", check=False)
    assert result.returncode != 0
    assert "experiments: no grid runs on any subject of subjects.tsv" in result.stdout
    assert not (workdir / "results").exists()


def test_bad_reference_folder_fails_the_job_without_partial_output(tmp_path):
    workdir = copy_demo(tmp_path / "w")
    for extra in ("02", "03", "04"):
        (workdir / f"subjects/blue_mug/{extra}.png").unlink()
    result = snakemake(
        workdir, "--cores", "1", "results/references/blue_mug/manifest.csv", check=False
    )
    assert result.returncode != 0
    log = (workdir / "results/logs/prepare_references/blue_mug.log").read_text()
    assert "found 1 reference image(s) but at least 3" in log
    assert not (workdir / "results/references/blue_mug").exists() or not any(
        (workdir / "results/references/blue_mug").iterdir()
    )


def sid_from_an_api(workdir: Path, base_url: str, key_env: str) -> dict:
    """A copy of the demo cut to `blue_mug` (no hand-written descriptions, which would override
    the VLM) whose SID set an OpenAI-compatible server at `base_url` writes: its config, for the
    caller to adjust and write."""
    for description_file in (workdir / "subjects").glob("*/descriptions.yaml"):
        description_file.unlink()
    (workdir / "subjects.tsv").write_text(
        "subject\tclass\tkind\timages\tsource\tmask_backend\n"
        "blue_mug\tmug\tobject\tsubjects/blue_mug\tlocal\tprovided\n"
    )
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    api = {"backend": "openai", "model": "gpt-4o", "base_url": base_url, "api_key_env": key_env}
    config["vlms"] = {"fake": {**api, "backoff_base": 0.01}}
    config["descriptions"] = {"case1": {"case": 1}, "sid": {"case": 3, "vlm": "fake"}}
    config["experiments"] = {"main": [{"methods": ["dreambooth"], "descriptions": ["sid"]}]}
    del config["human_study"]  # its Case-1 arm is not in this grid
    return config


def test_api_key_never_reaches_any_output_or_the_report(tmp_path, monkeypatch):
    """SID through a real OpenAI-compatible server: the planted key is nowhere on disk after."""
    from test_vlm_openai import KEY_ENV, SECRET, FakeServer

    server = FakeServer(lambda body, n: ("text", "a [V] mug on a blue checkered tablecloth"))
    try:
        workdir = copy_demo(tmp_path / "w")
        config = sid_from_an_api(workdir, server.url, KEY_ENV)
        config["inference"] = {"standard": {}}
        # what the key could reach is every stage's output, not how well the arm trains
        config["methods"]["dreambooth"]["steps"] = 20
        config["sampling"].update(prompts_per_subject=2, seeds=1)
        config["attention"].update(prompt_ids=[0], seeds=[0])
        (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        monkeypatch.setenv(KEY_ENV, SECRET)
        snakemake(workdir, "--cores", "2")
        snakemake(workdir, "--report", str(workdir / "report.html"))
    finally:
        server.close()
    assert len(server.requests) == 4
    assert all(r["headers"]["authorization"] == f"Bearer {SECRET}" for r in server.requests)
    rows = list(csv.DictReader(open(workdir / "results/descriptions/sid/blue_mug.csv")))
    assert [r["source"] for r in rows] == ["vlm"] * 4
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert workdir / "report.html" in files and len(files) > 50
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []
