"""Tests for sidpipe.metrics: metric formulas on planted embeddings, score_arm on constructed
images with the tiny random CLIP / DINO, encoder call counts, gather_metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sidpipe.io import SidpipeError, write_csv
from sidpipe.metrics import (
    FIELDS,
    Encoders,
    cosine_matrix,
    gather_metrics,
    mean_cosine,
    nsd,
    sa,
    score_arm,
    ta,
)
from sidpipe.models import build_tiny_models

CORPUS = ["a photo of sks dog", "a sks dog in the jungle", "a dog on the beach", "a red dog"]
SIZE = 64
E = np.eye(4)  # orthonormal basis: cosines between basis vectors are 0 or 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_tiny_models(tmp_path_factory.mktemp("models") / "tiny", CORPUS, seed=0)


@pytest.fixture(scope="module")
def encoders(models: dict[str, str]) -> Encoders:
    return Encoders.load(models["clip"], models["dino"], batch_size=32, device="cpu")


# --- planted embeddings --------------------------------------------------------------------


def test_cosine_matrix_and_mean_on_orthonormal_vectors() -> None:
    np.testing.assert_allclose(cosine_matrix(E[:2], E[:3]), [[1, 0, 0], [0, 1, 0]])
    # Scale must not matter: cosines normalise both sides.
    np.testing.assert_allclose(cosine_matrix(3 * E[:1], 0.5 * E[:1]), [[1.0]])
    diag = (E[0] + E[1]) / 2  # 45 degrees from e0 and e1
    np.testing.assert_allclose(mean_cosine(diag, E[:2]), [np.sqrt(0.5)])


def test_sa_is_mean_cosine_to_subject_segments() -> None:
    gen = np.stack([E[0], E[1], E[2]])
    segs = np.stack([E[0], E[0], E[1], E[3]])  # 4 references
    np.testing.assert_allclose(sa(gen, segs), [0.5, 0.25, 0.0])
    np.testing.assert_allclose(sa(E[:1], E[:1]), [1.0])


def test_nsd_is_one_minus_mean_cosine_to_backgrounds() -> None:
    gen = np.stack([E[0], E[2], E[0] + E[2]])
    bgs = np.stack([E[0], E[1]])
    expected = [1 - 0.5, 1 - 0.0, 1 - np.sqrt(0.5) / 2]
    np.testing.assert_allclose(nsd(gen, bgs), expected)
    np.testing.assert_allclose(nsd(E[:1], E[:1]), [0.0], atol=1e-12)


def test_ta_pairs_rows_and_checks_lengths() -> None:
    gen = np.stack([E[0], E[1], E[0] + E[1]])
    texts = np.stack([E[0], E[0], E[1]])
    np.testing.assert_allclose(ta(gen, texts), [1.0, 0.0, np.sqrt(0.5)])
    np.testing.assert_allclose(ta(torch.tensor(E[:2]), torch.tensor(E[:2])), [1.0, 1.0])
    with pytest.raises(SidpipeError, match="2 image embeddings but 1 text"):
        ta(E[:2], E[:1])


# --- constructed arms on disk --------------------------------------------------------------


def noise(seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def reference_set(seed: int) -> tuple[Image.Image, Image.Image, Image.Image]:
    """(reference, subject segment, non-subject segment) as segment_references makes them."""
    ref = np.asarray(noise(seed)).copy()
    ref[16:48, 20:44] = (200, 60, 40)  # the "subject"
    mask = np.zeros((SIZE, SIZE), bool)
    mask[16:48, 20:44] = True
    background = np.where(mask[..., None], 0, ref).astype(np.uint8)
    cut = np.zeros((32, 32, 3), np.uint8)
    cut[:, 4:28] = ref[16:48, 20:44]
    subject = Image.fromarray(cut).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return Image.fromarray(ref), subject, Image.fromarray(background)


PROMPTS = [
    (0, "a sks dog in the jungle", "a dog in the jungle"),
    (1, "a red sks dog", "a red dog"),
]


def make_arm(
    root: Path, generated: list[Image.Image], refs: list[tuple], prompts: list = PROMPTS
) -> tuple[Path, Path, Path]:
    """Write the references, masks and samples folders (manifests included) under `root`."""
    ref_dir, mask_dir, sample_dir = root / "refs", root / "masks", root / "samples"
    for folder in (ref_dir / "images", mask_dir / "subject", mask_dir / "non_subject", sample_dir):
        folder.mkdir(parents=True, exist_ok=True)
    ref_rows, mask_rows = [], []
    for i, (ref, subject, background) in enumerate(refs):
        image_id = f"ref{i}"
        ref.save(ref_dir / "images" / f"{image_id}.png")
        subject.save(mask_dir / "subject" / f"{image_id}.png")
        background.save(mask_dir / "non_subject" / f"{image_id}.png")
        ref_rows.append({"subject": "dog", "image_id": image_id, "path": f"images/{image_id}.png"})
        mask_rows.append(
            {
                "subject": "dog",
                "image_id": image_id,
                "subject_segment_path": f"subject/{image_id}.png",
                "non_subject_segment_path": f"non_subject/{image_id}.png",
            }
        )
    write_csv(ref_dir / "manifest.csv", ref_rows, ["subject", "image_id", "path"])
    write_csv(
        mask_dir / "manifest.csv",
        mask_rows,
        ["subject", "image_id", "subject_segment_path", "non_subject_segment_path"],
    )
    sample_rows = []
    for i, image in enumerate(generated):
        prompt_id, prompt, plain = prompts[i % len(prompts)]
        seed = i // len(prompts)
        name = f"{prompt_id:02d}_{seed:02d}.png"
        image.save(sample_dir / name)
        sample_rows.append(
            {"prompt_id": prompt_id, "prompt": prompt, "prompt_plain": plain, "seed": seed}
            | {"path": name}
        )
    write_csv(
        sample_dir / "manifest.csv",
        sample_rows,
        ["prompt_id", "prompt", "prompt_plain", "seed", "path"],
    )
    return sample_dir, mask_dir, ref_dir


def score(dirs: tuple[Path, Path, Path], models: dict[str, str], **kwargs) -> pd.DataFrame:
    kwargs.setdefault("device", "cpu")
    rows = score_arm(
        *dirs, "dog", "dreambooth", "sid", "standard", models["clip"], models["dino"], **kwargs
    )
    return pd.DataFrame(rows)


def value(df: pd.DataFrame, metric: str) -> np.ndarray:
    return df[df["metric"] == metric]["value"].to_numpy()


def test_sa_and_nsd_conventions_on_constructed_images(
    tmp_path: Path, models: dict[str, str], encoders: Encoders
) -> None:
    ref, subject, background = reference_set(0)
    # gen 0 = the subject segment, 1 = unrelated noise, 2 = the background, 3 = the reference.
    dirs = make_arm(tmp_path, [subject, noise(99), background, ref], [(ref, subject, background)])
    df = score(dirs, models, encoders=encoders)
    assert list(df.columns) == FIELDS
    assert len(df) == 4 * 5 and set(df["metric"]) == {"SA", "NSD", "TA", "CLIP-I", "DINO"}
    sa_v, nsd_v = value(df, "SA"), value(df, "NSD")
    # Identical inputs give identical embeddings, so the self-similarity is exactly 1.
    assert sa_v[0] == pytest.approx(1.0, abs=1e-5)
    assert sa_v[0] > sa_v[1]
    assert nsd_v[2] == pytest.approx(0.0, abs=1e-5)
    assert nsd_v[2] < nsd_v[1]
    assert value(df, "CLIP-I")[3] == pytest.approx(1.0, abs=1e-5)
    assert value(df, "DINO")[3] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.abs(df["value"]) <= 2.0 + 1e-6)  # cosines in [-1, 1], NSD in [0, 2]
    assert df["image"].iloc[0] == str(dirs[0] / "00_00.png")


def test_scores_match_direct_encoding(
    tmp_path: Path, models: dict[str, str], encoders: Encoders
) -> None:
    refs = [reference_set(1), reference_set(2)]
    gens = [noise(10 + i) for i in range(4)]
    df = score(make_arm(tmp_path, gens, refs), models, encoders=encoders)
    g = encoders.encode_images(gens)
    subj = encoders.encode_images([r[1] for r in refs])
    bg = encoders.encode_images([r[2] for r in refs])
    whole = encoders.encode_images([r[0] for r in refs])
    texts = encoders.encode_texts([PROMPTS[i % 2][2] for i in range(4)])
    dino_g, dino_r = encoders.encode_dino(gens), encoders.encode_dino([r[0] for r in refs])
    np.testing.assert_allclose(value(df, "SA"), (g @ subj.T).mean(1), atol=1e-5)
    np.testing.assert_allclose(value(df, "NSD"), 1 - (g @ bg.T).mean(1), atol=1e-5)
    np.testing.assert_allclose(value(df, "TA"), (g * texts).sum(1), atol=1e-5)
    np.testing.assert_allclose(value(df, "CLIP-I"), (g @ whole.T).mean(1), atol=1e-5)
    np.testing.assert_allclose(value(df, "DINO"), (dino_g @ dino_r.T).mean(1), atol=1e-5)


def test_embeddings_match_the_raw_models(models: dict[str, str], encoders: Encoders) -> None:
    """DINO: the L2-normalised CLS token of the last hidden state; CLIP: the projected pooled
    image / text features, L2-normalised."""
    from transformers import CLIPModel, ViTModel

    images, texts = [noise(50), reference_set(3)[0]], [p[2] for p in PROMPTS]
    dino = ViTModel.from_pretrained(models["dino"], add_pooling_layer=False).eval()
    clip = CLIPModel.from_pretrained(models["clip"]).eval()
    pixels = encoders.dino_processor(images=images, return_tensors="pt")["pixel_values"]
    clip_pixels = encoders.clip_processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = encoders.clip_processor(text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = dino(pixel_values=pixels).last_hidden_state[:, 0]
        image = clip.visual_projection(clip.vision_model(pixel_values=clip_pixels).pooler_output)
        text_out = clip.text_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        text = clip.text_projection(text_out.pooler_output)
    unit = torch.nn.functional.normalize
    torch.testing.assert_close(encoders.encode_dino(images), unit(cls, dim=-1))
    torch.testing.assert_close(encoders.encode_images(images), unit(image, dim=-1))
    torch.testing.assert_close(encoders.encode_texts(texts), unit(text, dim=-1))


class Spy:
    """Wraps an Encoders' methods, recording every item each one is given."""

    def __init__(self, encoders: Encoders) -> None:
        self.seen: dict[str, list] = {"encode_images": [], "encode_texts": [], "encode_dino": []}
        self.batch_size = encoders.batch_size
        for name in self.seen:
            setattr(self, name, self._wrap(name, getattr(encoders, name)))

    def _wrap(self, name: str, fn):
        def call(items):
            self.seen[name].extend(items)
            return fn(items)

        return call


