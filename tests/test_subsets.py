"""Reference subsets (the single-reference experiment): names, selection, config expansion and
the reduced reference set reaching training."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from sidpipe.config import ConfigError, validate_config
from sidpipe.grid import Arm, expand_experiments
from sidpipe.io import SidpipeError
from sidpipe.subsets import select_references, split_name, subset_name

REPO = Path(__file__).resolve().parents[1]


def test_names_round_trip() -> None:
    assert subset_name("dreambooth", 1) == "dreambooth--first1"
    assert subset_name("svdiff", "03") == "svdiff--img03"
    for name in ("dreambooth--first1", "svdiff--img03", "textual_inversion--first12"):
        method, spec = split_name(name)
        assert subset_name(method, spec) == name
    assert split_name("dreambooth") == ("dreambooth", None)
    with pytest.raises(SidpipeError, match="not a subset method name"):
        split_name("dreambooth--whatever")
    with pytest.raises(SidpipeError, match="at least 1"):
        subset_name("dreambooth", 0)


def test_selection_keeps_the_first_in_id_order_or_the_named_image() -> None:
    ids = ["03", "01", "02"]
    assert select_references(ids, None, "cat") == ids
    assert select_references(ids, 1, "cat") == ["01"]
    assert select_references(ids, 2, "cat") == ["01", "02"]  # in the given order
    assert select_references(ids, "02", "cat") == ["02"]
    with pytest.raises(SidpipeError, match="cat: references: 4 asks for more"):
        select_references(ids, 4, "cat")
    with pytest.raises(SidpipeError, match="'07' is not one of its images"):
        select_references(ids, "07", "cat")


@pytest.fixture(scope="module")
def real() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_a_grid_with_references_runs_subset_methods(real: dict) -> None:
    experiments = expand_experiments(real, ["cat", "dog"])
    arms = {arm for arm, _ in experiments["single_reference"]}
    assert arms == {
        Arm(f"{m}--first1", d)
        for m in ("dreambooth", "custom_diffusion", "svdiff")
        for d in ("case1", "sid")
    } | {Arm("blip_diffusion--first1", "case1"), Arm("elite--first1", "case1")}
    # the full-reference arms are untouched and not duplicated
    assert Arm("dreambooth", "case1") in {arm for arm, _ in experiments["main"]}


def test_references_are_validated(real: dict) -> None:
    config = copy.deepcopy(real)
    config["experiments"]["single_reference"][0]["references"] = 0
    with pytest.raises(ConfigError, match="references"):
        validate_config(config)
    config = copy.deepcopy(real)
    config["methods"]["dreambooth--x"] = config["methods"]["dreambooth"]
    with pytest.raises(ConfigError, match="reserved for reference subsets"):
        validate_config(config)


def test_the_subset_reaches_training(tmp_path: Path) -> None:
    """train_subject on `reference_subset=1`: one image, its own description, recorded."""
    from test_training_methods import make_subject

    from sidpipe.training.data import read_training_set
    from sidpipe.training.loop import train_subject

    subject = make_subject(tmp_path / "subject")
    full = read_training_set(subject.refs, subject.csv, masks_dir=subject.masks)
    one = read_training_set(subject.refs, subject.csv, masks_dir=subject.masks, reference_subset=1)
    first = sorted(full.image_ids)[0]
    assert len(full.image_ids) > 1 and one.image_ids == [first]
    assert one.descriptions == [full.descriptions[full.image_ids.index(first)]]
    assert one.pixels.shape[0] == 1 and one.masks.shape[0] == 1
    out = tmp_path / "run"
    train_subject(
        "textual_inversion",
        {"steps": 2, "learning_rate": 1e-3},
        subject.sd,
        subject.refs,
        subject.csv,
        out,
        tmp_path / "ckpt",
        identifier="sks",
        class_name="mug",
        device="cpu",
        reference_subset=1,
    )
    info = json.loads((out / "train_info.json").read_text())
    assert [row["image_id"] for row in info["images"]] == [first]
    assert info["reference_subset"] == 1
