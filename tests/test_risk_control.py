"""Conformal risk control of silent failures: exact against brute force, and its guarantee by simulation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nnunet_ood.errors import OODInputError, OODStateError
from nnunet_ood.quality.risk_control import (
    NOTHING,
    RiskThreshold,
    choose_threshold,
    crc_threshold,
    decide,
    ltt_threshold,
    min_cases_ltt,
    min_groups_for,
)
from nnunet_ood.quality.table import read_out_of_fold_risks

TOL = 1e-9


def brute_force(risk, dice, fail_below, alpha, groups=None):
    """Loop over every candidate t and every unit: the definition, written as plainly as possible."""
    risk, dice = np.asarray(risk, float), np.asarray(dice, float)
    groups = list(range(len(risk))) if groups is None else list(groups)
    units = sorted(set(groups), key=str)
    n = len(units)
    failed = [not (d >= fail_below) for d in dice]

    def losses(t):
        out = []
        for u in units:
            rows = [i for i in range(len(risk)) if groups[i] == u]
            out.append(sum(1 for i in rows if risk[i] <= t and failed[i]) / len(rows))
        return out

    best = None
    for t in sorted({float(r) for r in risk if np.isfinite(r)}):
        if (sum(losses(t)) + 1) <= alpha * (n + 1) + TOL:
            best = t
    enough = 1 <= alpha * (n + 1) + TOL
    if best is None or not enough:
        return -1.0, enough, 0.0, 0.0
    return best, enough, sum(losses(best)) / n, float(np.mean(risk <= best))


def random_instance(rng, n_rows, with_groups, ties, nans):
    risk = rng.random(n_rows)
    if ties:
        risk = np.round(risk, 1)
    if nans:
        risk[rng.random(n_rows) < 0.15] = np.nan
    dice = rng.random(n_rows)
    dice[rng.random(n_rows) < 0.05] = np.nan
    dice = np.where(np.isnan(dice) | (rng.random(n_rows) < 0.5), dice, np.clip(1 - risk + 0.1, 0, 1))
    groups = [f"case{g}" for g in rng.integers(0, max(1, n_rows // 3), n_rows)] if with_groups else None
    return risk, dice, groups


@pytest.mark.parametrize("with_groups", [False, True])
@pytest.mark.parametrize("ties,nans", [(False, False), (True, False), (False, True), (True, True)])
def test_threshold_equals_brute_force(with_groups, ties, nans):
    rng = np.random.default_rng(hash((with_groups, ties, nans)) % 2**32)
    for _ in range(40):
        n_rows = int(rng.integers(1, 60))
        alpha = float(rng.choice([0.05, 0.1, 0.2, 0.3, 0.5]))
        fail_below = float(rng.choice([0.3, 0.5, 0.8, 1.0]))
        risk, dice, groups = random_instance(rng, n_rows, with_groups, ties, nans)
        got = crc_threshold(risk, dice, fail_below, alpha, groups)
        threshold, enough, rate, coverage = brute_force(risk, dice, fail_below, alpha, groups)
        assert got.threshold == threshold
        assert got.enough == enough
        assert got.empirical_rate == pytest.approx(rate)
        assert got.coverage == pytest.approx(coverage)
        assert got.n_groups == (n_rows if groups is None else len(set(groups)))
        assert np.array_equal(decide(risk, got.threshold), risk <= threshold)


def test_boundary_of_enough_and_min_groups():
    assert min_groups_for(0.05) == 19
    assert min_groups_for(0.1) == 9
    assert min_groups_for(0.5) == 1
    assert min_groups_for(0.3) == 3  # 1/4 <= 0.3 < 1/3
    for alpha in (0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 0.7):
        n = min_groups_for(alpha)
        assert 1 / (n + 1) <= alpha + TOL and (n == 1 or 1 / n > alpha)
    # 19 perfect cases (never failing): everything is accepted; 18: nothing can be
    risk = np.linspace(0, 0.5, 19)
    ok = crc_threshold(risk, np.ones(19), 0.6, 0.05)
    assert ok.enough and ok.threshold == 0.5 and ok.coverage == 1.0 and ok.empirical_rate == 0.0
    few = crc_threshold(risk[:18], np.ones(18), 0.6, 0.05)
    assert not few.enough and few.threshold == -1.0 and few.coverage == 0.0
    assert not decide(risk[:18], few.threshold).any()
    # 19 rows of 2 cases are 2 units: not enough
    assert not crc_threshold(risk, np.ones(19), 0.6, 0.05, ["a"] * 10 + ["b"] * 9).enough


def test_nan_risk_is_review_and_groups_are_units():
    # one failing case with 4 versions: as 4 units each adds loss 1; as one unit only 1 in total
    risk = np.array([0.1, 0.1, 0.1, 0.1] + [0.2] * 36)
    dice = np.array([0.1] * 4 + [0.9] * 36)
    rows = crc_threshold(risk, dice, 0.6, 0.1)
    grouped = crc_threshold(risk, dice, 0.6, 0.1, ["bad"] * 4 + [f"c{i}" for i in range(36)])
    assert rows.threshold == -1.0 and rows.enough  # (4 + 1) / 41 > 0.1
    assert grouped.threshold == 0.2 and grouped.n_groups == 37  # (1 + 1) / 38 <= 0.1
    assert grouped.empirical_rate == pytest.approx(1 / 37)
    with_nan = risk.copy()
    with_nan[:4] = np.nan  # the failing case could not be scored: never accepted
    t = crc_threshold(with_nan, dice, 0.6, 0.1)
    assert t.threshold == 0.2 and t.coverage == pytest.approx(36 / 40)
    assert decide(np.nan, 1.0).item() is False and decide(0.3, 0.3).item() is True


def test_bad_input():
    with pytest.raises(OODInputError, match="silent failures"):
        crc_threshold([0.1], [0.9], 0.5, 0.0)
    with pytest.raises(OODInputError, match="silent failures"):
        min_groups_for(1.0)
    with pytest.raises(OODInputError, match="fail_below"):
        crc_threshold([0.1], [0.9], 1.5, 0.1)
    with pytest.raises(OODInputError, match="one of each"):
        crc_threshold([0.1, 0.2], [0.9], 0.5, 0.1)
    with pytest.raises(OODInputError, match="one of each"):
        crc_threshold([0.1, 0.2], [0.9, 0.8], 0.5, 0.1, ["a"])
    with pytest.raises(OODInputError, match=r"\[0, 1\]"):
        crc_threshold([0.1, np.inf], [0.9, 0.8], 0.5, 0.1)
    with pytest.raises(OODInputError, match="no calibration rows"):
        crc_threshold([], [], 0.5, 0.1)


def test_risk_threshold_json_round_trip_and_corruption():
    t = crc_threshold(np.linspace(0, 1, 50), np.linspace(1, 0, 50), 0.5, 0.1)
    obj = json.loads(json.dumps(t.to_json()))
    assert RiskThreshold.from_json(obj, "here") == t
    corruptions = [
        {k: v for k, v in obj.items() if k != "alpha"},  # missing
        {**obj, "extra": 1},  # extra
        {**obj, "threshold": "0.5"},  # type
        {**obj, "n_groups": 3.0},
        {**obj, "n_groups": -1},
        {**obj, "enough": 1},
        {**obj, "alpha": float("nan")},  # non-finite
        {**obj, "coverage": float("inf")},
        {**obj, "alpha": 1.5},  # range
        {**obj, "enough": False},  # not enough but a threshold that accepts
        [obj],
    ]
    for bad in corruptions:
        with pytest.raises(OODStateError, match="here.*re-fit with nnUNetv2_fit_ood"):
            RiskThreshold.from_json(bad, "here")


# ---------------------------------------------------------------------------------------------- the guarantee
def simulate(rng, trials, n_cases, versions, offset=-1.5):
    """(risk, dice) of trials x cases x versions. A case effect is shared by its versions in the true Dice and in
    the quality model's error (on the logit scale, so no ties): versions of one case are correlated."""
    shape = (trials, n_cases, versions)
    severity = np.arange(versions) * 0.8  # version 0 clean, then more and more corrupted
    logit = rng.normal(size=(trials, n_cases, 1)) + severity + offset + 0.5 * rng.normal(size=shape)
    dice = 1 / (1 + np.exp(logit))
    model_error = 0.5 * rng.normal(size=(trials, n_cases, 1)) + 0.5 * rng.normal(size=shape)
    risk = 1 / (1 + np.exp(-(logit + model_error)))
    return risk, dice


