"""Fold-ensemble scores (ensemble_entropy, ensemble_mi, pairwise_dice) against numpy, per voxel and per case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_ood.methods import REGISTRY
from nnunet_ood.methods.ensemble import FoldEnsemble


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def test_ensemble_scores_match_numpy():
    rng = np.random.default_rng(3)
    members = [rng.normal(0, 2, size=(3, 6, 7)) for _ in range(3)]
    acc = FoldEnsemble(region_based=False)
    for logits in members:
        acc.add(torch.from_numpy(logits))
    maps = {m: REGISTRY[m].voxel_map(acc) for m in ("ensemble_entropy", "ensemble_mi", "pairwise_dice")}
    probs = [_softmax(z) for z in members]
    mean = np.mean(probs, axis=0)

    def entropy(p):
        return -(p * np.log(p)).sum(0)

    np.testing.assert_allclose(maps["ensemble_entropy"].numpy(), entropy(mean), rtol=1e-6)
    np.testing.assert_allclose(maps["ensemble_mi"].numpy(), entropy(mean) - np.mean([entropy(p) for p in probs], 0),
                               rtol=1e-5, atol=1e-9)
    segs = [p.argmax(0) for p in probs]
    dices = []
    for i in range(3):
        for j in range(i + 1, 3):
            per_class = []
            for c in (1, 2):
                a, b = segs[i] == c, segs[j] == c
                total = a.sum() + b.sum()
                per_class.append(1.0 if total == 0 else 2 * (a & b).sum() / total)
            dices.append(np.mean(per_class))
    assert acc.pairwise_dice_score() == pytest.approx(1 - np.mean(dices), rel=1e-12)
    assert REGISTRY["pairwise_dice"].case_score(maps["pairwise_dice"], type("Case", (), {"ensemble": acc})) == \
        pytest.approx(1 - np.mean(dices), rel=1e-12)
    disagreement = np.mean([(segs[i] != segs[j]) for i in range(3) for j in range(i + 1, 3)], axis=0)
    np.testing.assert_allclose(maps["pairwise_dice"].numpy(), disagreement, rtol=1e-6)


def test_region_based_ensemble_uses_sigmoids_and_region_masks():
    rng = np.random.default_rng(4)
    members = [rng.normal(0, 2, size=(2, 5, 6)) for _ in range(2)]
    acc = FoldEnsemble(region_based=True)
    for logits in members:
        acc.add(torch.from_numpy(logits))
    probs = [1 / (1 + np.exp(-z)) for z in members]
    mean = np.mean(probs, axis=0)

    def binary_entropy(p):
        return (-(p * np.log(p) + (1 - p) * np.log(1 - p))).mean(0)

    np.testing.assert_allclose(acc.mean_entropy().numpy(), binary_entropy(mean), rtol=1e-5)
    masks = [p > 0.5 for p in probs]
    per_region = [1.0 if (masks[0][r].sum() + masks[1][r].sum()) == 0 else
                  2 * (masks[0][r] & masks[1][r]).sum() / (masks[0][r].sum() + masks[1][r].sum()) for r in range(2)]
    assert acc.pairwise_dice_score() == pytest.approx(1 - np.mean(per_region), rel=1e-12)


def test_single_member_has_no_disagreement():
    acc = FoldEnsemble(region_based=False)
    acc.add(torch.randn(3, 4, 5))
    assert acc.pairwise_dice_score() == 0.0
    assert float(acc.disagreement().abs().max()) == 0.0
