"""Gaussian aggregation of patch scores against a brute-force weighted average, voxel by voxel."""

import math

import numpy as np
import pytest
import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from nnunet_ood.aggregation import (
    aggregate_case_scores,
    case_scores_from_maps,
    importance_weights,
    patch_scores_to_maps,
)
from nnunet_ood.segmentation import predicted_foreground
from nnunet_ood.sliding_window import SlidingWindowLayout, revert_padding_slicer


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


def test_case_aggregations_against_brute_force():
    rng = np.random.default_rng(7)
    shape, patch = (11, 13), (6, 8)
    # hand-made layout on a padded image of the same size (no padding): patches overlapping the borders
    slicers = tuple((slice(None), slice(y, y + patch[0]), slice(x, x + patch[1])) for y in (0, 3, 5) for x in (0, 5))
    layout = SlidingWindowLayout(shape, slicers, (slice(0, 11), slice(0, 13)), patch)
    maps = torch.from_numpy(rng.uniform(size=(3, *shape)).astype(np.float32))
    logits = torch.from_numpy(rng.normal(size=(3, *shape)).astype(np.float32))
    fg = predicted_foreground(logits, region_based=False)
    assert torch.equal(fg, logits.argmax(0) > 0)
    got = aggregate_case_scores(maps, ["mean", "foreground_mean", "max_patch"], layout, fg).numpy()
    m = maps.double().numpy()
    assert got[0] == pytest.approx(m[0].mean(), rel=1e-12)
    assert got[1] == pytest.approx(m[1][fg.numpy()].mean(), rel=1e-12)
    best = max(m[2][y:y + patch[0], x:x + patch[1]].mean() for y in (0, 3, 5) for x in (0, 5))
    assert got[2] == pytest.approx(best, rel=1e-12)
    # no predicted foreground: the mean over all voxels
    empty = torch.zeros(shape, dtype=torch.bool)
    assert aggregate_case_scores(maps, ["foreground_mean"] * 3, layout, empty)[1] == pytest.approx(m[1].mean())
    with pytest.raises(ValueError, match="unknown case aggregation"):
        aggregate_case_scores(maps, ["median"] * 3, layout, None)


def test_case_scores_of_large_maps_are_summed_in_chunks(monkeypatch) -> None:
    """Above MEAN_CHUNK voxels the float64 mean is taken chunk by chunk (no float64 copy of the whole map); it
    equals numpy's float64 mean, NaN included."""
    import numpy as np

    from nnunet_ood import aggregation

    monkeypatch.setattr(aggregation, "MEAN_CHUNK", 1000)
    maps = torch.rand(3, 17, 23, 11, generator=torch.Generator().manual_seed(0)) * 100
    maps[2, 5, 5, 5] = float("nan")
    got = aggregation.case_scores_from_maps(maps).numpy()
    expected = maps.numpy().astype(np.float64).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(got[:2], expected[:2], rtol=1e-13)
    assert np.isnan(got[2])


@pytest.mark.parametrize("two_d", [False, True])
def test_summed_weights_made_in_slabs_equal_one_weight_volume(monkeypatch, two_d: bool) -> None:
    """The accumulator sums the patch weights slab by slab at ``result`` (no padded weight volume during the sliding
    window): bit-identical to summing them into one volume patch by patch, for 3D slicers and 2D ones (an integer
    index on the first axis), with slabs that cut through patches."""
    from nnunet_ood import aggregation, slabs

    rng = np.random.default_rng(3)
    if two_d:
        patch, padded = (6, 5), (4, 9, 8)
        slicers = [(slice(None), z, slice(y, y + 6), slice(x, x + 5)) for z in range(4) for y in (0, 3) for x in (0, 3)]
    else:
        patch, padded = (5, 6, 4), (12, 9, 7)
        slicers = [(slice(None), slice(z, z + 5), slice(y, y + 6), slice(x, x + 4))
                   for z in (0, 3, 7) for y in (0, 3) for x in (0, 3)]
    weights = importance_weights(patch, True, torch.device("cpu"))
    values = [torch.from_numpy(rng.normal(size=(2, *patch)).astype(np.float32)) for _ in slicers]
    # the reference: one numerator and one weight volume, summed patch by patch, divided once
    numerator, denominator = torch.zeros((2, *padded)), torch.zeros(padded)
    for v, s in zip(values, slicers):
        numerator[(slice(None), *s[1:])] += v * weights
        denominator[s[1:]] += weights
    expected = numerator / denominator
    monkeypatch.setattr(slabs, "SLAB_VOXELS", 2 * math.prod(padded[1:]))  # slabs of 2 planes
    accumulator = aggregation.PatchMapAccumulator(2, padded, weights)
    for v, s in zip(values, slicers):
        accumulator.add(v, s)
    got = accumulator.result(tuple(slice(0, n) for n in padded))
    assert torch.equal(got, expected)


def test_foreground_mean_of_large_maps_is_summed_in_chunks(monkeypatch) -> None:
    """``foreground_mean`` above MEAN_CHUNK voxels: chunked float64 sums equal numpy's float64 mean of the selected
    voxels."""
    from nnunet_ood import aggregation

    monkeypatch.setattr(aggregation, "MEAN_CHUNK", 1000)
    generator = torch.Generator().manual_seed(1)
    values = torch.rand(17, 23, 11, generator=generator) * 100
    mask = torch.rand(17, 23, 11, generator=generator) > 0.7
    got = float(aggregation.masked_mean(values, mask))
    assert got == pytest.approx(values.numpy().astype(np.float64)[mask.numpy()].mean(), rel=1e-13)


def test_freed_heap_is_returned_on_glibc() -> None:
    """After a case is scored the predictor hands the freed heap back (glibc's malloc_trim, which the profile of a
    clinical-size case showed to return about 300 MB before the export); without glibc it does nothing and says
    so."""
    import platform
    import sys

    from nnunet_ood.inference.heap import return_freed_heap

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert return_freed_heap() is glibc