def test_every_input_is_encoded_exactly_once(
    tmp_path: Path, models: dict[str, str], encoders: Encoders
) -> None:
    n_gen, refs = 6, [reference_set(i) for i in range(3)]
    dirs = make_arm(tmp_path, [noise(20 + i) for i in range(n_gen)], refs)
    spy = Spy(encoders)
    df = score(dirs, models, encoders=spy, batch_size=4)  # batches of 4 cross the 6 images
    # CLIP: generated + references + subject segments + non-subject segments, once each.
    assert len(spy.seen["encode_images"]) == n_gen + 3 * len(refs)
    assert len(spy.seen["encode_dino"]) == n_gen + len(refs)
    assert sorted(spy.seen["encode_texts"]) == sorted(p[2] for p in PROMPTS)  # distinct prompts
    # Batching does not change the scores.
    full = score(dirs, models, encoders=encoders, batch_size=32)
    np.testing.assert_allclose(df["value"], full["value"], atol=1e-5)


def test_ta_encodes_the_prompt_without_the_identifier(
    tmp_path: Path, models: dict[str, str], encoders: Encoders
) -> None:
    gens = [noise(30), noise(31)]
    spy = Spy(encoders)
    df = score(make_arm(tmp_path, gens, [reference_set(0)]), models, encoders=spy)
    assert spy.seen["encode_texts"] and all("sks" not in t for t in spy.seen["encode_texts"])
    plain = encoders.encode_texts([p[2] for p in PROMPTS])
    with_id = encoders.encode_texts([p[1] for p in PROMPTS])
    g = encoders.encode_images(gens)
    np.testing.assert_allclose(value(df, "TA"), (g * plain).sum(1), atol=1e-5)
    assert not np.allclose(value(df, "TA"), (g * with_id).sum(1), atol=1e-4)
    # The written prompt still carries the identifier (for the report).
    assert set(df["prompt"]) == {p[1] for p in PROMPTS}


