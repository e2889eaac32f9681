"""The quality model: grouped folds, its candidates against scikit-learn, CV selection, out-of-fold risks, and
its JSON state (strict, never unpickled)."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold

from nnunet_ood.errors import OODInputError, OODStateError
from nnunet_ood.quality.grouped_cv import group_kfold
from nnunet_ood.quality.model import (
    CLIP,
    MEAN_SIZES,
    RIDGE_ALPHAS,
    TIE_BREAK,
    Candidate,
    QualityModel,
    candidates,
    fit_candidate,
    fit_isotonic,
    fit_ridge,
    predict_spec,
    robust_scaling,
    spearman,
    standardise,
)

REFIT = "re-fit with nnUNetv2_fit_ood"


# ---------------------------------------------------------------------------------------------- data
def case_groups(n_cases: int, versions: int) -> list[str]:
    return [f"case{c:03d}" for c in range(n_cases) for _ in range(versions)]


def nonlinear_data(rng, n_cases=60, versions=3):
    """Risk a steep monotone (decreasing) function of feature ``s1``; ``s0`` and ``s2`` are noise."""
    n = n_cases * versions
    X = rng.normal(size=(n, 3))
    risk = 0.1 + 0.8 / (1 + np.exp(8 * X[:, 1])) + 0.03 * rng.normal(size=n)
    return X, 1 - np.clip(risk, 0, 1), case_groups(n_cases, versions)


def linear_data(rng, n_cases=60, versions=3):
    """Risk a linear mix of four features, none enough on its own."""
    n = n_cases * versions
    X = rng.normal(size=(n, 4))
    risk = 0.5 + 0.08 * (X[:, 0] + X[:, 1] - X[:, 2] + X[:, 3]) + 0.02 * rng.normal(size=n)
    return X, 1 - np.clip(risk, 0, 1), case_groups(n_cases, versions)


def averaged_data(rng, n_cases=60, versions=3):
    """Risk a steep monotone function of the mean of two noisy readings ``f1`` and ``-f3`` of one latent score
    (each alone is worse); ``n0`` and ``n2`` are noise."""
    n = n_cases * versions
    z = rng.normal(size=n)
    X = np.column_stack([rng.normal(size=n), z + 0.7 * rng.normal(size=n), rng.normal(size=n),
                         -(z + 0.7 * rng.normal(size=n))])
    risk = 0.05 + 0.9 / (1 + np.exp(-2 * (X[:, 1] - X[:, 3]))) + 0.02 * rng.normal(size=n)
    return X, 1 - np.clip(risk, 0, 1), case_groups(n_cases, versions)


# ---------------------------------------------------------------------------------------------- group_kfold
def test_group_kfold_never_splits_a_group_and_covers_every_row_once():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n_groups = int(rng.integers(2, 25))
        groups = [f"g{g}" for g in rng.integers(0, n_groups, int(rng.integers(n_groups, 100)))]
        n_splits = int(rng.integers(2, 8))
        folds = group_kfold(groups, n_splits, seed=int(rng.integers(100)))
        assert len(folds) == min(n_splits, len(set(groups)))
        tests = np.concatenate([test for _, test in folds])
        assert np.array_equal(np.sort(tests), np.arange(len(groups)))  # every row exactly once as test
        for train, test in folds:
            assert len(test) > 0
            assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(groups)))
            assert not {groups[i] for i in train} & {groups[i] for i in test}


def test_group_kfold_balances_rows_like_sklearn():
    """The same largest-first, lightest-fold assignment as GroupKFold: equal sorted fold sizes, whatever the
    seed (groups of equal size are interchangeable), and a spread of at most the largest group."""
    rng = np.random.default_rng(1)
    for _ in range(30):
        sizes = rng.integers(1, 12, int(rng.integers(5, 30)))
        groups = np.repeat([f"g{i}" for i in range(len(sizes))], sizes)
        k = int(rng.integers(2, 6))
        ours = sorted(len(test) for _, test in group_kfold(list(groups), k, seed=int(rng.integers(100))))
        theirs = sorted(len(test) for _, test in GroupKFold(n_splits=k).split(groups, groups=groups))
        assert ours == theirs
        assert ours[-1] - ours[0] <= sizes.max()


def test_group_kfold_deterministic_and_seeded():
    groups = case_groups(20, 3)
    a, b = group_kfold(groups, 5, seed=3), group_kfold(groups, 5, seed=3)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    c = group_kfold(groups, 5, seed=4)
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, c))  # equal-size groups: the seed decides


def test_group_kfold_bad_input():
    with pytest.raises(OODInputError, match="at least 2 groups"):
        group_kfold(["a", "a", "a"], 5, 0)
    with pytest.raises(OODInputError, match="no rows"):
        group_kfold([], 5, 0)
    with pytest.raises(OODInputError, match="n_splits"):
        group_kfold(["a", "b"], 1, 0)
    assert len(group_kfold(["a", "b", "c", "a"], 10, 0)) == 3  # capped at the number of groups


# ---------------------------------------------------------------------------------------------- candidates
def test_ridge_equals_sklearn_on_standardised_clipped_inputs():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(80, 4)) * [1, 10, 0.1, 3] + [0, 5, -2, 100]
    X[:3, 0] = [50, -40, 30]  # far-out values: clipped at CLIP
    X[:, 3] = np.where(rng.random(80) < 0.8, 100.0, X[:, 3])  # IQR 0: the std is the scale
    y = rng.random(80)
    center, scale = robust_scaling(X)
    assert np.all(scale > 0)
    Z = standardise(X, center, scale)
    assert np.abs(Z).max() == CLIP
    Z_new = standardise(rng.normal(size=(20, 4)) * 20, center, scale)
    for alpha in RIDGE_ALPHAS:
        coef, intercept = fit_ridge(Z, y, alpha)
        ref_coef, ref_intercept = ridge_normal_equations(Z, y, alpha)
        np.testing.assert_allclose(coef, ref_coef, rtol=1e-8, atol=1e-10)
        assert intercept == pytest.approx(ref_intercept, abs=1e-10)
        np.testing.assert_allclose(Z_new @ coef + intercept, Z_new @ ref_coef + ref_intercept, atol=1e-10)
        ref = Ridge(alpha=alpha).fit(Z, y)
        # the fitted candidate predicts the same, clipped to [0, 1] (the tie-break moves it by at most TIE_BREAK)
        spec = fit_candidate(Candidate("ridge", alpha=alpha), X, y, ["a", "b", "c", "d"])
        X_new = rng.normal(size=(20, 4)) * 20
        expected = np.clip(ref.predict(standardise(X_new, center, scale)), 0, 1)
        np.testing.assert_allclose(predict_spec(spec, X_new, ["a", "b", "c", "d"], tie_break=False), expected,
                                   atol=1e-10)
        assert np.abs(predict_spec(spec, X_new, ["a", "b", "c", "d"]) - expected).max() <= TIE_BREAK


def ridge_normal_equations(Z, y, alpha):
    """The ridge solution by its normal equations on centred data (intercept unpenalised)."""
    z_mean, y_mean = Z.mean(axis=0), y.mean()
    Zc = Z - z_mean
    coef = np.linalg.solve(Zc.T @ Zc + alpha * np.eye(Z.shape[1]), Zc.T @ (y - y_mean))
    return coef, y_mean - z_mean @ coef


def pool_adjacent_violators(x, y, increasing):
    """The least-squares monotone fit at every x, by pooling adjacent violators over the sorted, tie-pooled x."""
    ux, inverse = np.unique(x, return_inverse=True)
    weight = np.bincount(inverse.reshape(-1)).astype(float)
    value = np.bincount(inverse.reshape(-1), weights=y) / weight * (1 if increasing else -1)
    blocks = []  # [value, weight, count of unique x]
    for v, w in zip(value, weight):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + v2 * w2) / (blocks[-1][1] + w2), blocks[-1][1] + w2,
                          blocks[-1][2] + n2]
    fitted = np.concatenate([[b[0]] * b[2] for b in blocks]) * (1 if increasing else -1)
    return ux, fitted


@pytest.mark.parametrize("increasing", [True, False])
def test_isotonic_equals_pool_adjacent_violators_and_sklearn(increasing):
    rng = np.random.default_rng(3)
    for _ in range(10):
        x = np.round(rng.normal(size=70), 1)  # ties
        y = (x if increasing else -x) * 0.2 + rng.normal(size=70)
        kx, ky = fit_isotonic(x, y, increasing)
        assert np.all(np.diff(kx) > 0)
        assert np.all(np.diff(ky) >= 0) if increasing else np.all(np.diff(ky) <= 0)
        ux, fitted = pool_adjacent_violators(x, y, increasing)
        np.testing.assert_allclose(np.interp(ux, kx, ky), fitted, atol=1e-10)  # the least-squares monotone fit
        ref = IsotonicRegression(increasing=increasing, out_of_bounds="clip").fit(x, y)
        grid = np.linspace(x.min(), x.max(), 301)
        np.testing.assert_allclose(np.interp(grid, kx, ky), ref.predict(grid), atol=1e-10)
        np.testing.assert_allclose(np.interp(x, kx, ky), ref.predict(x), atol=1e-10)
        outside = np.array([x.min() - 5, x.max() + 5])
        np.testing.assert_allclose(np.interp(outside, kx, ky), [ky[0], ky[-1]])  # flat beyond the ends


def test_isotonic_candidate_direction_from_spearman():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(50, 2))
    y = np.clip(0.5 - 0.2 * X[:, 1] + 0.05 * rng.normal(size=50), 0, 1)
    spec = fit_candidate(Candidate("isotonic", feature="b"), X, y, ["a", "b"])
    assert spec["increasing"] is False and spec["feature"] == "b"
    assert spearman(X[:, 1], y) < 0
    flat = fit_candidate(Candidate("isotonic", feature="a"), np.ones((10, 2)), np.linspace(0, 1, 10), ["a", "b"])
    assert flat["x"] == [1.0] and flat["y"] == [pytest.approx(0.5)]  # constant feature: the mean


def test_candidate_order():
    names = [c.name for c in candidates(["s0", "s1"])]
    assert names == ["constant", "ridge(alpha=1000)", "ridge(alpha=100)", "ridge(alpha=10)", "ridge(alpha=1)",
                     "ridge(alpha=0.1)", "isotonic(s0)", "isotonic(s1)"]  # k = 2 is not < 2 features: no mean
    assert [c.name for c in candidates(["s0", "s1", "s2"])][-4:] == [
        "isotonic(s0)", "isotonic(s1)", "isotonic(s2)", "isotonic_mean(k=2)"]
    assert [c.name for c in candidates([f"s{i}" for i in range(5)])][-2:] == [
        "isotonic_mean(k=2)", "isotonic_mean(k=3)"]  # k = 5 is not < 5
    six = candidates([f"s{i}" for i in range(6)])
    assert [c.name for c in six][-4:] == ["isotonic(s5)", *(f"isotonic_mean(k={k})" for k in MEAN_SIZES)]
    assert len(six) == 1 + len(RIDGE_ALPHAS) + 6 + len(MEAN_SIZES)


def mean_data(rng, n=150):
    """A latent score read by features of decreasing strength, some reversed, one rounded (ties), one constant."""
    z = rng.normal(size=n)
    noise = rng.normal(size=(n, 7))
    X = np.column_stack([z + 3 * noise[:, 0], -(z + 0.3 * noise[:, 1]), z + 0.6 * noise[:, 2], np.ones(n),
                         np.round(z + noise[:, 4]), -(z + 2 * noise[:, 5]), noise[:, 6]])
    risk = np.clip(0.5 + 0.3 * np.tanh(1.5 * z) + 0.05 * rng.normal(size=n), 0, 1)
    return X, risk, [f"f{j}" for j in range(X.shape[1])]


@pytest.mark.parametrize("k", MEAN_SIZES)
def test_isotonic_mean_equals_the_mean_of_sklearn_fits_on_the_most_correlated_features(k):
    rng = np.random.default_rng(16)
    X, risk, names = mean_data(rng)
    # the reference, independently: |Spearman| by scipy (a constant column: NaN, counted as 0), largest first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about the constant column
        rho = np.array([spearmanr(X[:, j], risk).statistic for j in range(X.shape[1])])
    assert np.isnan(rho[3]) and rho[1] < 0 and rho[5] < 0
    best = np.argsort(-np.nan_to_num(np.abs(rho), nan=0.0), kind="stable")[:k]
    fits = [IsotonicRegression(increasing=bool(rho[j] >= 0), out_of_bounds="clip").fit(X[:, j], risk) for j in best]

    spec = fit_candidate(Candidate("isotonic_mean", k=k), X, risk, names)
    assert spec["kind"] == "isotonic_mean" and len(spec["members"]) == k
    assert [m["feature"] for m in spec["members"]] == [names[j] for j in best]
    assert [m["increasing"] for m in spec["members"]] == [bool(rho[j] >= 0) for j in best]
    assert [m["increasing"] for m in spec["members"]][:2] == [False, True]  # f1 reversed, f2 not
    X_new = np.concatenate([X, rng.normal(size=(100, X.shape[1])) * 3])  # inside and beyond the training range
    expected = np.clip(np.mean([f.predict(X_new[:, j]) for f, j in zip(fits, best)], axis=0), 0, 1)
    plain = predict_spec(spec, X_new, names, tie_break=False)
    np.testing.assert_allclose(plain, expected, atol=1e-10)
    # with the tie-break: the mean of the members' tie-broken predictions (their risks lie in [0, 1])
    tb = predict_spec(spec, X_new, names)
    np.testing.assert_allclose(tb, np.mean([predict_spec(m, X_new, names) for m in spec["members"]], axis=0),
                               atol=1e-12)
    assert np.abs(tb - plain).max() <= TIE_BREAK and tb.min() >= 0 and tb.max() <= 1


# ---------------------------------------------------------------------------------------------- tie-break
@pytest.mark.parametrize("increasing", [True, False])
def test_tie_break_orders_the_flat_stretches_of_an_isotonic_fit_like_its_feature(increasing):
    rng = np.random.default_rng(13)
    x = np.round(rng.uniform(-2, 2, 120), 1)
    y = np.clip(0.5 + 0.3 * np.tanh(x if increasing else -x) + 0.15 * rng.normal(size=120), 0, 1)
    names = ["noise", "x"]
    spec = fit_candidate(Candidate("isotonic", feature="x"), np.column_stack([rng.normal(size=120), x]), y, names)
    assert spec["increasing"] is increasing
    kx, ky = np.array(spec["x"]), np.array(spec["y"])
    sign = 1 if increasing else -1  # the fit's direction

    def predict(xs, **kw):
        return predict_spec(spec, np.column_stack([np.zeros(len(xs)), xs]), names, **kw)

    # beyond the last knot and before the first: flat without the tie-break, ordered like the feature with it
    for beyond in (kx[-1] + np.array([0.01, 0.5, 1, 10, 1e3, 1e9]), kx[0] - np.array([1e9, 1e3, 10, 1, 0.5, 0.01])):
        plain = predict(beyond, tie_break=False)
        assert np.all(plain == plain[0])
        assert np.all(sign * np.diff(predict(beyond)) > 0)
    # inside the widest flat block (two knots, one y: the noise makes the fit pool)
    flat = np.flatnonzero(np.diff(ky) == 0)
    assert flat.size
    i = flat[np.argmax(np.diff(kx)[flat])]
    inside = np.linspace(kx[i], kx[i + 1], 9)
    plain = predict(inside, tie_break=False)
    assert np.all(plain == plain[0])
    assert np.all(sign * np.diff(predict(inside)) > 0)
    # everywhere: strictly monotone in the fit's direction, within TIE_BREAK of the fit, in [0, 1]
    grid = np.concatenate([[-np.inf, -1e12], np.linspace(-5, 5, 1001), [1e12, np.inf]])
    tb, plain = predict(grid), predict(grid, tie_break=False)
    np.testing.assert_allclose(plain[2:-2], np.interp(grid[2:-2], kx, ky), atol=1e-12)
    np.testing.assert_array_equal(plain[[0, 1, -2, -1]], [ky[0], ky[0], ky[-1], ky[-1]])
    assert np.all(sign * np.diff(tb) > 0)
    assert np.abs(tb - plain).max() <= TIE_BREAK and tb.min() >= 0 and tb.max() <= 1
    # a NaN in any column, even one the fit does not read, gives NaN
    rows = np.array([[0.0, np.nan], [np.nan, 0.0], [0.0, 0.0]])
    for tie_break in (True, False):
        risk = predict_spec(spec, rows, names, tie_break=tie_break)
        assert np.isnan(risk[:2]).all() and np.isfinite(risk[2])


def test_tie_break_orders_clipped_ridge_predictions_like_the_unclipped_linear_score():
    rng = np.random.default_rng(14)
    X, dice, _ = linear_data(rng)
    names = ["a", "b", "c", "d"]
    spec = fit_candidate(Candidate("ridge", alpha=1.0), X, 1 - dice, names)
    center, scale, coef = (np.array(spec[key]) for key in ("center", "scale", "coef"))
    assert np.array_equal(np.sign(coef), [1, 1, -1, 1])

    def linear(rows):  # by hand: no clip of the standardised features, nor of the risk
        return ((rows - center) / scale) @ coef + spec["intercept"]

    for side, bound in ((1, 1.0), (-1, 0.0)):  # far along (against) the risk's direction: clipped at 1 (at 0)
        rows = center + scale * (side * np.sign(coef) * rng.uniform(3, 60, (60, 1)) + rng.normal(size=(60, 4)))
        plain = predict_spec(spec, rows, names, tie_break=False)
        rows = rows[plain == bound]
        assert len(rows) >= 40 and np.all(np.abs((rows - center) / scale) > CLIP, axis=1).any()
        tb = predict_spec(spec, rows, names)
        np.testing.assert_array_equal(np.argsort(tb), np.argsort(linear(rows)))
        assert len(np.unique(tb)) == len(rows) and np.abs(tb - bound).max() <= TIE_BREAK
        assert tb.min() >= 0 and tb.max() <= 1

    # standardised features beyond CLIP: one prediction without the tie-break, the linear order with it
    hand = {"kind": "ridge", "alpha": 1.0, "clip": CLIP, "center": [1.0, -2.0], "scale": [2.0, 0.5],
            "coef": [0.05, -0.03], "intercept": 0.3}
    rows = np.column_stack([1 + 2 * rng.uniform(CLIP + 0.1, 200, 50), -2 + 0.5 * rng.uniform(CLIP + 0.1, 200, 50)])
    plain = predict_spec(hand, rows, ["a", "b"], tie_break=False)
    np.testing.assert_allclose(plain, 0.3 + CLIP * (0.05 - 0.03))
    by_hand = ((rows - [1.0, -2.0]) / [2.0, 0.5]) @ [0.05, -0.03] + 0.3
    assert by_hand.min() < 0 < 1 < by_hand.max()  # the linear score itself runs past [0, 1]
    tb = predict_spec(hand, rows, ["a", "b"])
    np.testing.assert_array_equal(np.argsort(tb), np.argsort(by_hand))
    assert np.abs(tb - plain).max() <= TIE_BREAK
    nan_rows = np.array([[np.nan, 0.0], [0.0, np.nan], [np.nan, np.nan]])
    assert np.isnan(predict_spec(hand, nan_rows, ["a", "b"])).all()
    assert np.isnan(predict_spec(hand, nan_rows, ["a", "b"], tie_break=False)).all()


def test_tie_break_of_a_constant_is_its_midpoint():
    spec = {"kind": "constant", "value": 0.8}
    rows = np.array([[0.0], [1e9], [-np.inf], [np.nan]])
    np.testing.assert_array_equal(predict_spec(spec, rows, ["a"], tie_break=False)[:3], 0.8)
    np.testing.assert_allclose(predict_spec(spec, rows, ["a"])[:3], (1 - TIE_BREAK) * 0.8 + TIE_BREAK * 0.5)
    assert np.isnan(predict_spec(spec, rows, ["a"])[3])


def test_infinite_features_give_finite_risks_in_range():
    """+-inf is beyond every knot and clip: a finite risk, the most extreme one, never NaN (nor may the unclipped
    linear score of the tie-break overflow into inf - inf)."""
    rng = np.random.default_rng(15)
    p = 6
    names = [f"x{j}" for j in range(p)]
    rows = np.sign(rng.normal(size=(64, p))) * np.inf
    rows[::4, 0] = rng.normal(size=16)  # some finite values among them
    rows[1::4, 1] = 1e308
    for coef_range in (0.5, 3.0):
        for _ in range(10):
            spec = {"kind": "ridge", "alpha": 1.0, "clip": CLIP, "center": rng.normal(size=p).tolist(),
                    "scale": rng.uniform(1e-3, 2, p).tolist(),
                    "coef": rng.uniform(-coef_range, coef_range, p).tolist(), "intercept": 0.5}
            with np.errstate(over="ignore"):
                tb, plain = predict_spec(spec, rows, names), predict_spec(spec, rows, names, tie_break=False)
            assert np.isfinite(plain).all() and np.isfinite(tb).all()
            assert np.abs(tb - plain).max() <= TIE_BREAK and tb.min() >= 0 and tb.max() <= 1
    iso = {"kind": "isotonic", "feature": "x1", "increasing": False, "x": [0.0, 1.0], "y": [0.9, 0.1]}
    mean = {"kind": "isotonic_mean", "members": [iso, {**iso, "feature": "x2", "increasing": True, "y": [0.2, 0.7]}]}
    for spec in (iso, mean):
        tb, plain = predict_spec(spec, rows, names), predict_spec(spec, rows, names, tie_break=False)
        assert np.isfinite(tb).all() and np.abs(tb - plain).max() <= TIE_BREAK
    x = np.array([[0.0, -np.inf, 0, 0, 0, 0], [0.0, -1e300, 0, 0, 0, 0], [0.0, 1e300, 0, 0, 0, 0],
                  [0.0, np.inf, 0, 0, 0, 0]])
    assert np.all(np.diff(predict_spec(iso, x, names)) < 0)  # +-inf: the most extreme, still ordered


# ---------------------------------------------------------------------------------------------- selection
def test_selection_picks_isotonic_for_a_monotone_nonlinear_risk():
    X, dice, groups = nonlinear_data(np.random.default_rng(5))
    model = QualityModel(["s0", "s1", "s2"], seed=0).fit(X, dice, groups)
    report = model.cv_report_
    assert report["chosen"] == "isotonic(s1)"
    assert report["n_rows"] == 180 and report["n_groups"] == 60 and report["n_dropped"] == 0
    assert report["n_splits"] == 5
    maes = {c["name"]: c["cv_mae"] for c in report["candidates"]}
    assert list(maes) == [c.name for c in candidates(["s0", "s1", "s2"])]
    assert len(maes) == 1 + len(RIDGE_ALPHAS) + 3 + 1 and min(maes.values()) == maes["isotonic(s1)"]
    assert maes["isotonic(s1)"] < 0.7 * min(v for k, v in maes.items() if k.startswith("ridge"))
    chosen = next(c for c in report["candidates"] if c["name"] == "isotonic(s1)")
    assert chosen["cv_spearman"] > 0.8
    json.dumps(report, allow_nan=False)  # JSON-able as it is
    assert model.predictor_["increasing"] is False
    # the monotone fit's blocks and flat ends tie many cases; the tie-broken out-of-fold risks tie none, and
    # order every fold's cases like s1 (decreasing: the fit's direction)
    plain = np.empty(len(dice))
    for train, test in group_kfold(groups, 5, seed=0):
        spec = fit_candidate(Candidate("isotonic", feature="s1"), X[train], 1 - dice[train], model.feature_names)
        plain[test] = predict_spec(spec, X[test], model.feature_names, tie_break=False)
        assert np.all(np.diff(model.oof_risk_[test][np.argsort(X[test, 1])]) < 0)
    assert len(np.unique(plain)) < 0.8 * len(plain) and len(np.unique(model.oof_risk_)) == len(plain)
    assert np.abs(model.oof_risk_ - plain).max() <= TIE_BREAK
    assert chosen["cv_spearman"] == pytest.approx(spearman(model.oof_risk_, 1 - dice))


def test_selection_picks_ridge_for_a_linear_mix():
    X, dice, groups = linear_data(np.random.default_rng(6))
    model = QualityModel(["a", "b", "c", "d"], seed=1).fit(X, dice, groups)
    assert model.cv_report_["chosen"].startswith("ridge(")
    assert model.predictor_["kind"] == "ridge"
    maes = {c["name"]: c["cv_mae"] for c in model.cv_report_["candidates"]}
    assert maes[model.cv_report_["chosen"]] < 0.5 * min(v for k, v in maes.items() if k.startswith("isotonic"))
    risk = model.predict_risk(X)
    assert np.abs(risk - (1 - dice)).mean() < 0.03


def test_selection_picks_isotonic_mean_when_the_risk_follows_an_average_of_two_features():
    X, dice, groups = averaged_data(np.random.default_rng(17))
    names = ["n0", "f1", "n2", "f3"]
    model = QualityModel(names, seed=0).fit(X, dice, groups)
    assert model.cv_report_["chosen"] == "isotonic_mean(k=2)"
    maes = {c["name"]: c["cv_mae"] for c in model.cv_report_["candidates"]}
    assert list(maes)[-2:] == ["isotonic_mean(k=2)", "isotonic_mean(k=3)"]
    others = [v for k, v in maes.items() if k != "isotonic_mean(k=2)"]
    assert maes["isotonic_mean(k=2)"] < 0.9 * min(others)  # each feature alone (and the linear mix) is worse
    # refitted on all rows: the two single monotone fits, f3 reversed
    members = model.predictor_["members"]
    assert sorted(m["feature"] for m in members) == ["f1", "f3"]
    assert {m["feature"]: m["increasing"] for m in members} == {"f1": True, "f3": False}
    for m in members:
        assert m == fit_candidate(Candidate("isotonic", feature=m["feature"]), X, 1 - dice, names)
    plain = predict_spec(model.predictor_, X, names, tie_break=False)
    np.testing.assert_allclose(plain, np.mean([predict_spec(m, X, names, tie_break=False) for m in members], axis=0))
    assert np.abs(model.predict_risk(X) - plain).max() <= TIE_BREAK


def test_oof_risks_are_the_chosen_candidate_fitted_without_the_fold():
    X, dice, groups = nonlinear_data(np.random.default_rng(7), n_cases=25)
    X[5, 0] = np.nan  # dropped row
    dice[9] = np.nan  # dropped row
    names = ["s0", "s1", "s2"]
    model = QualityModel(names, seed=2, n_splits=4).fit(X, dice, groups)
    assert model.cv_report_["n_dropped"] == 2 and model.cv_report_["n_rows"] == len(dice) - 2
    keep = np.isfinite(X).all(axis=1) & np.isfinite(dice)
    assert np.isnan(model.oof_risk_[~keep]).all() and np.isfinite(model.oof_risk_[keep]).all()
    chosen = next(c for c in candidates(names) if c.name == model.cv_report_["chosen"])
    Xk, rk, gk = X[keep], 1 - dice[keep], [g for g, k in zip(groups, keep) if k]
    expected = np.empty(len(rk))
    for train, test in group_kfold(gk, 4, seed=2):
        expected[test] = predict_spec(fit_candidate(chosen, Xk[train], rk[train], names), Xk[test], names)
    np.testing.assert_allclose(model.oof_risk_[keep], expected)
    plain = np.empty(len(rk))  # the choice compares the fits without the tie-break
    for train, test in group_kfold(gk, 4, seed=2):
        plain[test] = predict_spec(fit_candidate(chosen, Xk[train], rk[train], names), Xk[test], names,
                                   tie_break=False)
    mae = next(c["cv_mae"] for c in model.cv_report_["candidates"] if c["name"] == chosen.name)
    assert mae == pytest.approx(np.abs(plain - rk).mean())


def test_oof_risk_of_an_outlier_case_does_not_see_itself():
    """Every case has risk 0.1 but one, with risk 0.9 and the largest feature values: a monotone fit on all rows
    fits it perfectly, but out of fold every candidate can only have learned 0.1."""
    n_cases, versions = 20, 3
    groups = case_groups(n_cases, versions)
    rng = np.random.default_rng(8)
    X = rng.random((n_cases * versions, 2)) * 0.5
    risk = np.full(len(groups), 0.1)
    outlier = np.array([g == "case007" for g in groups])
    X[outlier] = 1.0 + rng.random((versions, 2))
    risk[outlier] = 0.9
    model = QualityModel(["a", "b"], seed=0).fit(X, 1 - risk, groups)
    chosen = next(c for c in candidates(["a", "b"]) if c.name == model.cv_report_["chosen"])
    for train, test in group_kfold(groups, 5, seed=0):  # the fit itself: exactly 0.1 out of fold
        spec = fit_candidate(chosen, X[train], risk[train], ["a", "b"])
        fold_risk = predict_spec(spec, X[test], ["a", "b"], tie_break=False)
        np.testing.assert_allclose(fold_risk[outlier[test]], 0.1, atol=1e-9)
        # the model's out-of-fold risks are these, tie-broken
        assert np.abs(model.oof_risk_[test] - fold_risk).max() <= TIE_BREAK
    assert np.abs(model.oof_risk_[outlier] - 0.1).max() <= TIE_BREAK
    np.testing.assert_allclose(model.oof_risk_[~outlier], 0.1, atol=0.05)
    in_sample = fit_candidate(Candidate("isotonic", feature="a"), X, risk, ["a", "b"])
    in_sample_risk = predict_spec(in_sample, X, ["a", "b"], tie_break=False)
    np.testing.assert_allclose(in_sample_risk, risk, atol=1e-12)  # in sample: perfect
    assert np.abs(predict_spec(in_sample, X, ["a", "b"]) - in_sample_risk).max() <= TIE_BREAK


def test_predict_nan_clipping_and_columns():
    X, dice, groups = linear_data(np.random.default_rng(9))
    model = QualityModel(["a", "b", "c", "d"]).fit(X, dice, groups)
    spec = model.predictor_
    center, scale = np.array(spec["center"]), np.array(spec["scale"])
    at_clip = center + CLIP * scale * np.array([1, 1, -1, 1])
    rows = np.array([[np.nan, 0, 0, 0], [0, 0, 0, 0], at_clip, [1e9, 1e9, -1e9, 1e9],
                     [np.inf, np.inf, -np.inf, np.inf]])
    risk = model.predict_risk(rows)
    plain = predict_spec(spec, rows, model.feature_names, tie_break=False)
    assert np.isnan(risk[0]) and np.isnan(plain[0]) and np.isfinite(risk[1:]).all()
    assert np.all((risk[1:] >= 0) & (risk[1:] <= 1))
    assert np.abs(risk[1:] - plain[1:]).max() <= TIE_BREAK
    # a far-out (even infinite) value is worth no more than CLIP scales from the median
    np.testing.assert_array_equal(plain[3:], plain[2])
    raw = (np.array([CLIP, CLIP, -CLIP, CLIP]) @ np.array(spec["coef"])) + spec["intercept"]
    assert plain[2] == pytest.approx(min(max(raw, 0.0), 1.0))
    assert raw > 1 and plain[2] == 1.0  # the linear model runs past 1: clipped
    assert risk[2] < risk[3] < risk[4] < 1.0  # ... and the tie-break keeps them in the order of the linear score
    with pytest.raises(OODInputError, match="reads 4 features"):
        model.predict_risk(X[:, :3])
    with pytest.raises(OODInputError, match="reads 4 features"):
        model.predict_risk(X[0])
    with pytest.raises(OODStateError, match="not fitted"):
        QualityModel(["a"]).predict_risk(np.zeros((1, 1)))


def test_fit_bad_input():
    X, dice, groups = linear_data(np.random.default_rng(10), n_cases=5)
    with pytest.raises(OODInputError, match="one of each per row"):
        QualityModel(["a", "b", "c", "d"]).fit(X, dice[:-1], groups)
    with pytest.raises(OODInputError, match=r"\[0, 1\]"):
        QualityModel(["a", "b", "c", "d"]).fit(X, dice + 2, groups)
    with pytest.raises(OODInputError, match="at least 2 cases"):
        QualityModel(["a", "b", "c", "d"]).fit(X, dice, ["one"] * len(dice))
    X_nan = X.copy()
    X_nan[:, 2] = np.nan
    with pytest.raises(OODInputError, match="at least 2 cases"):
        QualityModel(["a", "b", "c", "d"]).fit(X_nan, dice, groups)
    with pytest.raises(OODInputError, match="distinct feature names"):
        QualityModel(["a", "a"])
    with pytest.raises(OODInputError, match="n_splits"):
        QualityModel(["a"], n_splits=1)


# ---------------------------------------------------------------------------------------------- JSON state
def fitted_models():
    """One fitted model per predictor kind."""
    rng = np.random.default_rng(11)
    X, dice, groups = nonlinear_data(rng)
    iso = QualityModel(["s0", "s1", "s2"], seed=0).fit(X, dice, groups)
    X, dice, groups = linear_data(rng)
    ridge = QualityModel(["a", "b", "c", "d"], seed=0).fit(X, dice, groups)
    # every candidate fits a constant risk exactly (the choice ignores the tie-break): the first, the constant, wins
    flat = QualityModel(["x"], seed=0).fit(rng.normal(size=(60, 1)), np.full(60, 0.5), case_groups(30, 2))
    maes = [c["cv_mae"] for c in flat.cv_report_["candidates"]]
    assert len(maes) == 7 and max(maes) < 1e-12
    X, dice, groups = averaged_data(rng)
    mean = QualityModel(["n0", "f1", "n2", "f3"], seed=0).fit(X, dice, groups)
    models = (iso, ridge, flat, mean)
    assert [m.predictor_["kind"] for m in models] == ["isotonic", "ridge", "constant", "isotonic_mean"]
    return models


def test_json_round_trip_gives_identical_predictions(tmp_path):
    rng = np.random.default_rng(12)
    for i, model in enumerate(fitted_models()):
        X = rng.normal(size=(50, len(model.feature_names))) * 3
        X[3, 0] = np.nan
        obj = json.loads(json.dumps(model.to_json(), allow_nan=False))  # plain JSON
        again = QualityModel.from_json(obj, "here")
        assert again.feature_names == model.feature_names and again.seed == model.seed
        assert again.n_splits == model.n_splits and again.cv_report_ == model.cv_report_
        np.testing.assert_array_equal(again.predict_risk(X), model.predict_risk(X))
        path = tmp_path / f"model{i}.json"
        model.save(str(path))
        loaded = QualityModel.load(str(path))
        np.testing.assert_array_equal(loaded.predict_risk(X), model.predict_risk(X))
        assert loaded.to_json() == model.to_json()
        assert loaded.oof_risk_ is None  # calibration data are not part of the stored model


def corruptions(obj):
    """(description, corrupted copy) for each kind of damage."""
    def edit(fn):
        bad = copy.deepcopy(obj)
        fn(bad)
        return bad

    kind = obj["predictor"]["kind"]
    out = [
        ("not a dict", [obj]),
        ("missing key", edit(lambda o: o.pop("predictor"))),
        ("extra key", edit(lambda o: o.update(extra=1))),
        ("wrong format", edit(lambda o: o.update(format="sklearn"))),
        ("newer schema", edit(lambda o: o.update(schema_version=2))),
        ("names not a list", edit(lambda o: o.update(feature_names="a,b"))),
        ("duplicate names", edit(lambda o: o["feature_names"].append(o["feature_names"][0]))),
        ("seed string", edit(lambda o: o.update(seed="0"))),
        ("seed bool", edit(lambda o: o.update(seed=True))),
        ("n_splits 1", edit(lambda o: o.update(n_splits=1))),
        ("predictor kind", edit(lambda o: o["predictor"].update(kind="forest"))),
        ("predictor extra key", edit(lambda o: o["predictor"].update(extra=0))),
        ("report missing key", edit(lambda o: o["cross_validation"].pop("n_rows"))),
        ("report chosen other", edit(lambda o: o["cross_validation"].update(chosen="constant" if kind != "constant"
                                                                            else "ridge(alpha=1)"))),
        ("report mae nan", edit(lambda o: o["cross_validation"]["candidates"][0].update(cv_mae=float("nan")))),
        ("report spearman 2", edit(lambda o: o["cross_validation"]["candidates"][0].update(cv_spearman=2.0))),
        ("report n_rows bool", edit(lambda o: o["cross_validation"].update(n_rows=True))),
    ]
    if kind == "ridge":
        out += [
            ("coef length", edit(lambda o: o["predictor"]["coef"].pop())),
            ("coef nan", edit(lambda o: o["predictor"]["coef"].__setitem__(0, float("nan")))),
            ("center inf", edit(lambda o: o["predictor"]["center"].__setitem__(1, float("inf")))),
            ("scale string", edit(lambda o: o["predictor"]["scale"].__setitem__(0, "1.0"))),
            ("scale zero", edit(lambda o: o["predictor"]["scale"].__setitem__(0, 0.0))),
            ("intercept missing", edit(lambda o: o["predictor"].pop("intercept"))),
            ("alpha negative", edit(lambda o: o["predictor"].update(alpha=-1.0))),
        ]
    elif kind == "isotonic":
        out += [
            ("x not increasing", edit(lambda o: o["predictor"]["x"].reverse())),
            ("y against direction", edit(lambda o: o["predictor"].update(increasing=not o["predictor"]["increasing"]))),
            ("x y lengths", edit(lambda o: o["predictor"]["y"].pop())),
            ("unknown feature", edit(lambda o: o["predictor"].update(feature="zzz"))),
            ("x empty", edit(lambda o: o["predictor"].update(x=[], y=[]))),
            ("y nan", edit(lambda o: o["predictor"]["y"].__setitem__(0, float("nan")))),
        ]
    elif kind == "isotonic_mean":
        def member(i, **kw):
            return edit(lambda o: o["predictor"]["members"][i].update(**kw))

        out += [
            ("members empty", edit(lambda o: o["predictor"].update(members=[]))),
            ("members not a list", edit(lambda o: o["predictor"].update(members=o["predictor"]["members"][0]))),
            ("member constant", edit(lambda o: o["predictor"]["members"].__setitem__(0, {"kind": "constant",
                                                                                          "value": 0.5}))),
            ("member ridge", edit(lambda o: o["predictor"]["members"].append(copy.deepcopy(
                corrupt_ridge_spec(len(o["feature_names"])))))),
            ("member nested mean", edit(lambda o: o["predictor"]["members"].__setitem__(0, {
                "kind": "isotonic_mean", "members": [o["predictor"]["members"][0]]}))),
            ("member y non-monotone", member(0, y=[0.2, 0.9, 0.1], x=[0.0, 1.0, 2.0])),
            ("member against direction", member(1, increasing=not obj["predictor"]["members"][1]["increasing"])),
            ("member unknown feature", member(0, feature="zzz")),
            ("member extra key", member(1, extra=0)),
            ("member missing", edit(lambda o: o["predictor"]["members"].pop())),  # k no longer the chosen one
            ("members extra key", edit(lambda o: o["predictor"].update(k=2))),
        ]
    else:
        out += [("value string", edit(lambda o: o["predictor"].update(value="0.5"))),
                ("value nan", edit(lambda o: o["predictor"].update(value=float("nan"))))]
    return out


def corrupt_ridge_spec(p):
    return {"kind": "ridge", "alpha": 1.0, "clip": CLIP, "center": [0.0] * p, "scale": [1.0] * p, "coef": [0.0] * p,
            "intercept": 0.5}


def test_from_json_refuses_corrupted_dicts():
    for model in fitted_models():
        obj = model.to_json()
        QualityModel.from_json(copy.deepcopy(obj), "here")  # the original is fine
        for what, bad in corruptions(obj):
            with pytest.raises(OODStateError, match=f"in here: .*{REFIT}") as err:
                QualityModel.from_json(bad, "here")
            assert "\n" not in str(err.value), what


def test_from_json_refuses_bad_isotonic_mean_members():
    model = fitted_models()[3]
    obj = model.to_json()
    member = obj["predictor"]["members"][0]
    bad_members = [
        ([], "non-empty list of isotonic members"),
        ([member, {"kind": "constant", "value": 0.5}], "non-empty list of isotonic members"),
        ([member, corrupt_ridge_spec(len(model.feature_names))], "non-empty list of isotonic members"),
        ([member, {**member, "x": [0.0, 1.0, 2.0], "y": [0.1, 0.8, 0.3]}], "y monotone in the stated direction"),
        ([member, {**member, "increasing": not member["increasing"]}], "y monotone in the stated direction"),
    ]
    for members, match in bad_members:
        bad = copy.deepcopy(obj)
        bad["predictor"]["members"] = members
        with pytest.raises(OODStateError, match=f"in here: .*{match}.*{REFIT}"):
            QualityModel.from_json(bad, "here")
    again = QualityModel.from_json(copy.deepcopy(obj), "here")
    X = np.random.default_rng(18).normal(size=(30, 4)) * 2
    np.testing.assert_array_equal(again.predict_risk(X), model.predict_risk(X))


class _Payload:
    """Unpickling calls open(marker, "w"): a file appears if anything unpickles it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_never_unpickles_and_reads_only_json(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(str(probe))))
    assert probe.exists()  # the payload is live: unpickling would leave its marker
    marker = tmp_path / "marker"
    evil = tmp_path / "quality_model.json"
    evil.write_bytes(pickle.dumps(_Payload(str(marker))))
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):  # protocol 0 is ASCII text
        evil.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=protocol))
        with pytest.raises(OODStateError, match=f"as JSON.*{REFIT}"):
            QualityModel.load(str(evil))
    assert not marker.exists()

    model = fitted_models()[2]
    assert model.predictor_["kind"] == "constant"
    pickled_dict = tmp_path / "dict.pkl"
    pickled_dict.write_bytes(pickle.dumps(model.to_json()))
    not_json = tmp_path / "text.json"
    not_json.write_text("predictor = constant\n")
    binary = tmp_path / "random.bin"
    binary.write_bytes(np.random.default_rng(0).bytes(256))
    for path in (pickled_dict, not_json, binary, tmp_path / "missing.json"):
        with pytest.raises(OODStateError, match=REFIT):
            QualityModel.load(str(path))
    for bad in ({**model.to_json(), "extra": 1}, {k: v for k, v in model.to_json().items() if k != "seed"}):
        path = tmp_path / "keys.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(OODStateError, match=f"{path}.*{REFIT}"):
            QualityModel.load(str(path))
