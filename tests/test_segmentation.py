"""Probabilities, entropy, masks and Dice of nnunet_ood.segmentation against numpy, scipy and brute-force counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit, softmax
from scipy.stats import entropy as scipy_entropy

from nnunet_ood.segmentation import (
    binary_entropy,
    class_labels,
    dice,
    entropy,
    foreground_masks,
    predicted_foreground,
    probabilities,
)


def _brute_dice(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> float:
    """Mean Dice over labels by counting voxel by voxel; a label empty in both counts as 1."""
    values = []
    for label in labels:
        inter = n_p = n_r = 0
        for p, r in zip(pred.ravel().tolist(), ref.ravel().tolist()):
            inter += (p == label) and (r == label)
            n_p += p == label
            n_r += r == label
        values.append(1.0 if n_p + n_r == 0 else 2 * inter / (n_p + n_r))
    return sum(values) / len(values)


def _label_dice(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> float:
    a = torch.from_numpy(np.stack([pred == label for label in labels]))
    b = torch.from_numpy(np.stack([ref == label for label in labels]))
    return float(dice(a, b, pred.ndim).mean())


def test_dice_hand_made_cases() -> None:
    ref = np.array([[0, 1, 1, 0], [0, 1, 2, 2], [0, 0, 2, 0]])
    pred = np.array([[0, 1, 0, 0], [1, 1, 2, 0], [0, 0, 2, 2]])
    # label 1: |P|=3, |R|=3, overlap 2 -> 4/6; label 2: |P|=3, |R|=3, overlap 2 -> 4/6
    assert _label_dice(pred, ref, [1, 2]) == pytest.approx(4 / 6)
    # label 3 is empty in both -> counts as 1
    assert _label_dice(pred, ref, [1, 2, 3]) == pytest.approx((4 / 6 + 4 / 6 + 1) / 3)
    assert _label_dice(np.zeros((3, 3)), np.zeros((3, 3)), [1]) == 1.0
    # present only in the prediction -> 0
    assert _label_dice(np.ones((2, 2)), np.zeros((2, 2)), [1]) == 0.0


def test_dice_random_vs_brute_force_with_batch_axes() -> None:
    rng = np.random.default_rng(1)
    pred, ref = rng.integers(0, 3, (2, 2, 4, 7, 9))  # two (B, X, Y, Z) label maps
    a = torch.from_numpy(np.stack([pred == c for c in (1, 2)], axis=1))  # (B, K, X, Y, Z)
    b = torch.from_numpy(np.stack([ref == c for c in (1, 2)], axis=1))
    got = dice(a, b, 3)
    assert got.shape == (2, 2)
    for i in range(2):
        assert float(got[i].mean()) == pytest.approx(_brute_dice(pred[i], ref[i], [1, 2]))


def test_probabilities_and_entropies_match_scipy() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, size=(2, 4, 5, 6))
    p = probabilities(torch.from_numpy(logits), region_based=False, dim=1)
    np.testing.assert_allclose(p.numpy(), softmax(logits, axis=1), rtol=1e-5, atol=1e-7)
    h = entropy(p[0].double(), region_based=False)
    np.testing.assert_allclose(h.numpy(), scipy_entropy(softmax(logits[0], axis=0), axis=0), rtol=1e-5, atol=1e-7)
    sig = probabilities(torch.from_numpy(logits), region_based=True)
    np.testing.assert_allclose(sig.numpy(), expit(logits), rtol=1e-5, atol=1e-7)
    q = expit(logits[0])
    expected = np.mean([scipy_entropy(np.stack([q[r], 1 - q[r]]), axis=0) for r in range(4)], axis=0)
    np.testing.assert_allclose(entropy(sig[0].double(), region_based=True).numpy(), expected, rtol=1e-5, atol=1e-7)
    # certain predictions: zero entropy, no NaN from 0 * log 0
    assert float(binary_entropy(torch.tensor([0.0, 1.0])).abs().max()) == 0.0


def test_foreground_masks_and_predicted_foreground() -> None:
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(size=(3, 5, 4)))
    labels = logits.argmax(0).numpy()
    masks = foreground_masks(torch.softmax(logits, 0), region_based=False).numpy()
    assert masks.shape == (2, 5, 4)
    np.testing.assert_array_equal(masks, np.stack([labels == 1, labels == 2]))
    np.testing.assert_array_equal(predicted_foreground(logits, region_based=False).numpy(), labels > 0)
    regions = torch.sigmoid(logits)
    np.testing.assert_array_equal(foreground_masks(regions, region_based=True).numpy(), regions.numpy() > 0.5)
    np.testing.assert_array_equal(predicted_foreground(logits, region_based=True).numpy(), (logits.numpy() > 0).any(0))


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_class_labels_are_numpys_argmax_first_index_on_ties(dim: int) -> None:
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 3, (4, 5, 6)).astype(np.float32)  # few values: many ties along every axis
    got = class_labels(torch.from_numpy(scores), dim)
    np.testing.assert_array_equal(got.numpy(), np.argmax(scores, axis=dim))  # numpy: the first maximum on ties
    kept = class_labels(torch.from_numpy(scores), dim, keepdim=True)
    np.testing.assert_array_equal(kept.numpy(), np.expand_dims(np.argmax(scores, axis=dim), dim))


def test_foreground_masks_along_the_batch_channel_axis() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 3, 4, 5))  # (B, C, X, Y)
    labels = np.argmax(logits, axis=1)
    masks = foreground_masks(torch.from_numpy(logits), region_based=False, dim=1).numpy()
    np.testing.assert_array_equal(masks, np.stack([labels == 1, labels == 2], axis=1))