def test_loads_models_by_name_and_skips_dino(tmp_path: Path, models: dict[str, str]) -> None:
    dirs = make_arm(tmp_path, [noise(40)], [reference_set(0)])
    rows = score_arm(*dirs, "dog", "svdiff", "case1", "standard", models["clip"], None, 8, "cpu")
    assert [r["metric"] for r in rows] == ["SA", "NSD", "TA", "CLIP-I"]
    assert {(r["method"], r["descriptions"], r["inference"]) for r in rows} == {
        ("svdiff", "case1", "standard")
    }


def test_errors_name_the_problem(tmp_path: Path, models: dict[str, str], encoders) -> None:
    ref = reference_set(0)
    no_plain = [(0, "a sks dog", "")]
    dirs = make_arm(tmp_path / "a", [noise(1)], [ref], prompts=no_plain)
    with pytest.raises(SidpipeError, match="prompt_plain"):
        score(dirs, models, encoders=encoders)

    dirs = make_arm(tmp_path / "b", [noise(1)], [ref])
    (dirs[0] / "00_00.png").unlink()
    with pytest.raises(SidpipeError, match="missing"):
        score(dirs, models, encoders=encoders)

    dirs = make_arm(tmp_path / "c", [noise(1)], [ref])
    other = [{"image_id": "other", "path": "x.png"}]
    write_csv(dirs[2] / "manifest.csv", other, ["image_id", "path"])
    with pytest.raises(SidpipeError, match="image ids"):
        score(dirs, models, encoders=encoders)

    with pytest.raises(SidpipeError, match="does not exist"):
        score((tmp_path / "none", dirs[1], dirs[2]), models, encoders=encoders)


