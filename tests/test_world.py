"""The synthetic world: scene grammar, drawing, captions, prompt reading, subjects, the judge's
reading and the ground-truth measures (sidpipe.world), and the proxy/truth agreement."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from sidpipe.agreement import agreement, spearman
from sidpipe.descriptions.text import check_description
from sidpipe.world.captions import describe, pretraining_caption, pretraining_caption_naming
from sidpipe.world.draw import render
from sidpipe.world.grammar import (
    BACKGROUND_NAMES,
    COLOURS,
    HAT_CLASSES,
    PATTERNS,
    SUBJECT_CLASSES,
    Element,
    Scene,
    Subject,
    held_out_triples,
    sample_scene,
)
from sidpipe.world.measures import image_measures, prompt_class, read_truth
from sidpipe.world.prompts import read_prompt
from sidpipe.world.subjects import (
    CONCEPT_SUBJECTS,
    DEMO_SUBJECTS,
    subjects_table,
    write_subject,
)

MUG = Scene(
    Subject("mug", "blue", "spotted", "yellow"),
    "tablecloth",
    (Element("plant", "orange", "small", "left"),),
)


def test_scenes_are_a_pure_function_of_the_seed():
    a = [sample_scene(np.random.default_rng(5)) for _ in range(3)]
    b = [sample_scene(np.random.default_rng(5)) for _ in range(3)]
    assert a == b
    image_a, mask_a = render(a[0], 32, seed=1)
    image_b, mask_b = render(b[0], 32, seed=1)
    assert image_a.tobytes() == image_b.tobytes() and mask_a.tobytes() == mask_b.tobytes()


def test_held_out_triples_are_never_drawn():
    held_out = held_out_triples(0, 0.2)
    assert len(held_out) == round(0.2 * len(SUBJECT_CLASSES) * len(COLOURS) * len(BACKGROUND_NAMES))
    rng = np.random.default_rng(0)
    drawn = {
        (s.subject.cls, s.subject.colour, s.background)
        for s in (sample_scene(rng, held_out=held_out) for _ in range(3000))
    }
    assert not drawn & held_out
    # Every pair of a held-out triple still occurs: the test set is compositional.
    cls, colour, background = sorted(held_out)[0]
    assert any(d[0] == cls and d[1] == colour for d in drawn)
    assert any(d[0] == cls and d[2] == background for d in drawn)


def test_render_paints_the_subject_where_its_mask_is():
    image, mask = render(MUG, 32, seed=0)
    pixels = np.asarray(image).astype(int)
    inside = np.asarray(mask) > 127
    assert image.size == mask.size == (32, 32)
    assert 0.03 < inside.mean() < 0.4
    colours = [COLOURS["blue"], COLOURS["yellow"]]
    near = [np.abs(pixels - np.array(c)).sum(-1) < 60 for c in colours]
    # The subject's body and spots are inside its mask (edges blend at 32 px), not outside it.
    assert near[0][inside].mean() > 0.3 and near[1][inside].mean() > 0.05
    assert near[0][~inside].mean() < 0.01
    # Upside down flips the subject, not the background.
    flipped, flipped_mask = render(
        MUG.with_(subject=Subject("mug", "blue", "spotted", "yellow", upside_down=True)), 32, seed=0
    )
    assert np.abs(np.asarray(flipped_mask, float) - np.asarray(mask, float)[::-1]).mean() > 0
    assert (np.asarray(flipped)[:4] == pixels[:4]).all()


def test_descriptions_follow_the_four_cases():
    cases = {c: describe(MUG, c) for c in (1, 2, 3, 4)}
    assert cases[1] == "a [V] mug"
    assert cases[2] == "a [V] mug on a tablecloth, with a plant"
    assert cases[3] == (
        "a [V] mug on a red and white checkered tablecloth, with a small potted "
        "plant in an orange pot on its left"
    )
    assert cases[4].startswith("a blue [V] mug with yellow spots on a red and white checkered")
    for text in cases.values():  # the descriptions stage's own rule: [V] once, before the class
        assert check_description(text, "mug") == (text, None), text
    # Only Case 4 describes the subject itself.
    assert "blue" not in cases[3] and "spots" not in cases[3]


def test_pretraining_captions_mix_levels_and_never_use_the_identifier():
    rng = np.random.default_rng(0)
    captions = [pretraining_caption(MUG, rng) for _ in range(400)]
    assert any(c.startswith("a mug") for c in captions)
    assert any("with yellow spots" in c for c in captions)
    assert any("checkered tablecloth" in c for c in captions)
    assert any("tablecloth" not in c for c in captions)
    assert any("on a tablecloth" in c for c in captions)
    assert not any("[V]" in c or "sks" in c for c in captions)


def test_pretraining_captions_say_which_attributes_they_name():
    """The text tower's attribute targets: what the caption's words name, and the same caption
    (the same draws) as `pretraining_caption`."""
    from sidpipe.world.dataset import render_scenes
    from sidpipe.world.trainers import _text_attribute_targets

    upside_down = Scene(Subject("dog", "red", "striped", "white", upside_down=True), "snow", ())
    for scene in (MUG, upside_down):
        for seed in range(300):
            text, named = pretraining_caption_naming(scene, np.random.default_rng(seed))
            assert text == pretraining_caption(scene, np.random.default_rng(seed))
            subject = scene.subject
            assert ("colour" in named) == (f"{subject.colour} {subject.cls}" in text), text
            pattern_words = {"spotted": "spots", "striped": "stripes"}[subject.pattern]
            assert ("pattern" in named) == (f"{subject.accent} {pattern_words}" in text), text
            assert ("pattern" in named) == ("accent" in named)
            phrases = ("tablecloth", "table") if scene is MUG else ("snow",)
            assert ("background" in named) == any(w in text for w in phrases), text
    labels = render_scenes([MUG, upside_down], resolution=32, seed=0).labels
    targets = _text_attribute_targets(labels, [frozenset({"class", "pattern"}), frozenset()])
    assert targets["pattern"].tolist() == [PATTERNS.index("spotted"), -1]
    assert targets["class"].tolist() == [SUBJECT_CLASSES.index("mug"), -1]
    assert targets["colour"].tolist() == targets["background"].tolist() == [-1, -1]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a mug in the jungle", {"background": "jungle", "colour": None}),
        ("a red mug", {"background": None, "colour": "red"}),
        ("a dog wearing a red hat", {"hat": "red", "colour": None}),
        ("a wearing a red hat dog", {"hat": "red", "colour": None}),
        ("a red sks dog", {"colour": "red"}),
        ("a mug with a city in the background", {"background": "city"}),
        ("a upside down mug", {"upside_down": True}),
        ("a mug with a plant", {"elements": ["plant"]}),
    ],
)
def test_read_prompt(prompt, expected):
    cls = prompt.split()[-1] if prompt.split()[-1] in SUBJECT_CLASSES else None
    read = read_prompt(prompt, cls or next(c for c in SUBJECT_CLASSES if c in prompt))
    for key, value in expected.items():
        assert read[key] == value


def test_world_prompt_file_is_read_by_the_world(tmp_path):
    prompts = yaml.safe_load(open("demo/prompts.yaml"))
    assert set(prompts) == {"object", "live", "concept", "concepts"}
    assert set(prompts["concepts"]) == {"wearing a red hat"}  # a concept's own list
    lists = [(kind, prompts[kind]) for kind in ("object", "live", "concept")]
    lists.append(("wearing a red hat", prompts["concepts"]["wearing a red hat"]))
    for kind, templates in lists:
        # the bare prompt first: everything unasked leaks (the hat's names a class with a head)
        assert templates[0] == (
            "a {token} dog" if kind == "wearing a red hat" else "a {token} {class}"
        )
        # a concept's prompts are read with its words for the token: the concept is asked
        token = {"concept": "upside down", "wearing a red hat": kind}.get(kind, "sks")
        for template in templates[1:]:
            read = read_prompt(template.format(token=token, **{"class": "dog"}), "dog")
            asked = read["background"] or read["colour"] or read["hat"] or read["upside_down"]
            assert asked and read["upside_down"] == (kind == "concept"), template
            assert (read["hat"] == "red") == (kind == "wearing a red hat") or kind == "live"
    # the world draws a hat only on the classes with a head: the hat is carried to those
    hat_classes = {
        prompt_class(t.format(token="wearing a red hat", **{"class": "dog"})) for t in lists[-1][1]
    }
    assert hat_classes == set(HAT_CLASSES)


def test_subject_folder_holds_images_masks_descriptions_and_truth(tmp_path):
    spec = DEMO_SUBJECTS[0]
    folder = write_subject(spec, tmp_path / spec.name)
    again = write_subject(spec, tmp_path / "again")
    images = sorted(folder.glob("0?.png"))
    assert len(images) == 4 and all((folder / f"{p.stem}.mask.png").is_file() for p in images)
    for image in images:  # byte-reproducible
        assert image.read_bytes() == (again / image.name).read_bytes()
    descriptions = yaml.safe_load((folder / "descriptions.yaml").read_text())
    assert set(descriptions) == {p.stem for p in images}
    truth = read_truth(folder / "truth.json")
    assert truth["backgrounds"] == ["tablecloth"] and truth["elements"] == ["plant"]
    assert truth["identity"]["pattern"] == "spotted" and not truth["upside_down"]
    table = subjects_table(DEMO_SUBJECTS, "subjects").splitlines()
    assert table[0].split("\t")[-2:] == ["bias", "concept"]
    assert len(table) == len(DEMO_SUBJECTS) + 1
    assert all(row.endswith("\t") for row in table[1:])  # no concept: an ordinary subject


def test_concept_subjects_carry_their_concept_in_every_view(tmp_path):
    """Lego's subjects: kind concept, the concept in the table and in all 4 views on 4
    backgrounds (what the views share is the carrier and the concept), no other elements; the
    hat is drawn mostly outside the subject's mask (where Lego's subject separation sends a
    concept; its brim covers the top of the head)."""
    for spec in CONCEPT_SUBJECTS:
        folder = write_subject(spec, tmp_path / spec.name)
        truth = read_truth(folder / "truth.json")
        views = json.loads((folder / "truth.json").read_text())["views"].values()
        if spec.concept == "upside down":
            assert truth["upside_down"]
        else:
            assert spec.concept == "wearing a red hat" and not truth["upside_down"]
            assert {v["subject"]["hat"] for v in views} == {"red"}
            # the hat's pixels: where the drawing with the hat differs from the one without
            scene = Scene.from_truth(next(iter(views)))
            with_hat = np.asarray(render(scene, 32, seed=1)[0], dtype=int)
            bare = scene.with_(subject=replace(scene.subject, hat=None))
            hat = np.abs(with_hat - np.asarray(render(bare, 32, seed=1)[0], dtype=int)).sum(-1)
            mask = np.asarray(render(scene, 32, seed=1)[1]) > 127
            drawn = hat > 30
            assert drawn.sum() >= 10 and (drawn & ~mask).sum() >= 2 / 3 * drawn.sum()
        assert len(truth["backgrounds"]) == 4
        assert truth["elements"] == [] and truth["identity"]["pattern"] != "plain"
    rows = [r.split("\t") for r in subjects_table(CONCEPT_SUBJECTS, "s").splitlines()[1:]]
    assert {(r[2], r[-1]) for r in rows} == {
        ("concept", "upside down"),
        ("concept", "wearing a red hat"),
    }
    for concept in ("upside down", "wearing a red hat"):  # carriers of different classes
        carriers = [r[1] for r in rows if r[-1] == concept]
        assert len(carriers) == 2 and len(set(carriers)) == 2


def _seen(**overrides):
    seen = {
        "background": "jungle",
        "class": "mug",
        "colour": "blue",
        "pattern": "spotted",
        "accent": "yellow",
        "hat": 0.0,
        "upside_down": 0.0,
    }
    seen |= {k: 0.0 for k in ("plant", "box", "frisbee", "book", "fence", "balloon")}
    return seen | overrides


TRUTH = {
    "identity": {"class": "mug", "colour": "blue", "pattern": "spotted", "accent": "yellow"},
    "backgrounds": ["tablecloth"],
    "elements": ["plant"],
    "upside_down": False,
}


def test_measures_of_a_faithful_image():
    out = image_measures(_seen(), "a mug in the jungle", TRUTH)
    kept = dict.fromkeys(("kept_class", "kept_colour", "kept_pattern", "kept_accent"), 1.0)
    assert out == {
        "leak_background": 0.0,
        "leak_object": 0.0,
        "subject_kept": 1.0,
        **kept,
        "prompt_followed": 1.0,
    }


def test_measures_of_leaks_and_lost_identity():
    out = image_measures(
        _seen(background="tablecloth", plant=0.9, accent="red"), "a mug in the jungle", TRUTH
    )
    # Only the accent is lost: subject_kept fails, and its parts say which part.
    assert out == {
        "leak_background": 1.0,
        "leak_object": 1.0,
        "subject_kept": 0.0,
        "kept_class": 1.0,
        "kept_colour": 1.0,
        "kept_pattern": 1.0,
        "kept_accent": 0.0,
        "prompt_followed": 0.0,
    }
    # The bare prompt asks for nothing else: no prompt_followed; the references' background leaks.
    bare = image_measures(_seen(background="tablecloth"), "a mug", TRUTH)
    assert bare["leak_background"] == 1.0 and "prompt_followed" not in bare


def test_recolour_prompt_keeps_the_subject_by_its_pattern():
    out = image_measures(_seen(colour="red"), "a red mug", TRUTH)
    assert out["subject_kept"] == 1.0 and out["prompt_followed"] == 1.0
    assert "kept_colour" not in out  # the prompt asked for another colour
    recoloured = image_measures(_seen(colour="red"), "a mug", TRUTH)
    assert recoloured["subject_kept"] == 0.0 and recoloured["kept_colour"] == 0.0
    assert recoloured["kept_pattern"] == 1.0


def test_a_plain_subject_has_no_accent_to_keep():
    plain = {**TRUTH, "identity": {**TRUTH["identity"], "pattern": "plain", "accent": None}}
    out = image_measures(_seen(pattern="plain", accent="green"), "a mug", plain)
    assert "kept_accent" not in out and out["subject_kept"] == 1.0
    assert image_measures(_seen(accent="green"), "a mug", plain)["kept_pattern"] == 0.0


def test_a_transfer_prompt_of_a_concept_subject_does_not_ask_for_the_subject():
    """ "an upside down dog" for a mug carrying the concept: the mug is not asked for, so
    subject_kept is undefined, while the concept is (prompt_followed)."""
    out = image_measures(_seen(upside_down=0.9), "an upside down dog", TRUTH)
    assert "subject_kept" not in out and out["prompt_followed"] == 1.0
    assert not {"kept_class", "kept_pattern"} & set(out)
    carrier = image_measures(_seen(upside_down=0.9), "an upside down mug", TRUTH)
    assert carrier["subject_kept"] == 1.0 and carrier["prompt_followed"] == 1.0
    assert "leak_subject" not in carrier  # the carrier is asked for: not a leak
    assert "subject_kept" in image_measures(_seen(), "a mugshot of a mug", TRUTH)


def test_the_carrier_leaks_into_a_transfer_prompt_by_its_class_or_colour():
    """Lego's subject leak: on "an upside down dog" for a blue mug carrier, the judge seeing a
    mug, or a blue body when the prompt asks no colour, is the carrier leaking."""
    dog = {"class": "dog", "colour": "green"}
    assert image_measures(_seen(**dog), "an upside down dog", TRUTH)["leak_subject"] == 0.0
    assert image_measures(_seen(colour="green"), "an upside down dog", TRUTH)["leak_subject"] == 1
    blue_dog = _seen(**{**dog, "colour": "blue"})
    assert image_measures(blue_dog, "an upside down dog", TRUTH)["leak_subject"] == 1.0
    # asked for blue, a blue dog is the prompt followed, not the carrier leaking
    assert image_measures(blue_dog, "an upside down blue dog", TRUTH)["leak_subject"] == 0.0
    # a colour asked for another thing in the prompt does not excuse the drawn class's colour
    both = "an upside down dog next to a red ball"
    assert prompt_class(both) == "dog" and prompt_class("a sks") is None
    assert image_measures(blue_dog, both, TRUTH)["leak_subject"] == 1.0


def test_pose_leak_only_for_upside_down_references():
    truth = {**TRUTH, "upside_down": True}
    assert image_measures(_seen(upside_down=0.9), "a mug", truth)["leak_pose"] == 1.0
    assert "leak_pose" not in image_measures(_seen(upside_down=0.9), "a mug", TRUTH)
    assert "leak_pose" not in image_measures(_seen(upside_down=0.9), "an upside down mug", truth)


def test_spearman_matches_a_hand_computation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties get average ranks: x ranks 1, 2.5, 2.5, 4; y ranks 1..4 -> rho = 0.9487
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.948683, abs=1e-6)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_agreement_finds_a_proxy_that_tracks_the_truth():
    rows = []
    rng = np.random.default_rng(0)
    for arm in ("case1", "sid"):
        for subject in ("a", "b", "c"):
            for prompt in range(6):
                leak = float(rng.random() < (0.7 if arm == "case1" else 0.2))
                base = {
                    "method": "dreambooth",
                    "descriptions": arm,
                    "inference": "standard",
                    "subject": subject,
                    "prompt_id": prompt,
                    "seed": 0,
                }
                rows.append(base | {"metric": "leak_background", "value": leak})
                rows.append(
                    base | {"metric": "NSD", "value": 0.5 - 0.2 * leak + rng.normal(0, 0.01)}
                )
                rows.append(base | {"metric": "SA", "value": rng.random()})
    table = agreement(pd.DataFrame(rows), n_boot=50)
    nsd = table[(table.proxy == "NSD") & (table.truth == "leak_background")]
    images = nsd[nsd.level == "images"].iloc[0]
    assert images.spearman < -0.8 and images.ci_high < 0 and images.expected_sign == -1
    assert nsd[nsd.level == "arms"].iloc[0].n == 2
    sa = table[(table.proxy == "SA") & (table.level == "images")].iloc[0]
    assert abs(sa.spearman) < 0.5
    assert agreement(pd.DataFrame(rows)[lambda d: d.metric != "leak_background"]).empty


def test_identity_metrics_follow_the_paper_proxies_and_leave_their_intervals():
    """CLIP-I and DINO join the agreement after SA / NSD / TA: a table with them gives the
    paper's rows (and their bootstrap intervals) exactly as a table without them, and a
    whole-image metric that rises with the leak is reported with that sign."""
    rng = np.random.default_rng(1)
    rows = []
    for subject in ("a", "b", "c", "d"):
        for prompt in range(8):
            leak, kept = float(prompt % 2), float(rng.random() < 0.5)
            key = {"method": "dreambooth", "descriptions": "case1", "inference": "standard"}
            key |= {"subject": subject, "prompt_id": prompt, "seed": 0}
            values = {
                "leak_background": leak,
                "subject_kept": kept,
                "SA": 0.2 * kept + rng.normal(0, 0.05),
                "NSD": 0.5 - 0.2 * leak + rng.normal(0, 0.05),
                "CLIP-I": 0.6 + 0.2 * leak + rng.normal(0, 0.05),
                "DINO": 0.4 + 0.1 * kept + rng.normal(0, 0.05),
            }
            rows += [key | {"metric": m, "value": v} for m, v in values.items()]
    full = pd.DataFrame(rows)
    table = agreement(full, n_boot=30)
    paper = agreement(full[~full.metric.isin(["CLIP-I", "DINO"])], n_boot=30)
    assert len(paper) == 8 and len(table) == 16
    pd.testing.assert_frame_equal(table.iloc[: len(paper)], paper)
    assert set(table.iloc[len(paper) :].proxy) == {"CLIP-I", "DINO"}
    images = table[table.level == "images"].set_index(["proxy", "truth"])
    assert images.loc[("CLIP-I", "leak_background")].spearman > 0.8
    assert images.loc[("CLIP-I", "leak_background")].expected_sign == 0
    assert images.loc[("DINO", "subject_kept")].spearman > 0.5
    assert images.loc[("DINO", "subject_kept")].expected_sign == 1


def test_sa_should_rise_with_the_carrier_leaking_into_a_concept():
    """On a concept's transfer prompts SA is the carrier's look in the image: a faithful SA
    rises with leak_subject (the cell the agreement plot outlines)."""
    rows = [
        {"method": "lego", "descriptions": "case1", "inference": "standard", "subject": s}
        | {"prompt_id": p, "seed": 0, "metric": metric, "value": value}
        for s in ("dog", "car")
        for p in range(4)
        for metric, value in (("leak_subject", float(p % 2)), ("SA", 0.1 + 0.3 * (p % 2)))
    ]
    table = agreement(pd.DataFrame(rows), n_boot=20)
    cell = table[(table.proxy == "SA") & (table.truth == "leak_subject")]
    assert list(cell.expected_sign) == [1, 1] and cell.iloc[0].spearman > 0.9


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory, one_thread):
    """pretrain_world end to end with a few steps per part: the machinery, not the quality."""
    from sidpipe.world.pretrain import pretrain_world

    out = tmp_path_factory.mktemp("world") / "models"
    steps = {"steps": 2, "batch_size": 8}
    settings = {"scenes": 120, "eval_scenes": 40, "threads": 1}
    settings |= {part: dict(steps) for part in ("vae", "clip", "judge", "dino", "unet")}
    manifest = pretrain_world(out, settings)
    return out, manifest


def test_pretrain_world_writes_the_real_layouts(tiny_world):
    from sidpipe.models import load_clip, load_dino, load_sd_pipeline
    from sidpipe.world.judge import load_judge, read_images

    out, manifest = tiny_world
    assert set(manifest["seconds"]) >= {"vae", "clip", "judge", "dino", "unet", "total"}
    assert manifest["code_sha256"] and manifest["settings"]["scenes"] == 120
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["judge_accuracy"] == manifest["judge_accuracy"]
    pipe = load_sd_pipeline(str(out / "sd"), "float32", "cpu")
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    image = pipe(
        "a red mug on the beach",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)
    # SD's text encoder is the CLIP's text tower: the same token states.
    clip, processor = load_clip(str(out / "clip"), "cpu")
    ids = processor(text=["a red mug"], return_tensors="pt").input_ids
    with torch.no_grad():
        a = clip.text_model(ids).last_hidden_state
        b = pipe.text_encoder(ids).last_hidden_state
    assert torch.equal(a, b)
    assert "sks" in pipe.tokenizer.get_vocab() or len(pipe.tokenizer("sks").input_ids) <= 4
    dino, dino_processor = load_dino(str(out / "dino"), "cpu")
    pixels = dino_processor(images=[image], return_tensors="pt").pixel_values
    assert dino(pixel_values=pixels).last_hidden_state.shape[-1] == 64
    seen = read_images(load_judge(out / "judge"), [image])[0]
    assert seen["background"] in BACKGROUND_NAMES and seen["mask"].shape == (32, 32)
    assert 0 <= seen["plant"] <= 1


def test_pretrain_world_refuses_unknown_settings(tmp_path):
    from sidpipe.io import SidpipeError
    from sidpipe.world.pretrain import merged_settings

    with pytest.raises(SidpipeError, match="unknown unet setting"):
        merged_settings({"unet": {"stepz": 3}})
    with pytest.raises(SidpipeError, match="unknown setting 'scene'"):
        merged_settings({"scene": 3})
    assert merged_settings({"unet": {"steps": 7}})["unet"]["batch_size"] == 64


# --- the shipped world (demo/world, written by `make world`) ----------------------------------

SHIPPED = Path(__file__).resolve().parents[1] / "demo/world"


def test_shipped_world_was_made_by_this_code_with_the_demo_settings():
    """Editing the scene grammar, captions, architectures or training without `make world`
    leaves the shipped weights stale: this says so."""
    from sidpipe.world.pretrain import code_digest, merged_settings

    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    demo = yaml.safe_load((SHIPPED.parent / "config.yaml").read_text())
    assert manifest["code_sha256"] == code_digest(), "run `make world` (the code changed)"
    assert manifest["settings"] == merged_settings(demo["world"]), "run `make world`"
    for path in SHIPPED.rglob("*"):
        assert path.stat().st_size < 5 * 2**20, path  # the repository holds each file


@pytest.mark.usefixtures("one_thread")
def test_shipped_judge_reads_fresh_held_out_scenes():
    """At least 95 % per head on scenes it never saw (the other seed, held-out combinations
    included), and its subject masks (the attention maps' masks) match the true ones."""
    from sidpipe.attention import judged_subject_mask
    from sidpipe.world.dataset import random_scenes
    from sidpipe.world.judge import load_judge
    from sidpipe.world.pretrain import judge_accuracy

    data = random_scenes(300, seed=12345, resolution=32)
    with torch.no_grad():
        accuracy = judge_accuracy(load_judge(SHIPPED / "judge"), data)
    for head in ("background", "class", "colour", "pattern"):
        assert accuracy[head] >= 0.95, (head, accuracy)
    scenes = [sample_scene(np.random.default_rng(7 + i)) for i in range(40)]
    drawn = [render(scene, 32, seed=i) for i, scene in enumerate(scenes)]
    masks = judged_subject_mask([image for image, _ in drawn], str(SHIPPED / "judge"))
    ious = []
    for found, (_, truth) in zip(masks, drawn, strict=True):
        truth = np.asarray(truth) > 127
        found = np.zeros_like(truth) if found is None else found
        ious.append((found & truth).sum() / max((found | truth).sum(), 1))
    assert np.mean(ious) > 0.6


def test_demo_subjects_are_drawn_by_the_world(tmp_path):
    """demo/subjects is exactly what `make world-subjects` draws (byte-reproducible)."""
    from sidpipe.world.subjects import main

    main([str(tmp_path / "subjects"), "--table", str(tmp_path / "subjects.tsv")])
    demo = SHIPPED.parent
    assert (tmp_path / "subjects.tsv").read_bytes() == (demo / "subjects.tsv").read_bytes()
    drawn = sorted(p.relative_to(tmp_path) for p in (tmp_path / "subjects").rglob("*"))
    shipped = sorted(p.relative_to(demo) for p in (demo / "subjects").rglob("*"))
    assert drawn == shipped
    for path in drawn:
        if (tmp_path / path).is_file():
            assert (tmp_path / path).read_bytes() == (demo / path).read_bytes(), path


# --- what limits the base model's competence ---------------------------------------------------


def test_competence_prompts_write_the_colour_s_article_as_the_captions_do():
    from sidpipe.world.captions import pretraining_caption
    from sidpipe.world.competence import competence_prompts

    rows = competence_prompts([("ball", "orange", "beach"), ("mug", "red", "snow")], [0, 1])
    assert [r["prompt"] for r in rows[::2]] == [
        "an orange ball on the beach",
        "a red mug in the snow",
    ]
    assert [r["seed"] for r in rows] == [0, 1, 0, 1]
    # the captions the base model learned from say "an orange ..." too
    scene = Scene(Subject("ball", "orange", "plain", None), "beach")
    captions = {pretraining_caption(scene, np.random.default_rng(i)) for i in range(40)}
    assert any("an orange ball" in c for c in captions)
    assert not any("a orange" in c for c in captions)


def test_identity_prompts_name_every_class_and_pattern_as_the_captions_do():
    from sidpipe.world.captions import subject_details
    from sidpipe.world.competence import identity_prompts
    from sidpipe.world.grammar import PATTERNS, SUBJECT_CLASSES
    from sidpipe.world.prompts import read_prompt

    rows = identity_prompts(2, [0, 1], seed=3)
    assert len(rows) == len(SUBJECT_CLASSES) * 3 * 2 * 2
    assert {(r["class"], r["pattern"]) for r in rows} == {
        (c, p) for c in SUBJECT_CLASSES for p in PATTERNS[1:]
    }
    assert [r["seed"] for r in rows[:4]] == [0, 1, 0, 1]
    assert rows == identity_prompts(2, [0, 1], seed=3)
    assert rows != identity_prompts(2, [0, 1], seed=4)
    for row in rows:
        assert row["accent"] != row["colour"]
        before, after = subject_details(
            Subject(row["class"], row["colour"], row["pattern"], row["accent"])
        )
        assert f"{before} {row['class']} {after} " in row["prompt"]
        asked = read_prompt(row["prompt"], row["class"])
        assert asked["colour"] == row["colour"] and asked["background"] is not None
    spotted = next(r for r in rows if r["pattern"] == "spotted")
    assert f"{spotted['class']} with {spotted['accent']} spots " in spotted["prompt"]


def test_identity_accuracy_needs_all_four_heads_right():
    from sidpipe.world.competence import identity_accuracy

    asked = {"class": "mug", "colour": "blue", "pattern": "spotted", "accent": "yellow"}
    seen = [
        dict(asked),
        asked | {"pattern": "plain"},
        asked | {"accent": "red", "colour": "red"},
        asked | {"class": "ball"},
    ]
    result = identity_accuracy([asked] * 4, seen)
    assert result["samples"] == 4
    assert result["all_four"]["accuracy"] == 0.25
    assert [result[h]["accuracy"] for h in ("class", "colour", "pattern", "accent")] == [
        0.75,
        0.75,
        0.75,
        0.75,
    ]
    assert result["pattern_by_pattern"]["spotted"]["read_as"] == {"spotted": 3, "plain": 1}


def test_competence_by_value_counts_each_asked_value_and_what_it_was_read_as():
    from sidpipe.world.competence import accuracy_by_value

    rows = [{"class": c} for c in ("ball", "ball", "ball", "mug")]
    seen = [{"class": c} for c in ("mug", "ball", "mug", "mug")]
    by_class = accuracy_by_value(rows, seen, "class")
    assert by_class["ball"]["accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    assert by_class["ball"]["n"] == 3 and by_class["ball"]["read_as"] == {"mug": 2, "ball": 1}
    assert by_class["mug"]["accuracy"] == 1.0 and by_class["mug"]["read_as"] == {"mug": 1}


def test_word_similarity_reads_the_word_s_own_token_state():
    """Two words given the same embedding reach the UNet as the same condition (cosine 1); the
    other pairs' cosines are those of the hidden states at the word's position, by hand."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from sidpipe.world.competence import word_similarity

    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED / "sd/tokenizer")
    encoder = CLIPTextModel.from_pretrained(SHIPPED / "sd/text_encoder").eval()
    template = "a red {} on the grass"
    words = ["mug", "ball", "lamp"]
    before = word_similarity(encoder, tokenizer, words, template)
    ids = tokenizer([template.format(w) for w in words], return_tensors="pt").input_ids
    with torch.no_grad():
        states = encoder(ids).last_hidden_state[:, 3]  # [BOS, a, red, word, ...]
    by_hand = torch.nn.functional.cosine_similarity(states[0], states[2], dim=0)
    pair = next(p for p in before["pairs"] if {p["a"], p["b"]} == {"mug", "lamp"})
    assert pair["cosine"] == pytest.approx(float(by_hand), abs=1e-4)
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[tokenizer.convert_tokens_to_ids("ball</w>")] = table[
            tokenizer.convert_tokens_to_ids("mug</w>")
        ]
    after = word_similarity(encoder, tokenizer, words, template)
    assert {after["max"]["a"], after["max"]["b"]} == {"mug", "ball"}
    assert after["max"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert before["max"]["cosine"] < 0.999
    # a word of two tokens ("an orange"): its last token's state
    two = word_similarity(encoder, tokenizer, ["an orange", "a yellow"], "{} dog on the grass")
    ids = tokenizer(
        ["an orange dog on the grass", "a yellow dog on the grass"], return_tensors="pt"
    )
    with torch.no_grad():
        states = encoder(ids.input_ids).last_hidden_state[:, 2]  # [BOS, an/a, colour, ...]
    by_hand = torch.nn.functional.cosine_similarity(states[0], states[1], dim=0)
    assert two["max"]["cosine"] == pytest.approx(float(by_hand), abs=1e-4)


def test_zero_shot_accuracy_picks_among_each_image_s_own_candidates():
    from sidpipe.world.competence import zero_shot_accuracy

    text = torch.eye(4)
    image = torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    candidates = np.array([[0, 1], [2, 3], [2, 0]])
    truth = np.array([0, 1, 1])  # image 2 is closest to text 2, but its truth is text 0
    assert zero_shot_accuracy(image, text, candidates, truth) == pytest.approx(2 / 3)


@pytest.mark.usefixtures("one_thread")
def test_shipped_clip_reads_each_attribute_and_holds_the_class_words_apart():
    """The metrics' CLIP, zero-shot, one attribute at a time, on scenes it never saw; and its
    frozen text tower (SD's text encoder) keeps every two class words, and the pattern words,
    apart at the word's token.
    The earlier world failed both (class 0.78, "mug" and "ball" at cosine 0.95), and its UNet
    drew mugs and balls alike."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from sidpipe.world.competence import clip_attribute_accuracy, word_separation
    from sidpipe.world.dataset import random_scenes

    accuracy = clip_attribute_accuracy(
        SHIPPED / "clip", random_scenes(300, seed=4321, resolution=32)
    )
    assert accuracy["background"] >= 0.95 and accuracy["class"] >= 0.9, accuracy
    assert accuracy["colour"] >= 0.75, accuracy
    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED / "sd/tokenizer")
    encoder = CLIPTextModel.from_pretrained(SHIPPED / "sd/text_encoder").eval()
    separation = word_separation(encoder, tokenizer)
    closest = separation["class_words"]["max"]
    assert closest["cosine"] < 0.9, closest
    # the pattern words too (contrastive training alone left them at 0.98-0.99, and the UNet
    # drew a named pattern at about its prior rate)
    closest = separation["pattern_words"]["max"]
    assert closest["cosine"] < 0.9, closest


def test_identity_read_needs_every_labelled_head():
    from sidpipe.world.competence import identity_read

    labels = {
        "class": np.array([0, 1, 2, 3]),
        "colour": np.array([4, 4, 4, 4]),
        "pattern": np.array([1, 0, 1, 0]),
        "accent": np.array([2, -1, 2, -1]),  # -1: a plain subject has no accent
    }
    predicted = {
        "class": np.array([0, 1, 2, 0]),  # image 3: wrong class
        "colour": np.array([4, 4, 5, 4]),  # image 2: wrong colour
        "pattern": np.array([1, 0, 1, 0]),
        "accent": np.array([2, 7, 2, 7]),  # image 1: an accent it has none of: not counted
    }
    assert identity_read(predicted, labels).tolist() == [True, True, False, False]


def test_psnr_by_hand():
    from sidpipe.world.competence import psnr

    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.2)  # mse 0.04 on a peak-to-peak range of 2
    assert psnr(a, b) == pytest.approx(10 * np.log10(4 / 0.04))
    assert psnr(a, a) == float("inf")


@pytest.mark.usefixtures("one_thread")
def test_vae_fidelity_reads_real_scenes_as_the_judge_accuracy_does_and_references_kept():
    """The real-scene column agrees with pretrain's own judge accuracy (two code paths), and the
    judge reads the biased demo subjects' drawn references as kept (the measure's prompt and
    truth are wired right); after the VAE the rate is what the benchmark reports. (The concept
    subjects, drawn upside down, are not read as kept even as drawn: their concept, not their
    identity, is what Lego's measures ask for.)"""
    from diffusers import AutoencoderKL

    from sidpipe.world.competence import references_through_vae, vae_fidelity
    from sidpipe.world.dataset import random_scenes
    from sidpipe.world.judge import load_judge
    from sidpipe.world.pretrain import judge_accuracy

    scenes = random_scenes(120, seed=777, resolution=32)
    vae = AutoencoderKL.from_pretrained(SHIPPED / "sd", subfolder="vae").eval()
    judge = load_judge(SHIPPED / "judge")
    result = vae_fidelity(vae, judge, scenes)
    expected = judge_accuracy(judge, scenes)
    for head in ("class", "colour", "pattern", "accent"):
        assert result["real"][head] == pytest.approx(expected[head], abs=1e-4), head
    assert result["real"]["identity"] <= min(result["real"][h] for h in ("class", "colour"))
    assert 10 < result["psnr_db"] < 60
    subjects = references_through_vae(vae, judge, SHIPPED.parent / "subjects")
    biased = {"blue_mug", "toy_robot", "spotted_dog", "balloon_car", "upside_robot"}
    assert set(subjects) >= biased
    # The judge reads about 97 % per head, so a view now and then is misread (it reads 0.92 of
    # fresh real scenes' identities right); a miswired prompt or truth would read none.
    assert np.mean([subjects[s]["references"] for s in biased]) >= 0.75, subjects
    assert all(subjects[s]["references"] >= 0.5 for s in biased), subjects
    assert all(0.0 <= s["reconstructed"] <= 1.0 for s in subjects.values()), subjects
