"""A concept subject's metrics split by prompt: carrier vs transfer.

A concept subject (kind `concept`, e.g. "upside down" learned from photos of a robot) is scored
on two kinds of prompts: those naming the carrier's class ("a <cpt> robot on the beach") and
those carrying the concept to other classes ("a <cpt> dog"). SA means opposite things on them:
keeping the carrier on the first, the carrier leaking into the concept on the second (Lego's
subject leak). An arm's overall mean mixes both, so this table gives each group its own mean,
and `carrier_transfer_pairs` each group's paired method differences (Lego minus multi-vector
Textual Inversion on the same prompts and seeds), each per concept (the subjects table's
`concept` column: subjects of one concept are pooled, different concepts never are).
"""

from __future__ import annotations

import pandas as pd

from sidpipe import method_pairs, stats
from sidpipe.sampling import names_class

COLUMNS = ["concept", "prompts", *stats.SUMMARY_COLUMNS]
PAIR_COLUMNS = ["concept", "prompts", *method_pairs.COLUMNS]
GROUPS = ["concept", "prompts"]


def prompt_group(prompt: str, carrier_class: str) -> str:
    """`carrier` when the prompt names the carrier's class (as a word), else `transfer` (the
    world's subject_kept uses the same rule; a transfer class that contains the carrier's word,
    "toy car" for a car, counts as the carrier's)."""
    return "carrier" if names_class(prompt, carrier_class) else "transfer"


def _grouped(all_df: pd.DataFrame, subjects: list[dict]) -> pd.DataFrame:
    """The concept subjects' rows with their concept and prompt group (`prompts`: carrier or
    transfer)."""
    concept_rows = {s["subject"]: s for s in subjects if s.get("kind") == "concept"}
    rows = all_df[all_df["subject"].isin(concept_rows)]
    groups = [
        prompt_group(prompt, concept_rows[subject]["class"])
        for prompt, subject in zip(rows["prompt"], rows["subject"], strict=True)
    ]
    concepts = [concept_rows[subject].get("concept") or "" for subject in rows["subject"]]
    return rows.assign(concept=concepts, prompts=groups)


def carrier_transfer_summary(
    all_df: pd.DataFrame, subjects: list[dict], n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per concept, prompt group (carrier, transfer), arm and metric over the concept's
    subjects: mean with its bootstrap CI (`stats.arm_summary`); no rows without concept
    subjects."""
    rows = _grouped(all_df, subjects)
    if rows.empty:
        return pd.DataFrame(columns=COLUMNS)
    parts = [
        stats.arm_summary(part, n_boot=n_boot, seed=seed).assign(concept=concept, prompts=group)
        for (concept, group), part in rows.groupby(GROUPS, sort=True)
    ]
    return pd.concat(parts, ignore_index=True)[COLUMNS]


def carrier_transfer_pairs(
    all_df: pd.DataFrame, subjects: list[dict], n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per concept and prompt group, every two methods on the concept's subjects' same prompts
    and seeds: mean(A - B) with a two-stage bootstrap CI (`method_pairs.paired_methods`); no
    rows without concept subjects or with one method."""
    rows = _grouped(all_df, subjects)
    parts = [
        method_pairs.paired_methods(part, n_boot=n_boot, seed=seed).assign(
            concept=concept, prompts=group
        )
        for (concept, group), part in rows.groupby(GROUPS, sort=True)
    ]
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    return pd.concat(parts, ignore_index=True)[PAIR_COLUMNS]
