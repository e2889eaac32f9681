"""Spread per-patch scores into voxel maps the way nnU-Net accumulates logits, and reduce maps to case scores.

González et al.'s reference code forgets to divide by the accumulated weights and hard-codes the
patch size; both are fixed here (METHODS.md §1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from nnunet_ood.calibration import CASE_AGGREGATIONS
from nnunet_ood.slabs import slab_slices
from nnunet_ood.sliding_window import SlidingWindowLayout


def importance_weights(patch_size: Sequence[int], use_gaussian: bool, device: torch.device) -> torch.Tensor:
    """nnU-Net's Gaussian importance map for a patch (float32), or ones when Gaussian weighting is off."""
    if not use_gaussian:
        return torch.ones(tuple(patch_size), dtype=torch.float32, device=device)
    # same call as nnUNetPredictor; the scaling factor cancels in the weighted average
    return compute_gaussian(tuple(patch_size), sigma_scale=1.0 / 8, value_scaling_factor=10,
                            device=device).float()


class PatchMapAccumulator:
    """Gaussian-weighted average of per-patch voxel maps over a padded image, as nnU-Net averages logits.

    ``add`` takes one patch's maps ``(M, *patch)`` (or per-patch scalars ``(M,)``, spread over the
    patch) at nnU-Net's slicer; ``result`` divides by the summed weights and crops the padding away.
    Only the weighted sums are held over the whole image: the summed weights are made at ``result``, slab by slab
    from the patches' regions (the same float32 additions in the same order per voxel, so the same values as one
    padded weight volume, without its 300 MB at clinical size while nnU-Net's own arrays are alive).
    """

    def __init__(self, n_maps: int, padded_shape: Sequence[int], weights: torch.Tensor) -> None:
        self.weights = weights
        self.numerator = torch.zeros((n_maps, *padded_shape), dtype=torch.float32, device=weights.device)
        self.regions: list[tuple] = []

    def add(self, values: torch.Tensor, slicer: Sequence[slice]) -> None:
        """Add one patch: ``values`` is ``(M, *patch)`` or ``(M,)``; ``slicer`` nnU-Net's (channel slice first)."""
        region = tuple(slicer[1:])
        values = values.to(device=self.weights.device, dtype=torch.float32)
        if values.ndim == 1:
            values = values.view((-1,) + (1,) * self.weights.ndim)
        self.numerator[(slice(None), *region)] += values * self.weights
        self.regions.append(region)

    def summed_weights(self, start: int, stop: int) -> torch.Tensor:
        """The summed patch weights of rows ``start:stop`` of the first spatial axis (float32)."""
        first_axis = self.numerator.shape[1]
        summed = torch.zeros((stop - start, *self.numerator.shape[2:]), dtype=torch.float32,
                             device=self.weights.device)
        for region in self.regions:  # a loop over patches, not voxels
            first = region[0]
            # 2D configurations slice 3D data with an integer index on the first axis
            low, high = (first, first + 1) if isinstance(first, int) else first.indices(first_axis)[:2]
            weights = self.weights if isinstance(first, slice) else self.weights[None]
            a, b = max(low, start), min(high, stop)
            if a < b:
                summed[(slice(a - start, b - start), *region[1:])] += weights[a - low:b - low]
        return summed

    def result(self, revert_padding: Sequence[slice]) -> torch.Tensor:
        """The weighted average ``(M, *shape)``, cropped back to the unpadded preprocessed image. Divides in place,
        slab by slab: call once, after the last ``add``."""
        for part in slab_slices(self.numerator.shape[1:]):
            self.numerator[:, part].div_(self.summed_weights(part.start, part.stop))
        return self.numerator[(slice(None), *revert_padding)]


