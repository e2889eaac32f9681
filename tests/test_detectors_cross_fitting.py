"""Cross-fitted training scores: the held-out detector equals a fit on the other parts only."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from nnunet_ood.detectors.cross_fitting import assign_parts, merge_parts
from nnunet_ood.detectors.mahalanobis import MahalanobisDetector


def test_parts_cover_all_keys_evenly_and_are_seeded() -> None:
    keys = [f"case_{i:02d}" for i in range(23)]
    parts = assign_parts(keys, 5, seed=0)
    assert sorted(parts) == sorted(keys)
    sizes = np.bincount(list(parts.values()))
    assert len(sizes) == 5 and sizes.max() - sizes.min() <= 1
    assert parts == assign_parts(list(reversed(keys)), 5, seed=0)
    assert parts != assign_parts(keys, 5, seed=1)
    assert set(assign_parts(keys[:3], 5).values()) == {0, 1, 2}  # never more parts than cases


def test_held_out_detector_matches_sklearn_fit_on_the_other_parts() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12)) + 3.0
    y = rng.standard_normal((20, 12)) * 2.0
    groups = np.arange(len(x)) % 4
    parts = [MahalanobisDetector().fit(torch.from_numpy(x[groups == g])) for g in range(4)]
    for k in range(4):
        held_out = merge_parts(parts, MahalanobisDetector(), skip=k)
        reference = LedoitWolf().fit(x[groups != k]).mahalanobis(y)
        np.testing.assert_allclose(held_out.score(torch.from_numpy(y)).numpy(), reference, rtol=1e-8)
    everything = merge_parts(parts, MahalanobisDetector())
    np.testing.assert_allclose(everything.score(torch.from_numpy(y)).numpy(),
                               LedoitWolf().fit(x).mahalanobis(y), rtol=1e-8)
    assert parts[0].n_samples_seen_ == 75  # parts are left unchanged by merging


def test_in_sample_scores_are_biased_low_when_features_outnumber_patches() -> None:
    # why cross-fitting: with N < D, training rows sit close to their own fit
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 200))
    det = MahalanobisDetector().fit(torch.from_numpy(x))
    in_sample = det.score(torch.from_numpy(x)).mean().item()
    unseen = det.score(torch.from_numpy(rng.standard_normal((40, 200)))).mean().item()
    parts = [MahalanobisDetector().fit(torch.from_numpy(x[i::4])) for i in range(4)]
    cross = np.mean([merge_parts(parts, MahalanobisDetector(), skip=k).score(torch.from_numpy(x[k::4])).numpy()
                     for k in range(4)])
    assert in_sample < unseen
    assert abs(cross - unseen) < 0.5 * abs(in_sample - unseen)
