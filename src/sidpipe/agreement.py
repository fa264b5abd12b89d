"""Do the metrics agree with the ground truth? Rank correlations between the paper's proxies
(SA / NSD / TA) and DreamBooth's identity metrics (CLIP-I / DINO, whole-image similarity to the
references) and the synthetic world's measures (leaks, subject kept, prompt followed), across
images and across arms, with the sign a faithful proxy should have."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from sidpipe.world.measures import IDENTITY_PARTS, MEASURES

PAPER_PROXIES = ("SA", "NSD", "TA")
# DreamBooth's identity metrics compare whole images with the references, so what leaks from
# them can raise these as much as the subject does (the paper's reason for a masked SA).
IDENTITY_PROXIES = ("CLIP-I", "DINO")
PROXIES = (*PAPER_PROXIES, *IDENTITY_PROXIES)
# The world's measures but subject_kept's parts (which subject_kept already sums up).
TRUTHS = tuple(m for m in MEASURES if m not in IDENTITY_PARTS)
# What a faithful proxy should do: NSD falls when things leak, SA, CLIP-I and DINO rise when
# the subject is kept (SA also, on a concept's transfer prompts, when the carrier leaks into
# them), TA rises when the prompt is followed.
EXPECTED_SIGN = {
    ("NSD", "leak_background"): -1,
    ("NSD", "leak_object"): -1,
    ("NSD", "leak_pose"): -1,
    ("SA", "subject_kept"): 1,
    ("CLIP-I", "subject_kept"): 1,
    ("DINO", "subject_kept"): 1,
    ("SA", "leak_subject"): 1,
    ("TA", "prompt_followed"): 1,
    ("TA", "leak_background"): -1,
}
COLUMNS = ["proxy", "truth", "level", "spearman", "ci_low", "ci_high", "n", "expected_sign"]
KEYS = ["method", "descriptions", "inference", "subject", "prompt_id", "seed"]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    rx = pd.Series(np.asarray(x, float)).rank(method="average").to_numpy()
    ry = pd.Series(np.asarray(y, float)).rank(method="average").to_numpy()
    if len(rx) < 3 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _subject_bootstrap(
    joined: pd.DataFrame, proxy: str, truth: str, n_boot: int, rng: np.random.Generator
) -> tuple[float, float]:
    """95 % interval of the image-level correlation, resampling subjects."""
    groups = [g for _, g in joined.groupby("subject")]
    if len(groups) < 2:
        return float("nan"), float("nan")
    reps = []
    for _ in range(n_boot):
        pick = pd.concat([groups[i] for i in rng.integers(len(groups), size=len(groups))])
        reps.append(spearman(pick[proxy], pick[truth]))
    reps = np.asarray(reps)
    reps = reps[~np.isnan(reps)]
    if not len(reps):
        return float("nan"), float("nan")
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return float(lo), float(hi)


def agreement(all_df: pd.DataFrame, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """One row per (proxy, truth, level): Spearman's rho across images (pooled over arms and
    subjects; 95 % CI resampling subjects) and across arms (arm means); empty when the table
    has no ground-truth measures."""
    wide = all_df.pivot_table(index=KEYS, columns="metric", values="value", aggfunc="first")
    rng = np.random.default_rng(seed)
    rows = []
    # The paper's proxies draw their bootstrap first, so the identity metrics' rows, added
    # after them, left every earlier interval as it was.
    pairs = [(p, t) for group in (PAPER_PROXIES, IDENTITY_PROXIES) for t in TRUTHS for p in group]
    for proxy, truth in pairs:
        if truth not in wide.columns or proxy not in wide.columns:
            continue
        joined = wide[[proxy, truth]].dropna().reset_index()
        if joined.empty:
            continue
        lo, hi = _subject_bootstrap(joined, proxy, truth, n_boot, rng)
        sign = EXPECTED_SIGN.get((proxy, truth), 0)
        rows.append(
            [
                proxy,
                truth,
                "images",
                spearman(joined[proxy], joined[truth]),
                lo,
                hi,
                len(joined),
                sign,
            ]
        )
        arms = joined.groupby(["method", "descriptions", "inference"])[[proxy, truth]].mean()
        rows.append(
            [
                proxy,
                truth,
                "arms",
                spearman(arms[proxy], arms[truth]),
                np.nan,
                np.nan,
                len(arms),
                sign,
            ]
        )
    return pd.DataFrame(rows, columns=COLUMNS)