def test_manifests_of_another_subject_are_refused(
    tmp_path: Path, models: dict[str, str], encoders: Encoders
) -> None:
    """Masks or references made for another subject must not be scored as this one's."""
    for i, (name, columns) in enumerate(
        [
            ("masks", ["subject", "image_id", "subject_segment_path", "non_subject_segment_path"]),
            ("refs", ["subject", "image_id", "path"]),
        ]
    ):
        dirs = make_arm(tmp_path / str(i), [noise(1)], [reference_set(0)])
        manifest = tmp_path / str(i) / name / "manifest.csv"
        rows = pd.read_csv(manifest).assign(subject="cat").to_dict("records")
        write_csv(manifest, rows, columns)
        with pytest.raises(SidpipeError, match=f"{name}/manifest.csv belongs to subject.s. cat,"):
            score(dirs, models, encoders=encoders)


def test_gather_metrics(tmp_path: Path) -> None:
    def rows(method: str, n: int) -> list[dict]:
        return [
            {"subject": "dog", "method": method, "descriptions": "sid", "inference": "standard"}
            | {"prompt_id": i, "prompt": "a sks dog", "seed": 0, "image": f"{i}.png"}
            | {"metric": "SA", "value": 0.5 + i / 10}
            for i in range(n)
        ]

    write_csv(tmp_path / "a.csv", rows("dreambooth", 2), FIELDS)
    write_csv(tmp_path / "b.csv", rows("svdiff", 3), FIELDS)
    out = tmp_path / "metrics" / "all.csv"
    table = gather_metrics([tmp_path / "a.csv", tmp_path / "b.csv"], out)
    back = pd.read_csv(out)
    assert list(back.columns) == FIELDS and len(back) == len(table) == 5
    assert back.groupby("method").size().to_dict() == {"dreambooth": 2, "svdiff": 3}
    with pytest.raises(SidpipeError, match="passed twice"):
        gather_metrics([tmp_path / "a.csv", tmp_path / "a.csv"], out)
    gather_metrics([], tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text().strip() == ",".join(FIELDS)


def test_the_gather_job_loads_no_torch(tmp_path: Path) -> None:
    """gather_metrics only concatenates CSVs: its job, run as the adapter imports it in a fresh
    interpreter, must not pay for torch (~5 s a job)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    adapter = (repo / "workflow_scripts/gather_metrics.py").read_text()
    imports = "\n".join(line for line in adapter.splitlines() if line.startswith("from "))
    write_csv(tmp_path / "a.csv", [dict.fromkeys(FIELDS, 0)], FIELDS)
    source, out = str(tmp_path / "a.csv"), str(tmp_path / "all.csv")
    script = (
        f"import sys\n{imports}\n"
        f"gather_metrics([Path({source!r})], Path({out!r}))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "all.csv").is_file()


def test_a_reference_subset_method_is_scored_against_its_subset(
    tmp_path: Path, models: dict[str, str], encoders: Encoders
) -> None:
    """`dreambooth--first1` (a single-reference arm): SA, NSD, CLIP-I and DINO against the
    first reference only, equal to a folder holding just that reference."""
    refs = [reference_set(3), reference_set(4), reference_set(5)]
    gens = [noise(30 + i) for i in range(4)]
    dirs = make_arm(tmp_path / "all", gens, refs)
    subset = pd.DataFrame(
        score_arm(
            *dirs,
            "dog",
            "dreambooth--first1",
            "sid",
            "standard",
            models["clip"],
            models["dino"],
            device="cpu",
            encoders=encoders,
        )
    )
    alone = score(make_arm(tmp_path / "one", gens, refs[:1]), models, encoders=encoders)
    full = score(dirs, models, encoders=encoders)
    for metric in ("SA", "NSD", "CLIP-I", "DINO", "TA"):
        np.testing.assert_allclose(value(subset, metric), value(alone, metric), atol=1e-6)
    # (the constructed subject segments are alike; the whole references and backgrounds not)
    assert not np.allclose(value(subset, "CLIP-I"), value(full, "CLIP-I"), atol=1e-4)
    assert not np.allclose(value(subset, "NSD"), value(full, "NSD"), atol=1e-4)
    assert set(subset["method"]) == {"dreambooth--first1"}
    # an explicit subset naming an image the subject lacks: a clear error
    with pytest.raises(SidpipeError, match="ref9.*not one of its images"):
        score(dirs, models, encoders=encoders, reference_subset="ref9")