def realised_loss(risk, dice, thresholds, fail_below):
    """Per trial, the mean over test units of each unit's share of accepted-and-failed rows."""
    silent = (risk <= thresholds[:, None, None]) & (dice < fail_below)
    return silent.mean(axis=2).mean(axis=1)


def naive_threshold(risk, dice, fail_below, alpha):
    """The largest t whose empirical mean unit loss is <= alpha (no + B, n instead of n + 1); risks without ties."""
    n_units, versions = risk.shape
    r = risk.ravel()
    order = np.argsort(r)
    mean_loss = np.cumsum(((dice < fail_below) / versions).ravel()[order]) / n_units
    k = np.count_nonzero(mean_loss <= alpha)
    return r[order][k - 1] if k else -1.0


def run_trials(seed, trials, n_cal, n_test, versions, alpha, fail_below, offset=-1.5, grouped=True):
    """Realised test losses (per trial) of the CRC threshold and of the naive one, each from a fresh calibration
    set of n_cal cases; the test cases are new cases from the same distribution."""
    risk, dice = simulate(np.random.default_rng(seed), trials, n_cal + n_test, versions, offset)
    groups = np.repeat([f"case{i}" for i in range(n_cal)], versions) if grouped else None
    crc = np.empty(trials)
    naive = np.empty(trials)
    for k in range(trials):
        cal_risk, cal_dice = risk[k, :n_cal], dice[k, :n_cal]
        crc[k] = crc_threshold(cal_risk.ravel(), cal_dice.ravel(), fail_below, alpha, groups).threshold
        naive[k] = naive_threshold(cal_risk, cal_dice, fail_below, alpha)
    assert np.all(naive >= crc)  # the naive threshold is never the stricter one
    assert (dice < fail_below).mean() > 3 * alpha  # accepting everything would break the target: work to do
    return (realised_loss(risk[:, n_cal:], dice[:, n_cal:], crc, fail_below),
            realised_loss(risk[:, n_cal:], dice[:, n_cal:], naive, fail_below))


