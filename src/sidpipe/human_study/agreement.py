"""Inter-rater agreement on nominal ratings, from a units x categories table of counts
(`counts[u, c]`: how many raters put unit u in category c).

- Fleiss' kappa (Fleiss 1971): P_u = (sum_c n_uc^2 - n_u) / (n_u (n_u - 1)), P = mean_u P_u,
  p_c = sum_u n_uc / sum_u n_u, Pe = sum_c p_c^2, kappa = (P - Pe) / (1 - Pe). Fleiss assumes
  every unit has the same number of raters; with unequal numbers this is the usual
  generalisation (each unit's agreement from its own raters). Units with fewer than two raters
  carry no agreement and are left out.
- Krippendorff's alpha, nominal (Krippendorff 2011, "Computing Krippendorff's alpha-
  reliability"): the coincidence matrix o_ck = sum_u n_uc (n_uk - [c = k]) / (m_u - 1) over
  units with m_u >= 2 values, n_c = sum_k o_ck, n = sum_c n_c, alpha = 1 - (n - 1)
  sum_{c != k} o_ck / sum_{c != k} n_c n_k. It handles any number of raters per unit.

Both are NaN where they are undefined (fewer than two pairable units' worth of values, or a
single category used throughout: no disagreement is expected by chance).
"""

from __future__ import annotations

import numpy as np


def _counts(counts: np.ndarray) -> np.ndarray:
    arr = np.asarray(counts, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"counts must be units x categories, got shape {arr.shape}")
    if (arr < 0).any() or not np.isfinite(arr).all():
        raise ValueError("counts must be finite and non-negative")
    return arr[arr.sum(axis=1) >= 2]  # units that at least two raters rated


def fleiss_kappa(counts: np.ndarray) -> float:
    arr = _counts(counts)
    if not len(arr):
        return float("nan")
    n_u = arr.sum(axis=1)
    p_u = ((arr**2).sum(axis=1) - n_u) / (n_u * (n_u - 1))
    p_c = arr.sum(axis=0) / n_u.sum()
    expected = float((p_c**2).sum())
    if np.isclose(expected, 1.0):
        return float("nan")
    return float((p_u.mean() - expected) / (1 - expected))


def krippendorff_alpha_nominal(counts: np.ndarray) -> float:
    arr = _counts(counts)
    if not len(arr):
        return float("nan")
    m_u = arr.sum(axis=1)
    # o[c, k] = sum_u n_uc (n_uk - [c == k]) / (m_u - 1)
    weighted = arr / (m_u - 1)[:, None]
    coincidences = weighted.T @ arr - np.diag(weighted.sum(axis=0))
    n_c = coincidences.sum(axis=1)
    n = n_c.sum()
    off = ~np.eye(len(n_c), dtype=bool)
    observed = coincidences[off].sum()
    expected = np.outer(n_c, n_c)[off].sum()
    if expected == 0 or n <= 1:
        return float("nan")
    return float(1 - (n - 1) * observed / expected)


__all__ = ["fleiss_kappa", "krippendorff_alpha_nominal"]
