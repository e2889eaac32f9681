"""The gate for unusual cases and the accept/review decision: conformal p-values against their definition, the
combined p-value against a brute-force full-conformal computation, its validity by simulation, the drift line
against scipy's binomial test, and every reason and statement."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from nnunet_ood.quality.decision import UNSCORED, DecisionRule
from nnunet_ood.quality.gate import ConformalGate, conformal_p_value, drift_summary, min_cases_for_gate
from nnunet_ood.quality.risk_control import crc_threshold, ltt_threshold


def test_conformal_p_value_is_its_definition():
    rng = np.random.default_rng(0)
    cal = rng.normal(size=40)
    cal[3] = np.nan  # left out
    finite = [c for c in cal if np.isfinite(c)]
    for s in [*rng.normal(size=20), finite[5], 10.0, -10.0]:
        expected = (1 + sum(1 for c in finite if c >= s)) / (len(finite) + 1)
        assert conformal_p_value(cal, s) == pytest.approx(expected)
    assert math.isnan(conformal_p_value(cal, math.nan))
    assert conformal_p_value(finite, 100.0) == 1 / 40  # the smallest reachable: 1 / (n + 1)


def brute_force_combined(cal: np.ndarray, s: np.ndarray) -> float:
    """Full conformal with Fisher's statistic, by loops: each of the n + 1 cases' per-score p-values within the
    augmented set, the sum of their -log, and the share of cases whose sum is at least the test case's."""
    augmented = [*map(list, cal), list(s)]
    m = len(augmented)

    def statistic(i):
        return sum(-math.log(sum(1 for j in range(m) if augmented[j][k] >= augmented[i][k]) / m)
                   for k in range(len(s)))

    t = [statistic(i) for i in range(m)]
    return sum(1 for i in range(m) if t[i] >= t[-1] - 1e-9) / m


def test_combined_p_value_equals_brute_force_and_reduces_to_the_single_score():
    rng = np.random.default_rng(1)
    cal = rng.normal(size=(25, 3))
    gate = ConformalGate({"a": cal[:, 0], "b": cal[:, 1], "c": cal[:, 2]}, level=0.05)
    for _ in range(30):
        s = rng.normal(size=3) * rng.choice([0.5, 1, 3])
        got = gate.test({"a": s[0], "b": s[1], "c": s[2]})
        assert got.p_value == pytest.approx(brute_force_combined(cal, s))
        assert got.per_score["b"] == pytest.approx(conformal_p_value(cal[:, 1], s[1]))
        assert got.unusual == (got.p_value <= 0.05)
    one = ConformalGate({"a": cal[:, 0]})
    for s in rng.normal(size=10):
        assert one.test({"a": s}).p_value == pytest.approx(conformal_p_value(cal[:, 0], s))


def test_combined_gate_keeps_its_level_where_bonferroni_cannot_fire():
    """40 calibration cases, 4 correlated scores, gamma 0.05: Bonferroni (0.0125 < 1/41) could never fire, nor
    could the smallest p-value (its floor is about 4/41); the combined p-value fires on at most gamma of
    exchangeable cases (simulation), close to gamma, and on a case far out in every score."""
    rng = np.random.default_rng(2)
    trials, fired = 3000, 0
    cov = np.full((4, 4), 0.5) + 0.5 * np.eye(4)  # correlated scores, as feature distances are
    for _ in range(trials):
        x = rng.multivariate_normal(np.zeros(4), cov, size=41)
        gate = ConformalGate({f"s{k}": x[:40, k] for k in range(4)}, level=0.05)
        fired += gate.test({f"s{k}": x[40, k] for k in range(4)}).unusual
    assert fired / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert fired / trials > 0.035  # and it does fire, close to its level
    far = gate.test({"s0": 9.0, "s1": 9.0, "s2": 9.0, "s3": 9.0})  # a shift: far out in every distance
    assert far.unusual and far.p_value == pytest.approx(1 / 41)
    assert gate.test({"s0": 0.0, "s1": 9.0, "s2": 0.0, "s3": 0.0}).most_unusual == "s1"


def test_gate_is_inactive_below_its_minimum_and_nan_cases_are_dropped():
    assert min_cases_for_gate(0.05) == 19 and min_cases_for_gate(0.1) == 9
    cal = {"a": list(np.arange(19.0)), "b": [*np.arange(18.0), math.nan]}
    gate = ConformalGate(cal, level=0.05)
    assert gate.n_cases == 18 and not gate.active  # 1 / 19 > 0.05
    assert not gate.test({"a": 100.0, "b": 100.0}).unusual
    assert ConformalGate({"a": list(np.arange(19.0))}, level=0.05).active
    assert not ConformalGate({"a": list(np.arange(50.0))}, level=0.0).active  # 0 = off
    with pytest.raises(Exception, match="same cases"):
        ConformalGate({"a": [1.0, 2.0], "b": [1.0]})