def mc_tolerance(losses):
    return 3 * losses.std() / np.sqrt(len(losses))


def test_crc_guarantee_with_correlated_versions():
    """30 cases of 3 correlated versions, 3000 calibration/test draws: the expected share of silent failures per
    case is <= alpha, and not far below it (CRC's own lower bound is alpha - 2 / (n + 1) = 0.035)."""
    alpha = 0.1
    crc, naive = run_trials(0, 3000, 30, 60, 3, alpha, 0.6)
    assert crc.mean() <= alpha + mc_tolerance(crc)
    assert crc.mean() > alpha / 2  # about 0.072: tight, not absurdly conservative
    # without the correction the threshold is looser: a clearly higher rate, and above alpha (about 0.104), so the
    # check above detects a method that does not control the risk
    assert naive.mean() > crc.mean() + mc_tolerance(naive) + mc_tolerance(crc)
    assert naive.mean() > alpha + mc_tolerance(naive)


def test_crc_guarantee_one_row_per_case():
    """groups=None (every row its own unit) on single-version cases: the same guarantee."""
    alpha = 0.2
    crc, naive = run_trials(1, 1000, 20, 60, 1, alpha, 0.6, offset=0.0, grouped=False)
    assert alpha / 2 < crc.mean() <= alpha + mc_tolerance(crc)
    assert naive.mean() > crc.mean() + mc_tolerance(naive) + mc_tolerance(crc)


# ------------------------------------------------------------------------------------ several folds pooled


def fold_params(rng, n_cases, versions, fail_below=0.6, alpha=0.05):
    """A quality method's stored parameters with a failure table of ``n_cases`` cases (``versions`` rows each;
    the same case names in every fold, as if two folds' validation cases shared names)."""
    lines = ["case,version,corruption,severity,dice,oof_risk,tta"]
    for c in range(n_cases):
        for v in range(versions):
            risk = rng.random()
            dice = float(np.clip(1 - risk + rng.normal(0, 0.2), 0, 1))
            shown = "" if rng.random() < 0.05 else repr(risk)  # a row the quality fit left out: NaN risk
            lines.append(f"case{c},{v},{'none' if v == 0 else 'blur'},{v},{dice!r},{shown},{rng.random()!r}")
    return {"fail_below": fail_below, "max_silent_failures": alpha, "table_csv": "\n".join(lines) + "\n"}


