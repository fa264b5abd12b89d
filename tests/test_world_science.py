"""The SID effect in the synthetic world, as a regression test.

On the DreamBooth arms of the demo and its biases layer (five biased subjects x the world's 14
prompts x 4 seeds, every seed fixed), SID descriptions lower `leak_background` and raise NSD
against Case 1, each with a paired bootstrap 95 % CI (improvements.csv, as the report shows it)
that excludes 0; `make demo` alone shows it on its one subject. The same check on a
deliberately broken SID arm (its descriptions replaced by Case 1 inside the arm) must fail: the
test can tell a working pipeline from one where the descriptions never reach training.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import yaml
from test_workflow import snakemake


def sid_effect_failures(improvements: pd.DataFrame, method: str = "dreambooth") -> list[str]:
    """What is missing from the SID effect for `method` over all subjects (empty: it holds)."""
    rows = improvements[(improvements["method"] == method) & (improvements["bias"] == "all")]
    rows = rows.set_index("metric")
    failures = []
    for metric, sign in (("leak_background", -1), ("NSD", +1)):
        if metric not in rows.index:
            failures.append(f"{metric}: no paired SID-vs-Case-1 row")
            continue
        low, high = rows.loc[metric, "ci_low"], rows.loc[metric, "ci_high"]
        if not (high < 0 if sign < 0 else low > 0):
            direction = "below" if sign < 0 else "above"
            failures.append(f"{metric}: 95 % CI [{low:.4f}, {high:.4f}] is not {direction} 0")
    return failures


def test_sid_lowers_the_background_leak_and_raises_nsd(demo_run):
    improvements = pd.read_csv(demo_run / "results/metrics/improvements.csv")
    assert sid_effect_failures(improvements) == []


def test_the_plain_demo_shows_it_on_its_one_subject(plain_demo):
    """`make demo` alone (every method on `blue_mug`): a newcomer's first run already shows it."""
    improvements = pd.read_csv(plain_demo / "results/metrics/improvements.csv")
    dreambooth = improvements[(improvements["method"] == "dreambooth")]
    assert set(dreambooth["n_subjects"]) == {1}
    assert sid_effect_failures(improvements) == []


def test_the_check_fails_when_the_sid_arm_trains_on_case1(demo_run, tmp_path):
    """The broken variant: `sid` is Case 1 in disguise, on the same DreamBooth grid."""
    workdir = Path(shutil.copytree(demo_run, tmp_path / "demo", symlinks=True))
    config_path = workdir / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["descriptions"]["sid"] = {"case": 1}
    config["experiments"] = {"biases": config["experiments"]["biases"][:1]}  # DreamBooth only
    config["attention"]["experiments"] = ["biases"]
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(
        workdir,
        "--profile",
        str(Path(__file__).parents[1] / "demo/profile"),
        "results/metrics/improvements.csv",
        timeout=3600,  # hang guard
    )
    improvements = pd.read_csv(workdir / "results/metrics/improvements.csv")
    dreambooth = improvements[
        (improvements["method"] == "dreambooth")
        & (improvements["bias"] == "all")
        & improvements["metric"].isin(["leak_background", "NSD"])
    ]
    assert list(dreambooth["n_subjects"]) == [5, 5]  # the whole DreamBooth grid was compared
    assert len(sid_effect_failures(improvements)) == 2
