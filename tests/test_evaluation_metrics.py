"""Metrics against independent references (sklearn, scipy, brute-force counts)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score

from nnunet_ood.evaluation.metrics import (
    aurc,
    auroc,
    average_ranks,
    coverage_at_risk,
    dice_prediction_errors,
    e_aurc,
    esce,
    failure_rate_upper_bound,
    oracle_aurc,
    oracle_risk_coverage_curve,
    pearson,
    risk_coverage_curve,
    selective_outcomes,
    spearman,
    threshold_metrics,
)


def _sk_auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    return float(roc_auc_score(y, np.r_[neg, pos]))


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


def _aurc_brute_force(u, r):
    """Selective risk at every coverage k/n: accept the k least uncertain, widened to whole tie groups."""
    u, r = np.asarray(u, float), np.asarray(r, float)
    n, total = len(u), 0.0
    for k in range(1, n + 1):
        threshold = np.sort(u)[k - 1]
        accepted = u <= threshold  # a tie group is accepted as a whole
        total += r[accepted].mean()
    return total / n


@pytest.mark.parametrize("seed", range(5))
def test_aurc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 6, size=40).astype(float)  # many ties
    r = rng.uniform(size=40)
    assert aurc(u, r) == pytest.approx(_aurc_brute_force(u, r), rel=1e-12)
    oracle = np.mean([np.sort(r)[:k].mean() for k in range(1, len(r) + 1)])  # the k lowest risks, each k
    assert e_aurc(u, r) == pytest.approx(_aurc_brute_force(u, r) - oracle, rel=1e-12)
    assert e_aurc(r, r) == pytest.approx(0.0, abs=1e-15)


def test_e_aurc_is_never_negative_with_tied_risks():
    # many equal risks (e.g. Dice 0.5 on a whole domain): grouping them would make the oracle worse than
    # a real ranking; the oracle accepts them one at a time
    rng = np.random.default_rng(11)
    for _ in range(20):
        r = rng.choice([0.0, 0.1, 0.5, 1.0], size=30)
        u = rng.integers(0, 4, size=30).astype(float)
        assert e_aurc(u, r) >= -1e-15
        assert e_aurc(r + 1e-9 * rng.uniform(size=30), r) >= -1e-15


def test_aurc_hand_computed():
    # accepted in order: risks 0, 1, then the tie group {0.5, 0.5}: risks 0, 1/2, 1/2, 1/2 at k = 1..4
    assert aurc([0.1, 0.2, 0.3, 0.3], [0.0, 1.0, 0.5, 0.0]) == pytest.approx((0 + 0.5 + 0.375 + 0.375) / 4)


def test_esce_hand_computed():
    u = [0.05, 0.05, 0.55, 1.0]
    d = [0.9, 0.7, 0.2, 0.1]
    # bin 0: mean Dice 0.8, 1 - mean u 0.95 -> 0.15, weight 2/4; bin 5: |0.2 - 0.45| = 0.25, 1/4;
    # bin 9 (u = 1 goes in the last bin): |0.1 - 0| = 0.1, 1/4
    assert esce(u, d) == pytest.approx(0.5 * 0.15 + 0.25 * 0.25 + 0.25 * 0.1)
    with pytest.raises(ValueError):
        esce([1.5], [0.5])


def test_threshold_metrics_hand_computed():
    id_val = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21]
    # numpy's linear 95th percentile of these 20 values: 19 + 0.05 * (21 - 19) = 19.1
    out = threshold_metrics(id_val, id_test=[5, 19, 20, 30], ood=[19.1, 50, 60, 70, 80])
    assert out["threshold"] == pytest.approx(19.1)
    assert out["tpr"] == pytest.approx(0.5) and out["fpr"] == pytest.approx(0.2)
    assert out["detection_error"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.2)
    assert math.isnan(threshold_metrics([], [1], [2])["tpr"])
    # a NaN score is rejected: it lowers the TPR and never counts as an accepted shifted case
    out = threshold_metrics(id_val, id_test=[5, 19, math.nan, 30], ood=[19.1, math.nan, 60, 70, 80])
    assert out["tpr"] == pytest.approx(0.5) and out["fpr"] == pytest.approx(0.2)


# ---------------------------------------------------------------- risk-coverage curve
def _curve_brute_force(u, r):
    """Every k = 1..n: accept the k least uncertain widened to whole tie groups; keep each distinct acceptance."""
    u, r = np.asarray(u, float), np.asarray(r, float)
    points = {}
    for k in range(1, len(u) + 1):
        accepted = u <= np.sort(u)[k - 1]
        points[int(accepted.sum())] = r[accepted].mean()
    counts = sorted(points)
    return np.array(counts) / len(u), np.array([points[c] for c in counts])


@pytest.mark.parametrize("seed", range(4))
def test_risk_coverage_curve_matches_brute_force_and_its_area_is_aurc(seed):
    rng = np.random.default_rng(seed)
    for u in (rng.uniform(size=25), rng.integers(0, 5, size=25).astype(float)):  # without and with ties
        r = rng.uniform(size=25)
        coverage, risk = risk_coverage_curve(u, r)
        expected_coverage, expected_risk = _curve_brute_force(u, r)
        np.testing.assert_allclose(coverage, expected_coverage, rtol=0, atol=1e-15)
        np.testing.assert_allclose(risk, expected_risk, rtol=1e-12)
        # the step function: risk_j on (coverage_{j-1}, coverage_j]
        area = sum((c - c0) * y for c0, c, y in zip(np.r_[0.0, expected_coverage], expected_coverage, expected_risk))
        assert aurc(u, r) == pytest.approx(area, rel=1e-12)
        assert aurc(u, r) == pytest.approx(_aurc_brute_force(u, r), rel=1e-12)


def test_oracle_curve_is_the_mean_of_the_k_smallest_risks():
    r = np.array([0.4, 0.1, 0.1, 0.9, 0.0])
    coverage, risk = oracle_risk_coverage_curve(r)
    np.testing.assert_allclose(coverage, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.05, 0.2 / 3, 0.15, 0.3])
    assert np.sum(np.diff(np.r_[0.0, coverage]) * risk) == pytest.approx(oracle_aurc(r))


# ---------------------------------------------------------------- decisions and predicted Dice
def test_selective_outcomes_against_counts():
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(1, 20))
        accepted, dice = rng.random(n) < 0.6, rng.uniform(size=n)
        silent = sum(1 for a, d in zip(accepted, dice) if a and d < 0.6)
        out = selective_outcomes(accepted, dice, 0.6)
        assert out["coverage"] == pytest.approx(sum(accepted) / n)
        assert out["silent_rate"] == pytest.approx(silent / n)
        if sum(accepted):
            assert out["silent_rate_accepted"] == pytest.approx(silent / sum(accepted))
        else:
            assert math.isnan(out["silent_rate_accepted"])
    # a failure is strictly below the threshold
    assert selective_outcomes([True, True], [0.6, 0.59], 0.6)["silent_rate"] == 0.5
    assert all(math.isnan(v) for v in selective_outcomes([], [], 0.6).values())


def test_pearson_and_dice_prediction_errors():
    rng = np.random.default_rng(6)
    x, y = rng.uniform(size=15), rng.uniform(size=15)
    assert pearson(x, y) == pytest.approx(pearsonr(x, y).statistic)
    assert math.isnan(pearson([0.3, 0.3, 0.3], [0.1, 0.5, 0.9]))  # constant: undefined, not a rounding artefact
    assert math.isnan(pearson([0.3], [0.1]))
    predicted = np.array([0.9, np.nan, 0.5, 0.7])
    dice = np.array([0.8, 0.1, 0.6, 0.75])
    out = dice_prediction_errors(predicted, dice)
    assert out["dice_mae"] == pytest.approx((0.1 + 0.1 + 0.05) / 3)  # the NaN prediction is left out
    assert out["dice_pearson"] == pytest.approx(pearsonr([0.9, 0.5, 0.7], [0.8, 0.6, 0.75]).statistic)
    assert all(math.isnan(v) for v in dice_prediction_errors([np.nan], [0.5]).values())


@pytest.mark.parametrize("n", [1, 2, 5, 10, 22, 60, 200])
def test_failure_rate_upper_bound_matches_scipy_binomtest(n):
    from scipy.stats import binom, binomtest

    for k in range(n + 1):
        ours = failure_rate_upper_bound(k, n)
        # one-sided 95% upper bound = the upper end of the two-sided exact 90% interval
        theirs = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").high
        assert ours == pytest.approx(theirs, abs=1e-9), (k, n)
        if k < n:  # the definition: at the bound, k or fewer failures have probability 5%
            assert binom.cdf(k, n, ours) == pytest.approx(0.05, abs=1e-7)
    assert failure_rate_upper_bound(0, n) == pytest.approx(1 - 0.05 ** (1 / n))  # no failure: closed form


def test_failure_rate_upper_bound_edges():
    assert math.isnan(failure_rate_upper_bound(0, 0))
    assert failure_rate_upper_bound(3, 3) == 1.0
    with pytest.raises(ValueError):
        failure_rate_upper_bound(4, 3)


def brute_force_coverage_at_risk(u: np.ndarray, failed: np.ndarray, alpha: float) -> float:
    """Every threshold: nothing accepted, or each distinct finite score (u <= t); the best allowed coverage."""
    best = 0.0
    for t in sorted(set(u[~np.isnan(u)].tolist())):
        accepted = u <= t  # NaN <= t is False: never accepted
        if np.mean(failed[accepted]) <= alpha:
            best = max(best, float(np.mean(accepted)))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_coverage_at_risk_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    u = rng.integers(0, 8, size=n).astype(float) if seed % 2 else rng.normal(size=n)  # ties on even seeds
    if seed % 3 == 0:
        u[rng.random(n) < 0.2] = np.nan
    failed = rng.random(n) < rng.uniform(0.0, 0.5)
    for alpha in (0.0, 0.05, 0.1, 0.2, 0.5, 1.0):
        assert coverage_at_risk(u, failed, alpha) == pytest.approx(brute_force_coverage_at_risk(u, failed, alpha)), \
            (seed, alpha)


def test_coverage_at_risk_hand_computed():
    u = np.array([0.1, 0.2, 0.2, 0.3, 0.4, np.nan])
    failed = np.array([False, False, True, False, False, False])
    # thresholds: 0.1 -> 1 of 6, 0 failed; 0.2 -> 3 (ties together), 1 failed = 1/3; 0.3 -> 4, 1/4; 0.4 -> 5, 1/5
    assert coverage_at_risk(u, failed, 0.2) == pytest.approx(5 / 6)
    assert coverage_at_risk(u, failed, 0.1) == pytest.approx(1 / 6)
    assert coverage_at_risk(u, failed, 0.0) == pytest.approx(1 / 6)
    assert coverage_at_risk(np.array([0.1]), np.array([True]), 0.1) == 0.0  # nothing can be accepted
    assert math.isnan(coverage_at_risk(np.array([]), np.array([], dtype=bool), 0.1))