def pooled_rows(params_list):
    """Brute-force reading of the tables: (risk, dice, unit) per row, a unit being (fold, case)."""
    risk, dice, units = [], [], []
    for k, params in enumerate(params_list):
        header, *rows = [line.split(",") for line in params["table_csv"].strip().split("\n")]
        for row in rows:
            r = dict(zip(header, row))
            risk.append(float(r["oof_risk"]) if r["oof_risk"] else np.nan)
            dice.append(float(r["dice"]))
            units.append((k, r["case"]))
    return risk, dice, units


def test_several_folds_choose_the_quality_threshold_on_their_cases_pooled():
    from types import SimpleNamespace

    from nnunet_ood.calibration import MethodCalibration
    from nnunet_ood.inference.thresholds import fold_calibration
    from nnunet_ood.methods import REGISTRY

    rng = np.random.default_rng(3)
    quality = REGISTRY.get("quality")
    params = [fold_params(rng, 12, 3) for _ in range(5)]  # 12 cases a fold: too few for 0.05 alone
    own = [MethodCalibration(0.0, 1.0, -1.0, n_val_cases=12, false_alarm_rate=0.05) for _ in params]
    states = [SimpleNamespace(calibration={"quality": c}, method_params={"quality": p}) for c, p in zip(own, params)]
    combined = fold_calibration([quality], states)["quality"]
    risk, dice, units = pooled_rows(params)
    expected, enough, _, _ = brute_force(risk, dice, 0.6, 0.05, units)
    assert enough and expected > 0  # 60 units support 0.05
    assert combined.threshold == pytest.approx(expected, abs=0)
    assert combined.n_val_cases == 60 and combined.false_alarm_rate == 0.05
    assert (combined.low, combined.high) == (0.0, 1.0)
    # one fold keeps its own threshold (the fit's, from the same table)
    assert fold_calibration([quality], states[:1])["quality"] == own[0]
    # the other methods still average their folds' thresholds
    averaged = fold_calibration([REGISTRY.get("tta")], [SimpleNamespace(
        calibration={"tta": MethodCalibration(0.0, 1.0, t)}, method_params={}) for t in (0.2, 0.4)])["tta"]
    assert averaged.threshold == pytest.approx(0.3)


def test_several_folds_need_one_rule_and_every_table():
    from nnunet_ood.calibration import MethodCalibration
    from nnunet_ood.methods import REGISTRY

    rng = np.random.default_rng(4)
    quality = REGISTRY.get("quality")
    own = [MethodCalibration(0.0, 1.0, 0.1)] * 2
    other_rule = [fold_params(rng, 10, 2), fold_params(rng, 10, 2, alpha=0.1)]
    with pytest.raises(OODStateError, match="different rules.*nnUNetv2_fit_ood.*--ood"):
        quality.combine_fold_calibrations(own, other_rule)
    lost_table = [fold_params(rng, 10, 2), {**fold_params(rng, 10, 2), "table_csv": ""}]
    with pytest.raises(OODStateError, match="fold 2 of 2.*missing.*nnUNetv2_fit_ood.*--ood"):
        quality.combine_fold_calibrations(own, lost_table)
    lost_table[1]["_table_file"] = "/models/fold_1/ood/quality_calibration.csv"  # as the loaded state says
    with pytest.raises(OODStateError, match=r"table \(/models/fold_1/ood/quality_calibration.csv\) is missing"):
        quality.combine_fold_calibrations(own, lost_table)
    no_risks = [fold_params(rng, 10, 2), {**fold_params(rng, 10, 2), "table_csv": "case,dice\ncase0,0.5\n"}]
    with pytest.raises(OODStateError, match="oof_risk"):
        quality.combine_fold_calibrations(own, no_risks)


