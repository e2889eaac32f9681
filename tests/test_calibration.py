"""Normalisation, thresholds, flags and the fold-combined calibration, against numpy and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_ood.calibration import (
    MethodCalibration,
    calibrated_scores,
    combine_calibrations,
    conformal_threshold,
    min_cases_for,
    normalization_bounds,
    normalize_score,
)
from nnunet_ood.errors import OODStateError


def test_normalize_hand_computed() -> None:
    got = [normalize_score(s, 1.0, 9.0) for s in (0.0, 1.0, 2.0, 5.0, 9.0, 11.0)]
    np.testing.assert_allclose(got, [0.0, 0.0, 0.125, 0.5, 1.0, 1.0])
    assert math.isnan(normalize_score(math.nan, 1.0, 9.0))
    assert normalize_score(3.0, 2.0, 6.0) == pytest.approx(0.25)


def test_normalize_degenerate_and_invalid_bounds() -> None:
    assert [normalize_score(s, 1.0, 1.0) for s in (0.0, 1.0, 2.0)] == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        normalize_score(1.0, 2.0, 1.0)
    with pytest.raises(ValueError):
        normalize_score(1.0, 0.0, math.nan)


def test_from_scores_against_numpy() -> None:
    rng = np.random.default_rng(0)
    train, val = rng.gamma(2.0, 3.0, 40), rng.gamma(2.0, 3.0, 17)
    c = MethodCalibration.from_scores([*train, math.nan], [*val, math.inf], aggregation="max_patch")
    assert (c.low, c.high) == (pytest.approx(train.min()), pytest.approx(2 * train.max()))
    # 17 finite validation scores are too few for a = 0.05 (rank 18 > 17): the threshold is the largest
    assert math.ceil((len(val) + 1) * 0.95) == 18 and c.threshold == max(val) and c.false_alarm_rate == 0.05
    assert (c.n_train_cases, c.n_val_cases, c.aggregation) == (41, 18, "max_patch")
    c = MethodCalibration.from_scores(train, list(val) + list(train), false_alarm_rate=0.2)
    both = sorted([*val, *train])
    assert c.threshold == both[math.ceil((len(both) + 1) * 0.8) - 1]
    # scores that can be negative get the same headroom above the minimum
    assert normalization_bounds([-3.0, -1.0, 2.0]) == (-3.0, 7.0)
    with pytest.raises(OODStateError, match="no finite OOD scores"):
        MethodCalibration.from_scores([math.nan], [1.0])


def test_flags_and_uncalibrated_methods() -> None:
    c = MethodCalibration(low=0.0, high=10.0, threshold=4.0)
    scores = calibrated_scores({"a": 5.0, "b": math.nan, "e": 3.0},
                               {"a": c, "b": c, "e": MethodCalibration.uncalibrated()})
    assert scores["a"] == {"score": 5.0, "normalized": 0.5, "ood": True, "threshold": 4.0}
    assert scores["b"]["ood"] is True and math.isnan(scores["b"]["normalized"])  # NaN is always flagged
    assert scores["e"]["ood"] is False and scores["e"]["threshold"] is None and math.isnan(scores["e"]["normalized"])
    assert c.flag(4.0) is False  # at the threshold: accepted


def test_combined_calibration_averages_folds() -> None:
    a = MethodCalibration(1.0, 4.0, 2.0, 10, 3)
    b = MethodCalibration(3.0, 8.0, 4.0, 12, 2)
    c = combine_calibrations([a, b])
    assert (c.low, c.high, c.threshold, c.n_train_cases, c.n_val_cases) == (2.0, 6.0, 3.0, 22, 5)
    with pytest.raises(OODStateError, match="aggregate"):
        combine_calibrations([a, MethodCalibration(1.0, 2.0, 1.5, aggregation="max_patch")])


@pytest.mark.parametrize("entry, needle", [
    ({"low": "x", "high": 1.0, "threshold": 0.5}, "low"),
    ({"low": 0.0, "high": 1.0}, "expected the fields"),
    ({"low": 0.0, "high": 1.0, "threshold": 0.5, "aggregation": "median"}, "aggregation"),
    ({"low": 0.0, "high": 1.0, "threshold": 0.5, "n_train_cases": 2.5}, "n_train_cases"),
    ({"low": 0.0, "high": 1.0, "threshold": 0.5, "colour": 1}, "expected the fields"),
    ([0.0, 1.0, 0.5], "expected the fields"),
])
def test_manifest_entries_of_the_wrong_type_are_refused(entry, needle) -> None:
    with pytest.raises(OODStateError, match=needle):
        MethodCalibration.from_json(entry, "somewhere")
    good = MethodCalibration(0.0, 1.0, 0.5, 3, 2, "foreground_mean")
    assert MethodCalibration.from_json(good.to_json(), "somewhere") == good


def test_conformal_threshold_is_the_rank_rule() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 5, 19, 20, 57, 200):
        scores = list(rng.normal(size=n))
        for a in (0.05, 0.1, 0.3):
            k = math.ceil((n + 1) * (1 - a))  # 1-based rank among the sorted scores
            t, enough = conformal_threshold(scores + [math.nan], a)
            assert enough == (k <= n)
            assert t == sorted(scores)[min(k, n) - 1]
    assert min_cases_for(0.05) == 19 and min_cases_for(0.1) == 9
    # exact products are not pushed up by rounding: n = 99, a = 0.05 -> rank 95
    assert conformal_threshold(list(range(1, 100)), 0.05)[0] == 95


def test_conformal_threshold_keeps_the_false_alarm_rate_over_random_splits() -> None:
    """Simulation: over many calibration/new-case draws, a new ID case is flagged with probability <= a."""
    rng = np.random.default_rng(0)
    for n, a in ((30, 0.05), (100, 0.1), (19, 0.05)):
        flags = []
        for _ in range(4000):
            scores = rng.gamma(2.0, 1.0, n + 1)
            t, _ = conformal_threshold(list(scores[:n]), a)
            flags.append(scores[n] > t)
        rate = float(np.mean(flags))
        # the exact rate is 1 - k / (n + 1) <= a; allow three binomial standard errors of sampling noise
        k = math.ceil((n + 1) * (1 - a))
        assert abs(rate - (1 - k / (n + 1))) < 3 * math.sqrt(a * (1 - a) / 4000)
        assert rate <= a + 3 * math.sqrt(a * (1 - a) / 4000)
