"""The synthetic world's models: each pretraining part's time and the job's peak memory (from the
manifest `pretrain_world` writes), the judge's accuracy on held-out real scenes and on VAE
reconstructions, and the base model's competence (background, colour, class; overall and per
asked class and colour) on prompt combinations that no pretraining scene or caption held, with
Wilson 95 % intervals, and on prompts that name a subject's whole identity (`identity_named`:
class, colour, pattern, accent and all four, "a blue mug with yellow spots on the beach"); what
limits it (`conditioning`): how far apart the frozen text encoder holds the class and colour
words, and the world CLIP's zero-shot reading of real scenes; and what survives the VAE (`vae`:
PSNR, the judge's reading of the subject's identity on real scenes against their
reconstructions, and on each demo subject's references), the ceiling of
`subject_kept`.

`--regenerate` retrains the world from scratch (the shipped settings, about 40 min on 2 cores)
and measures the same competence on the regenerated weights: each figure should fall inside the
shipped weights' interval and vice versa (`overlap` per figure); `regenerated_files` says which
files came out byte-identical.

    python benchmarks/bench_world.py [--world demo/world] [--regenerate] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("background", "colour", "class")
# Prompts naming the whole identity: 4 colour/accent pairs per class and pattern (x the seeds).
IDENTITY_PER_PATTERN = 4


def competence(world: Path, seeds: int) -> dict:
    from sidpipe.world.competence import measure_competence

    manifest = json.loads((world / "manifest.json").read_text())
    result = measure_competence(
        world / "sd",
        world / "judge",
        manifest["held_out_triples"],
        list(range(seeds)),
        identity_per_pattern=IDENTITY_PER_PATTERN,
    )
    return {k: v for k, v in result.items() if k not in ("images", "rows", "seen")}


def conditioning(world: Path, scenes: int = 1000) -> dict:
    """What limits the competence: how far apart the frozen text encoder holds the class,
    colour and pattern words (cosine at the word's token, every pair), and how well the world's
    CLIP reads each attribute of fresh real scenes zero-shot."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from sidpipe.world.competence import clip_attribute_accuracy, word_separation
    from sidpipe.world.dataset import random_scenes

    tokenizer = CLIPTokenizer.from_pretrained(world / "sd/tokenizer")
    encoder = CLIPTextModel.from_pretrained(world / "sd/text_encoder").eval()
    return {
        **word_separation(encoder, tokenizer),
        "clip_zero_shot": clip_attribute_accuracy(
            world / "clip", random_scenes(scenes, seed=4321, resolution=32)
        ),
    }


def vae(world: Path, scenes: int = 2000) -> dict:
    """What survives the world VAE (the ceiling of `subject_kept`): PSNR and the judge's reading
    of fresh real scenes against their reconstructions, and each demo subject's references."""
    from diffusers import AutoencoderKL

    from sidpipe.world.competence import references_through_vae, vae_fidelity
    from sidpipe.world.dataset import random_scenes
    from sidpipe.world.judge import load_judge

    autoencoder = AutoencoderKL.from_pretrained(world / "sd", subfolder="vae").eval()
    judge = load_judge(world / "judge")
    return {
        "scenes": vae_fidelity(autoencoder, judge, random_scenes(scenes, seed=4321, resolution=32)),
        "demo_subjects": references_through_vae(autoencoder, judge, REPO / "demo/subjects"),
    }


def parts(world: Path) -> dict:
    manifest = json.loads((world / "manifest.json").read_text())
    return {
        "seconds": manifest["seconds"],
        "peak_rss_mb": manifest["peak_rss_mb"],
        "judge_accuracy": manifest["judge_accuracy"],
        "settings": manifest["settings"],
        "code_sha256": manifest["code_sha256"],
    }


def file_digests(world: Path) -> dict[str, str]:
    """sha256 of every file of a world folder but its manifest (which records times)."""
    from sidpipe.io import sha256_file

    return {
        path.relative_to(world).as_posix(): sha256_file(path)
        for path in sorted(world.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


def bench_world(
    world: Path = REPO / "demo/world", regenerate: bool = False, seeds: int = 3
) -> dict:
    from sidpipe.models import setup_job

    setup_job(2)
    result = {"name": "world", "world": str(world), "shipped": parts(world)}
    result["shipped"]["competence"] = competence(world, seeds)
    result["shipped"]["conditioning"] = conditioning(world)
    result["shipped"]["vae"] = vae(world)
    if regenerate:
        from sidpipe.world.pretrain import pretrain_world

        shipped = json.loads((world / "manifest.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "world"
            pretrain_world(out, shipped["settings"], identifier=shipped["identifier"])
            result["regenerated"] = parts(out)
            result["regenerated"]["competence"] = competence(out, seeds)
            result["regenerated"]["conditioning"] = conditioning(out)
            result["regenerated"]["vae"] = vae(out)
            shipped_files, regenerated_files = file_digests(world), file_digests(out)
            result["regenerated_files"] = {
                "identical": sorted(
                    n for n in shipped_files if regenerated_files.get(n) == shipped_files[n]
                ),
                "differ": sorted(
                    n
                    for n in shipped_files.keys() | regenerated_files.keys()
                    if regenerated_files.get(n) != shipped_files.get(n)
                ),
            }
        overlap = {}
        for key in FIGURES:
            a = result["shipped"]["competence"][key]
            b = result["regenerated"]["competence"][key]
            overlap[key] = bool(
                a["ci95"][0] <= b["accuracy"] <= a["ci95"][1]
                or b["ci95"][0] <= a["accuracy"] <= b["ci95"][1]
            )
        result["regenerated_within_ci"] = overlap
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=Path, default=REPO / "demo/world")
    parser.add_argument("--regenerate", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "results/bench/world.json")
    args = parser.parse_args()
    result = bench_world(args.world, args.regenerate, args.seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
