"""Gaussian aggregation of patch scores against a brute-force weighted average, voxel by voxel."""

import numpy as np
import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from nnunet_ood.aggregation import (
    SlidingWindowLayout,
    case_scores_from_maps,
    importance_weights,
    patch_scores_to_maps,
    revert_padding_slicer,
)


def brute_force_map(scores, starts, patch, padded_shape, weights, crop):
    """For every voxel: sum over covering patches of w * s, divided by the sum of w (plain loops)."""
    out = np.zeros(padded_shape)
    for idx in np.ndindex(*padded_shape):
        num = den = 0.0
        for s, start in zip(scores, starts):
            local = [i - st for i, st in zip(idx, start)]
            if all(0 <= li < p for li, p in zip(local, patch)):
                w = weights[tuple(local)]
                num += w * s
                den += w
        out[idx] = num / den
    return out[crop]


def test_gaussian_aggregation_matches_brute_force_with_padding_and_borders():
    # image 10 x 5 with patch 6 x 6: axis 1 is padded to 6, axis 0 needs three overlapping patches
    image_shape, patch = (10, 5), (6, 6)
    revert = revert_padding_slicer(image_shape, patch)
    padded = (10, 6)
    assert revert == (slice(0, 10), slice(0, 5))
    starts = [(0, 0), (2, 0), (4, 0)]  # a hand-made layout, unequal overlaps at the lower border
    slicers = tuple((slice(None), slice(a, a + patch[0]), slice(b, b + patch[1])) for a, b in starts)
    layout = SlidingWindowLayout(padded, slicers, revert, patch)
    scores = torch.tensor([[1.0, -2.0], [5.0, 0.5], [3.0, 7.0]], dtype=torch.float64)  # 3 patches, 2 methods
    weights = importance_weights(patch, True, torch.device("cpu"))
    maps = patch_scores_to_maps(scores, layout, weights)
    assert maps.shape == (2, 10, 5)
    w = weights.double().numpy()
    for m in range(2):
        expected = brute_force_map(scores[:, m].numpy(), starts, patch, padded, w, revert)
        np.testing.assert_allclose(maps[m].numpy(), expected, rtol=1e-5)
    # the case score is the plain mean of the map
    np.testing.assert_allclose(case_scores_from_maps(maps).numpy(), maps.double().mean(dim=(1, 2)).numpy())


def test_weights_are_nnunets_gaussian_and_constant_scores_are_preserved():
    patch = (8, 6, 4)
    weights = importance_weights(patch, True, torch.device("cpu"))
    reference = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    torch.testing.assert_close(weights, reference.float())
    # division by the summed weights: a constant score gives a constant map, whatever the overlap
    starts = [(0, 0, 0), (0, 2, 0), (3, 0, 0), (3, 2, 0)]
    slicers = tuple((slice(None), *[slice(s, s + p) for s, p in zip(st, patch)]) for st in starts)
    layout = SlidingWindowLayout((11, 8, 4), slicers, (slice(0, 11), slice(0, 8), slice(0, 4)), patch)
    maps = patch_scores_to_maps(torch.full((4,), 4.25), layout, weights)
    torch.testing.assert_close(maps, torch.full((1, 11, 8, 4), 4.25))


def test_two_d_slicers_with_slice_index_and_no_gaussian():
    # nnU-Net's 2d configuration slices 3d data as (channel, z-index, x, y)
    patch = (4, 4)
    slicers = ((slice(None), 0, slice(0, 4), slice(0, 4)), (slice(None), 1, slice(0, 4), slice(2, 6)),
               (slice(None), 1, slice(0, 4), slice(0, 4)))
    layout = SlidingWindowLayout((2, 4, 6), slicers, (slice(0, 2), slice(0, 4), slice(0, 6)), patch)
    maps = patch_scores_to_maps(torch.tensor([1.0, 3.0, 5.0]), layout, importance_weights(patch, False, "cpu"))
    expected = np.zeros((2, 4, 6))
    expected[0, :, :4] = 1.0
    expected[0, :, 4:] = np.nan  # never covered in slice 0: 0/0
    expected[1, :, :2] = 5.0
    expected[1, :, 2:4] = 4.0
    expected[1, :, 4:] = 3.0
    np.testing.assert_allclose(maps[0].numpy(), expected)


def test_nan_patch_makes_covered_voxels_and_case_score_nan():
    patch = (4,)
    slicers = ((slice(None), slice(0, 4)), (slice(None), slice(4, 8)))
    layout = SlidingWindowLayout((8,), slicers, (slice(0, 8),), patch)
    maps = patch_scores_to_maps(torch.tensor([1.0, float("nan")]), layout, torch.ones(4))
    assert torch.isnan(maps[0, 4:]).all() and torch.all(maps[0, :4] == 1)
    assert torch.isnan(case_scores_from_maps(maps)).all()