@pytest.mark.parametrize("n_folds, expected", [(1, "fit"), (5, "fit, 5 folds pooled")])
def test_decision_rules_say_where_the_quality_threshold_comes_from(n_folds, expected):
    from types import SimpleNamespace

    from nnunet_ood.inference.outputs import PredictionOutputs
    from nnunet_ood.inference.thresholds import decision_rules
    from nnunet_ood.methods import REGISTRY

    rng = np.random.default_rng(5)
    params = []
    for _ in range(n_folds):
        p = {**fold_params(rng, 12, 3, fail_below=0.7), "risk_control": "ltt", "confidence": 0.9,
             "inputs": ["tta"]}
        cases, risk, dice = read_out_of_fold_risks(p["table_csv"])
        p["risk_threshold"] = ltt_threshold(risk, dice, 0.7, 0.05, 0.9, cases).to_json()
        params.append(p)
    states = [SimpleNamespace(method_params={"quality": p}) for p in params]
    rules = decision_rules([REGISTRY.get("mahalanobis"), REGISTRY.get("quality")], states, None, None)
    predictor = SimpleNamespace(ood_decisions=rules)
    recorded = PredictionOutputs(predictor).decision_rules()
    assert list(recorded) == ["quality"]  # only the method that decides
    q = recorded["quality"]
    assert (q["rule"], q["fail_below"], q["max_silent_failures"], q["confidence"]) == ("ltt", 0.7, 0.05, 0.9)
    assert q["threshold_from"] == expected and q["guarantee"] is False
    assert q["statement"].startswith("Estimated on") and "no guarantee" in q["statement"]
    assert q["calibration_cases"] == 12 * n_folds


def test_labelled_calibration_is_the_quality_method_s_own_choose_threshold(capsys):
    """nnUNetv2_calibrate_ood -l reaches quality's threshold through the method object: each setting is the flag's
    value, else the fit's, else the option's default, and the threshold is :func:`choose_threshold`'s."""
    from nnunet_ood.cli.calibrate import build_parser
    from nnunet_ood.methods import REGISTRY

    quality = REGISTRY.get("quality")
    rng = np.random.default_rng(11)
    cases = [f"case_{i:02d}" for i in range(40)]
    risks = {c: float(r) for c, r in zip(reversed(cases), rng.uniform(0, 1, len(cases)))}  # not in case order
    dice = {c: float(np.clip(1 - risks[c] + rng.normal(0, 0.1), 0, 1)) for c in cases}
    in_order = ([risks[c] for c in cases], [dice[c] for c in cases])
    fitted = {"fail_below": 0.7, "max_silent_failures": 0.1,
              "risk_threshold": choose_threshold("crc", *in_order, 0.7, 0.1).to_json()}
    keys = build_parser().parse_args(["-i", "x", "-d", "1", "-c", "2d"]).labelled_settings["quality"]
    assert keys == ["fail_below", "max_silent_failures", "confidence", "risk_control"]
    for given, params, expected in (
            ({}, [fitted, fitted], ("crc", 0.7, 0.1, None)),  # the fit's rule (first fold's)
            ({"risk_control": "ltt", "confidence": 0.8, "fail_below": 0.5}, [fitted], ("ltt", 0.5, 0.1, 0.8)),
            ({}, [{}], ("ltt", 0.6, 0.05, 0.9))):  # nothing recorded: QualityConfig's defaults
        rule, fail_below, alpha, confidence = expected
        settings = {k: given.get(k) for k in keys}
        calibration, record = quality.labelled_calibration(params, risks, dice, settings)
        chosen = choose_threshold(rule, *in_order, fail_below, alpha, confidence or 0.9)
        assert calibration.threshold == chosen.threshold and calibration.false_alarm_rate == alpha
        assert (calibration.n_train_cases, calibration.n_val_cases) == (40, 40)
        assert record == {"fail_below": fail_below, "max_silent_failures": alpha, "risk_control": rule,
                          "confidence": confidence, "risk_threshold": chosen.to_json(),
                          "dice": {c: dice[c] for c in cases}}
        assert list(record["dice"]) == cases
        assert capsys.readouterr().out.startswith(f"quality: accept below a predicted risk of "
                                                  f"{chosen.threshold:.4g} ({rule}); on these 40 labelled cases")


