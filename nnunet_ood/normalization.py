"""The one score normalisation of the package: a score (or a map of them) on the [0, 1] display scale of its
method's calibration bounds ``(low, high)`` (numpy only, no torch, no nnU-Net).

* :func:`normalize`: ``score`` clipped to ``[low, high]`` and rescaled to [0, 1] (float64), NaN stays NaN;
  degenerate bounds (``high == low``: every training score was equal) give a step, 1 above ``low`` and 0 at or
  below it. A float gives a float, an array an array: the ``normalized`` column, the evaluation's thresholds and
  the uint8 maps are the same numbers.
* :func:`usable_bounds`: whether ``(low, high)`` can normalise at all (finite, ``high >= low``); every reader of a
  calibration asks it.
* :func:`bounds_from_scores`: the bounds a fit or a site calibration makes from its in-distribution scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import numpy as np


def usable_bounds(low: float, high: float) -> bool:
    """Whether ``(low, high)`` are normalisation bounds: both finite, ``high >= low`` (equal bounds give a step)."""
    return math.isfinite(low) and math.isfinite(high) and high >= low


@overload
def normalize(values: float, low: float, high: float) -> float: ...


@overload
def normalize(values: np.ndarray, low: float, high: float) -> np.ndarray: ...


def normalize(values, low, high):
    """``values`` clipped to ``[low, high]`` and rescaled to [0, 1] in float64; NaN stays NaN.

    ``high == low`` gives a step: 0 at or below ``low``, 1 above it, so a case scoring above every training case
    still stands out. A Python or numpy scalar gives a float, anything else a float64 array of its shape. Bounds
    that are not :func:`usable_bounds` raise ``ValueError``.
    """
    if not usable_bounds(low, high):
        raise ValueError(f"normalisation needs finite bounds with high >= low, got low={low}, high={high}")
    array = np.asarray(values, dtype=np.float64)
    if high == low:
        out = np.where(np.isnan(array), np.nan, (array > low).astype(np.float64))
    else:
        out = (np.clip(array, low, high) - low) / (high - low)  # np.clip keeps NaN
    return float(out) if np.ndim(values) == 0 else out


def bounds_from_scores(scores: Sequence[float]) -> tuple[float, float]:
    """``[min, 2 max]`` of in-distribution case scores (METHODS.md); scores that can be negative (energy,
    kl_uniform) get the same headroom above the minimum: ``[min, max + (max - min)]``."""
    low, top = float(min(scores)), float(max(scores))
    return low, (2 * top if low >= 0 else top + (top - low))
