"""Which axial slice (array axis 0 of a ``(Z, Y, X)`` volume) a thumbnail shows.

* Evaluation report: the slice where prediction and reference disagree on the most voxels.
* Review report (no labels): the slice with the largest summed uncertainty of the shown map (non-finite voxels
  ignored); without a map, the slice with the most predicted foreground.

Ties go to the slice with more foreground (prediction or reference), then to the lowest index. When every slice
ties (a perfect or empty case, a constant map) the middle slice is shown.
"""

from __future__ import annotations

import numpy as np


def pick_slice(primary: np.ndarray, secondary: np.ndarray | None = None) -> int:
    """Index of the largest ``primary`` per-slice value, ties broken by ``secondary`` then the lowest index; the
    middle slice when every slice ties on both."""
    primary = np.asarray(primary, dtype=np.float64)
    secondary = np.zeros_like(primary) if secondary is None else np.asarray(secondary, dtype=np.float64)
    if primary.size == 0:
        raise ValueError("a volume without slices has no slice to show")
    if np.all(primary == primary[0]) and np.all(secondary == secondary[0]):
        return int(primary.size // 2)
    # lexsort sorts by its last key first and is stable: the first index among the largest keys comes last
    order = np.lexsort((-np.arange(primary.size), secondary, primary))
    return int(order[-1])


def foreground_per_slice(*label_volumes: np.ndarray) -> np.ndarray:
    """Voxels per slice that are foreground (> 0) in any of the label volumes."""
    foreground = np.zeros(label_volumes[0].shape, dtype=bool)
    for volume in label_volumes:
        foreground |= volume > 0
    return foreground.reshape(foreground.shape[0], -1).sum(axis=1)


def disagreement_slice(prediction: np.ndarray, reference: np.ndarray) -> int:
    """The slice where ``prediction`` and ``reference`` (same shape, ``(Z, Y, X)``) differ on the most voxels."""
    differ = (prediction != reference).reshape(prediction.shape[0], -1).sum(axis=1)
    return pick_slice(differ, foreground_per_slice(prediction, reference))


def uncertainty_slice(ood_map: np.ndarray | None, segmentation: np.ndarray) -> int:
    """The slice with the largest summed (finite) uncertainty of ``ood_map``; without a map, the most foreground of
    ``segmentation``."""
    foreground = foreground_per_slice(segmentation)
    if ood_map is None:
        return pick_slice(foreground)
    finite = np.where(np.isfinite(ood_map), ood_map, 0.0)
    return pick_slice(finite.reshape(finite.shape[0], -1).sum(axis=1, dtype=np.float64), foreground)