# ------------------------------------------------------------------------------------ Learn then Test
def binomial_cdf(k, n, p):
    """P(Bin(n, p) <= k) summed from the probability mass function."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def brute_force_ltt(risk, dice, fail_below, alpha, confidence):
    """Learn then Test written from its definition: grid = the finite risks' sorted values at ranks
    ceil(n * 0.05 j), j = 1..20; start at the first grid point accepting max(n_min, ceil(n / 3)) rows;
    continue while the binomial p-value is <= delta."""
    delta = 1 - confidence
    finite = sorted(r for r in risk if math.isfinite(r))
    n_min = next(n for n in range(1, 10_000) if (1 - alpha) ** n <= delta + 1e-12)
    start = max(n_min, math.ceil(len(risk) / 3 - 1e-9))
    grid = sorted({finite[max(1, math.ceil(len(finite) * j / 20 - 1e-9)) - 1] for j in range(1, 21)}) \
        if finite else []
    chosen = -1.0
    for lam in grid:
        acc = [i for i in range(len(risk)) if math.isfinite(risk[i]) and risk[i] <= lam]
        if len(acc) < start:
            continue
        k = sum(1 for i in acc if not dice[i] >= fail_below)
        if binomial_cdf(k, len(acc), alpha) > delta:
            break
        chosen = lam
    return chosen, n_min


@pytest.mark.parametrize("ties,nans", [(False, False), (True, False), (False, True)])
def test_ltt_threshold_equals_brute_force(ties, nans):
    rng = np.random.default_rng(hash((ties, nans)) % 2**32)
    accepted_any = 0
    for _ in range(60):
        n_rows = int(rng.integers(1, 120))
        alpha = float(rng.choice([0.05, 0.1, 0.2]))
        confidence = float(rng.choice([0.8, 0.9, 0.95]))
        risk, _, _ = random_instance(rng, n_rows, False, ties, nans)
        # few failures, more at high risk, some unknown Dice: thresholds to find
        dice = np.where(rng.random(n_rows) < 0.02 + 0.1 * np.nan_to_num(risk), 0.2, 0.9)
        dice[rng.random(n_rows) < 0.02] = np.nan
        got = ltt_threshold(risk, dice, 0.5, alpha, confidence)
        expected, n_min = brute_force_ltt(list(risk), list(dice), 0.5, alpha, confidence)
        assert got.threshold == expected
        assert got.n_needed == n_min and got.enough == (n_rows >= n_min)
        assert got.rule == "ltt" and got.confidence == confidence
        accepted = risk <= expected
        assert got.n_accepted == int(accepted.sum())
        failed = accepted & ~(dice >= 0.5)
        assert got.accepted_failure_rate == pytest.approx(failed.sum() / max(1, accepted.sum()))
        accepted_any += expected >= 0
    assert accepted_any >= 5  # the comparison covered thresholds that accept something


def test_ltt_needs_22_clean_cases_at_alpha_and_delta_of_a_tenth():
    assert min_cases_ltt(0.1, 0.9) == 22  # ln 0.1 / ln 0.9 = 21.9
    assert min_cases_ltt(0.05, 0.9) == 45
    for alpha, confidence in ((0.1, 0.9), (0.05, 0.95), (0.2, 0.8)):
        n = min_cases_ltt(alpha, confidence)
        assert (1 - alpha) ** n <= 1 - confidence < (1 - alpha) ** (n - 1)
    clean = np.ones(22)
    assert ltt_threshold(np.linspace(0, 0.5, 22), clean, 0.6, 0.1, 0.9).threshold == 0.5
    few = ltt_threshold(np.linspace(0, 0.5, 21), clean[:21], 0.6, 0.1, 0.9)
    assert few.threshold == NOTHING and not few.enough and few.n_needed == 22


def test_crc_is_kept_as_an_option_and_old_thresholds_read_as_crc():
    risk, dice = np.linspace(0, 1, 50), np.linspace(1, 0, 50)
    assert choose_threshold("crc", risk, dice, 0.5, 0.1) == crc_threshold(risk, dice, 0.5, 0.1)
    assert choose_threshold("ltt", risk, dice, 0.5, 0.1, 0.8) == ltt_threshold(risk, dice, 0.5, 0.1, 0.8)
    with pytest.raises(OODInputError, match="unknown risk control rule 'foo'"):
        choose_threshold("foo", risk, dice, 0.5, 0.1)
    old = {k: v for k, v in crc_threshold(risk, dice, 0.5, 0.1).to_json().items()
           if k in ("threshold", "alpha", "fail_below", "n_groups", "enough", "empirical_rate", "coverage")}
    read = RiskThreshold.from_json(old, "an old state")
    assert read.rule == "crc" and read.confidence is None and read.threshold == old["threshold"]
    with pytest.raises(OODStateError, match="re-fit"):
        RiskThreshold.from_json({**ltt_threshold(risk, dice, 0.5, 0.1).to_json(), "confidence": None}, "here")


def sample_population(rng, n):
    """Cases of a population: a predicted risk and a failure whose probability grows with it (about 20% fail)."""
    risk = rng.beta(2, 6, n)
    failed = rng.random(n) < 1 / (1 + np.exp(-(risk - 0.42) * 14))
    return risk, failed


def test_ltt_guarantee_by_simulation():
    """400 calibration sets of 60 cases: the rate among accepted cases of the population (estimated on 200 000 of
    its cases) exceeds alpha in at most delta of them; CRC's threshold, by contrast, exceeds it far more often."""
    rng = np.random.default_rng(11)
    pop_risk, pop_failed = sample_population(rng, 200_000)
    order = np.argsort(pop_risk)
    sorted_risk, rate_below = pop_risk[order], np.cumsum(pop_failed[order]) / np.arange(1, len(order) + 1)

    def rate_among_accepted(t):
        k = np.searchsorted(sorted_risk, t, side="right")
        return rate_below[k - 1] if k else 0.0

    alpha, confidence, trials = 0.1, 0.9, 400
    ltt_over, crc_over, accepted = 0, 0, []
    for _ in range(trials):
        risk, failed = sample_population(rng, 60)
        dice = np.where(failed, 0.3, 0.9)
        t = ltt_threshold(risk, dice, 0.6, alpha, confidence).threshold
        ltt_over += rate_among_accepted(t) > alpha
        accepted.append(np.mean(pop_risk <= t) if t >= 0 else 0.0)
        crc_over += rate_among_accepted(crc_threshold(risk, dice, 0.6, alpha).threshold) > alpha
    assert ltt_over / trials <= 1 - confidence + 3 * np.sqrt(0.1 * 0.9 / trials)
    assert np.mean(accepted) > 0.2  # and it accepts a real share of the cases
    assert crc_over / trials > 0.3  # the wrong quantity: crc does not bound the rate among accepted