def patch_scores_to_maps(scores: torch.Tensor, layout: SlidingWindowLayout, weights: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted average of per-patch scores at every voxel.

    ``scores`` is ``(P, M)`` for P patches and M methods; the result is ``(M, *spatial)`` float32,
    already cropped back to the unpadded preprocessed shape. Each patch adds ``score * weights`` to the
    voxels it covers; the sum is divided by the summed weights, exactly like nnU-Net's logits.
    """
    if scores.ndim == 1:
        scores = scores[:, None]
    accumulator = PatchMapAccumulator(scores.shape[1], layout.padded_shape, weights)
    for patch_scores, slicer in zip(scores, layout.slicers):  # loop over patches, not voxels
        accumulator.add(patch_scores, slicer)
    return accumulator.result(layout.revert_padding)


#: voxels per float64 chunk of a map's mean: the float64 copy stays at 128 MB for clinical volumes
MEAN_CHUNK = 2**24


def case_scores_from_maps(maps: torch.Tensor) -> torch.Tensor:
    """Case score per method: the mean of its voxel map in float64 (NaN if any patch could not be scored).

    Maps larger than :data:`MEAN_CHUNK` voxels are summed chunk by chunk, so no float64 copy of a whole map is made
    (at 512 x 512 x 300 voxels that copy alone is 630 MB).
    """
    flat = maps.flatten(1)
    n = flat.shape[1]
    if n <= MEAN_CHUNK:
        return flat.double().mean(dim=1)
    total = torch.zeros(flat.shape[0], dtype=torch.float64, device=flat.device)
    for start in range(0, n, MEAN_CHUNK):  # a handful of chunks, not a loop over voxels
        total += flat[:, start:start + MEAN_CHUNK].double().sum(dim=1)
    return total / n


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True, in float64; in chunks of :data:`MEAN_CHUNK` voxels above that size
    (no float64 copy of the selected voxels of a whole volume)."""
    flat, selected = values.flatten(), mask.flatten()
    if flat.numel() <= MEAN_CHUNK:
        return flat[selected].double().mean()
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), MEAN_CHUNK):  # a handful of chunks, not a loop over voxels
        part = slice(start, start + MEAN_CHUNK)
        total += flat[part][selected[part]].double().sum()
    return total / selected.sum()


def patch_means(maps: torch.Tensor, layout: SlidingWindowLayout) -> torch.Tensor:
    """Mean of each map over each sliding-window patch, ``(P, M)``; patches are clipped to the unpadded image."""
    shape = maps.shape[1:]
    means = []
    for slicer in layout.slicers:  # loop over patches, not voxels
        # 2D configurations slice 3D data with an integer index on the first axis
        bounds = [(s, s + 1) if isinstance(s, int) else (s.start, s.stop) for s in slicer[1:]]
        region = tuple(slice(max(lo - r.start, 0), min(hi - r.start, n))
                       for (lo, hi), r, n in zip(bounds, layout.revert_padding, shape))
        means.append(maps[(slice(None), *region)].flatten(1).double().mean(dim=1))
    return torch.stack(means)


def aggregate_case_scores(maps: torch.Tensor, aggregations: Sequence[str], layout: SlidingWindowLayout,
                          foreground: torch.Tensor | None = None) -> torch.Tensor:
    """Case score per method ``(M,)`` float64 from its voxel map, by that method's aggregation.

    * ``mean``: mean over all voxels (METHODS.md's definition);
    * ``foreground_mean``: mean over the voxels nnU-Net segments as foreground (``foreground``, a boolean
      map); a case without predicted foreground falls back to the mean over all voxels;
    * ``max_patch``: the largest of the per-patch means, for local anomalies that a mean dilutes.
    """
    scores = case_scores_from_maps(maps)
    for i, how in enumerate(aggregations):
        if how == "foreground_mean":
            if foreground is None:
                raise ValueError("foreground_mean needs the predicted foreground")
            if bool(foreground.any()):
                scores[i] = masked_mean(maps[i], foreground.to(maps.device))
        elif how == "max_patch":
            scores[i] = patch_means(maps[i:i + 1], layout).max()
        elif how != "mean":
            raise ValueError(f"unknown case aggregation {how!r}; choose from {', '.join(CASE_AGGREGATIONS)}")
    return scores