@pytest.mark.parametrize("k,n,expected_count", [(0, 60, "3.0"), (3, 60, "3.0"), (31, 60, "3.0"), (9, 100, "5.0"),
                                                 (2, 6, "0.3"), (30, 400, "20")])
def test_drift_summary_against_scipy(k, n, expected_count):
    p_values = [0.01] * k + [0.5] * (n - k) + [math.nan]  # an unscored case is left out
    line = drift_summary(p_values, 0.05)
    assert line.startswith(f"{k} of {n} cases unusual; expected about {expected_count} on in-distribution data")
    expected = binomtest(k, n, 0.05, alternative="greater").pvalue
    if expected < 0.001:
        assert "p < 0.001" in line
    else:
        assert f"p = {expected:.3g}" in line
    assert ("drift" in line) == (expected < 0.01)


def make_rule(labelled=False, rule="ltt", n_gate=40, level=0.05, accepts=True):
    rng = np.random.default_rng(3)
    risk = rng.random(60) * (0.4 if accepts else 1.0)
    dice = np.where(risk < 0.3, 0.9, 0.2) if accepts else np.full(60, 0.1)
    threshold = ltt_threshold(risk, dice, 0.7, 0.1, 0.9) if rule == "ltt" else crc_threshold(risk, dice, 0.7, 0.1)
    distance = np.arange(float(n_gate))
    calibration = {"mahalanobis": distance, "knn": 2 * distance, "quality": rng.permutation(np.linspace(0, .9, n_gate))}
    gate = ConformalGate(calibration, level, "calibration site" if labelled else "validation")
    return DecisionRule(threshold, "calibration site" if labelled else "fit", labelled, gate)


def test_the_rule_gives_the_run_s_drift_line_only_with_an_active_gate():
    """The prediction prints the drift line through the deciding method's rule (``DecisionRule.drift_line``)."""
    p_values = [0.01, 0.5, None, 0.03, math.nan, 0.9]
    assert make_rule().drift_line(p_values) == drift_summary(p_values, 0.05)
    assert make_rule(n_gate=5).drift_line(p_values) is None  # too few calibration cases for the level: inactive
    assert make_rule(level=0.0).drift_line(p_values) is None  # no gate


def test_every_review_has_its_reason():
    rule = make_rule()
    t = rule.risk.threshold
    assert 0 < t < 1
    typical = {"mahalanobis": 20.0, "knn": 40.0}
    ok = rule.decide(t / 2, {**typical, "quality": t / 2})
    assert ok.accept and ok.reason == ""
    risky = rule.decide(0.52, {**typical, "quality": 0.52})
    assert not risky.accept and risky.reason == f"predicted Dice 0.48 < {1 - t:.2f}"
    far = {"mahalanobis": 1000.0, "knn": 1500.0, "quality": t / 2}  # a shift: far out in both distances
    unusual = rule.decide(t / 2, far)
    cal = np.column_stack([rule.gate.scores[:, k] for k in range(3)])
    expected_p = brute_force_combined(cal, np.array([far[m] for m in rule.gate.names]))
    assert expected_p <= 0.05
    assert not unusual.accept and unusual.reason == f"unusual for mahalanobis (p = {expected_p:.2g})"
    both = rule.decide(0.52, {**far, "quality": 0.52})
    assert both.reason.startswith("predicted Dice 0.48") and "; unusual for" in both.reason
    for scores in ({**typical, "mahalanobis": math.nan, "quality": 0.1}, {**typical, "quality": math.nan}):
        unscored = rule.decide(scores["quality"], scores)
        assert not unscored.accept and unscored.reason == UNSCORED
    nothing = make_rule(accepts=False)
    assert nothing.risk.threshold == -1.0
    assert "nothing is auto-accepted" in nothing.decide(0.0, {**typical, "quality": 0.0}).reason


def test_statements_say_which_guarantee_is_in_force():
    site = make_rule(labelled=True).statement()
    assert site.startswith("Set on 60 labelled cases from your site: with 90% confidence at most 10% of "
                           "auto-accepted segmentations have Dice below 0.7, for scans like those 60.")
    assert "Unusual scans always go to review (p <= 0.05 against 40" in site
    fit = make_rule().statement()
    assert fit.startswith("Estimated on the fold's 60 validation cases") and "no guarantee" in fit
    assert "nnUNetv2_calibrate_ood -l" in fit
    crc = make_rule(labelled=True, rule="crc").statement()
    assert "conformal risk control" in crc and "share of all scans, not of the accepted ones" in crc
    none = make_rule(labelled=True, accepts=False).statement()
    assert "cannot support at most 10%" in none and "every case goes to review" in none
    off = make_rule(n_gate=10).statement()
    assert "check for unusual scans is off: 10 in-distribution calibration cases" in off and "needs 19" in off