def test_a_state_fitted_before_learn_then_test_keeps_its_rule_and_says_so():
    """Parameters as a fit before this rule stored them: a 7-field CRC threshold, no risk_control, confidence or
    unusual_level. The decision keeps CRC's threshold, names the rule and the re-fit, and the gate takes its
    default level."""
    from nnunet_ood.methods import REGISTRY

    rng = np.random.default_rng(6)
    params = {**fold_params(rng, 30, 2, fail_below=0.6, alpha=0.1), "inputs": ["mahalanobis", "tta"]}
    params["table_csv"] = params["table_csv"].replace(",tta\n", ",tta,mahalanobis\n", 1).replace(
        "\n", ",1.0\n").replace(",tta,mahalanobis,1.0\n", ",tta,mahalanobis\n", 1)
    cases, risk, dice = read_out_of_fold_risks(params["table_csv"])
    old = crc_threshold(risk, dice, 0.6, 0.1, cases).to_json()
    params["risk_threshold"] = {k: old[k] for k in ("threshold", "alpha", "fail_below", "n_groups", "enough",
                                                    "empirical_rate", "coverage")}
    rule = REGISTRY.get("quality").decision_rule([params], ["mahalanobis", "tta", "quality"])
    assert rule.risk.rule == "crc" and rule.risk.threshold == old["threshold"]
    statement = rule.statement()
    assert "conformal risk control" in statement and "re-fit with nnUNetv2_fit_ood" in statement
    clean_scored = sum(1 for line in params["table_csv"].splitlines()[1:]
                       if line.split(",")[1] == "0" and line.split(",")[5] != "")  # a NaN risk leaves the gate
    assert rule.gate.level == 0.05 and rule.gate.names == ["mahalanobis", "quality"]
    assert rule.gate.n_cases == clean_scored and 25 <= clean_scored <= 30


def test_one_fold_without_its_table_is_refused_for_the_gate():
    """The gate's calibration cases are the fold's clean validation rows: a lost table is a one-line error naming
    the file and the ways out, also for one fold."""
    from nnunet_ood.methods import REGISTRY

    rng = np.random.default_rng(7)
    params = {**fold_params(rng, 20, 2), "inputs": ["tta"], "table_csv": "",
              "_table_file": "/models/fold_0/ood/quality_calibration.csv"}
    params["risk_threshold"] = crc_threshold(rng.random(40), rng.random(40), 0.6, 0.1).to_json()
    with pytest.raises(OODStateError, match=r"table \(/models/fold_0/ood/quality_calibration.csv\) is missing.*"
                                            r"nnUNetv2_fit_ood.*--ood"):
        REGISTRY.get("quality").decision_rule([params], ["tta", "quality"])
