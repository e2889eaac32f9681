"""Metrics against independent references (sklearn, scipy, brute-force counts)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from nnunet_ood.metrics import auroc, average_ranks, dice_per_case, normalize_scores, spearman


def _sk_auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    return float(roc_auc_score(y, np.r_[neg, pos]))


def _brute_dice(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> float:
    vals = []
    for lab in labels:
        inter = n_p = n_r = 0
        for p, r in zip(pred.ravel().tolist(), ref.ravel().tolist()):
            inter += (p == lab) and (r == lab)
            n_p += p == lab
            n_r += r == lab
        vals.append(1.0 if n_p + n_r == 0 else 2 * inter / (n_p + n_r))
    return sum(vals) / len(vals)


# ---------------------------------------------------------------- Dice
def test_dice_hand_made_cases() -> None:
    ref = np.array([[0, 1, 1, 0], [0, 1, 2, 2], [0, 0, 2, 0]])
    pred = np.array([[0, 1, 0, 0], [1, 1, 2, 0], [0, 0, 2, 2]])
    # label 1: |P|=3, |R|=3, overlap 2 -> 4/6; label 2: |P|=3, |R|=3, overlap 2 -> 4/6
    assert dice_per_case(pred, ref, [1, 2]) == pytest.approx(4 / 6)
    assert dice_per_case(pred, ref, [1, 2]) == pytest.approx(_brute_dice(pred, ref, [1, 2]))
    # label 3 is empty in both -> counts as 1
    assert dice_per_case(pred, ref, [1, 2, 3]) == pytest.approx((4 / 6 + 4 / 6 + 1) / 3)
    assert dice_per_case(np.zeros((3, 3)), np.zeros((3, 3)), [1]) == 1.0
    # present only in the prediction -> 0
    assert dice_per_case(np.ones((2, 2)), np.zeros((2, 2)), [1]) == 0.0


def test_dice_random_vs_brute_force() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        pred, ref = rng.integers(0, 3, (2, 7, 9))
        assert dice_per_case(pred, ref, [1, 2]) == pytest.approx(_brute_dice(pred, ref, [1, 2]))


def test_dice_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        dice_per_case(np.zeros((2, 2)), np.zeros((2, 3)), [1])
    with pytest.raises(ValueError):
        dice_per_case(np.zeros((2, 2)), np.zeros((2, 2)), [])


# ---------------------------------------------------------------- ranks / AUROC
def test_average_ranks_with_ties_and_inf() -> None:
    np.testing.assert_allclose(average_ranks([3.0, 1.0, 3.0, np.inf, 2.0, np.inf]),
                               [3.5, 1.0, 3.5, 5.5, 2.0, 5.5])


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        neg = rng.integers(0, 6, rng.integers(1, 15)).astype(float)
        pos = rng.integers(2, 8, rng.integers(1, 15)).astype(float)
        assert auroc(neg, pos) == pytest.approx(_sk_auroc(neg, pos))


def test_auroc_extremes_and_all_tied() -> None:
    assert auroc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert auroc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5


def test_auroc_nan_counts_as_maximally_uncertain() -> None:
    neg = np.array([0.1, np.nan, 0.5, 0.3])
    pos = np.array([0.4, np.nan, np.nan, 0.2, 0.9])
    big = 1e12
    expected = _sk_auroc(np.nan_to_num(neg, nan=big), np.nan_to_num(pos, nan=big))
    assert auroc(neg, pos) == pytest.approx(expected)


def test_auroc_empty_side_is_nan() -> None:
    assert math.isnan(auroc([], [1.0]))
    assert math.isnan(auroc([1.0], []))


# ---------------------------------------------------------------- normalisation
def test_normalize_hand_computed() -> None:
    out = normalize_scores([0.0, 1.0, 2.0, 5.0, 9.0, 11.0, np.nan], low=1.0, high=9.0)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.125, 0.5, 1.0, 1.0, np.nan])
    assert float(normalize_scores(3.0, 2.0, 6.0)) == pytest.approx(0.25)


def test_normalize_degenerate_and_invalid_bounds() -> None:
    np.testing.assert_array_equal(normalize_scores([0.0, 1.0, 2.0], 1.0, 1.0), [0.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        normalize_scores([1.0], 2.0, 1.0)
    with pytest.raises(ValueError):
        normalize_scores([1.0], 0.0, np.nan)


# ---------------------------------------------------------------- Spearman
def test_spearman_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        n = int(rng.integers(3, 30))
        x = rng.integers(0, 5, n).astype(float)
        y = x + rng.integers(0, 4, n)
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)


def test_spearman_omits_nan_pairs_and_constant_is_nan() -> None:
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 3.0])
    y = np.array([2.0, 1.0, 3.0, np.nan, 5.0, 5.0])
    assert spearman(x, y) == pytest.approx(spearmanr(x, y, nan_policy="omit").statistic)
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0], [2.0]))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
