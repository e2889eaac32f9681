"""Ranks and the rank correlation, shared by the quality model (:mod:`nnunet_ood.quality.model`) and the
evaluation's metrics (:mod:`nnunet_ood.evaluation.metrics`, which re-exports them): one definition each.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def average_ranks(x: ArrayLike) -> np.ndarray:
    """1-based ranks of a 1D array, ties sharing the mean of their ranks. ``inf`` is allowed;
    NaN is not (its order is undefined)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if np.isnan(x).any():
        raise ValueError("average_ranks is undefined for NaN")
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    # Tied group g occupies ranks start_g .. start_g + count_g - 1; all get the mean.
    start = np.cumsum(counts) - counts + 1
    return (start + (counts - 1) / 2.0)[inverse.ravel()]


def nan_free_pairs(x: ArrayLike, y: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Two flat float64 arrays of equal length without the pairs where either value is NaN."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{name} needs equal lengths, got {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks).

    Pairs where either value is NaN are dropped (like ``scipy.stats.spearmanr`` with
    ``nan_policy="omit"``). Returns NaN when fewer than two pairs remain or either side is
    constant.
    """
    x, y = nan_free_pairs(x, y, "spearman")
    if x.size < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    if denom == 0:
        return float("nan")
    return float((rx * ry).sum() / denom)
