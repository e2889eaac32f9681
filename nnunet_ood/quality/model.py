"""The quality model: a case's risk r = 1 - Dice predicted from its feature row (method scores, segmentation
properties), chosen among a few simple candidates by cross-validation grouped by case, stored as plain JSON.

Candidates (:func:`candidates`), in this order (the order breaks exact ties of the CV error):

* ``constant``: the mean training risk (the model to beat);
* ``ridge(alpha=A)`` for A in :data:`RIDGE_ALPHAS` (largest first): ridge regression on robustly standardised
  features (median, scale IQR / 1.349, else the standard deviation, else 1), the standardised values clipped to
  [-:data:`CLIP`, :data:`CLIP`] so that one far-out score cannot push the linear model into nonsense; closed
  form, intercept unpenalised (as scikit-learn's ``Ridge``);
* ``isotonic(F)`` for every feature F: a monotone fit of the risk on F alone, its direction the sign of
  Spearman's correlation on the training part (increasing when it is 0 or undefined), stored as knots (x, y)
  and evaluated with ``np.interp`` (flat beyond the end knots);
* ``isotonic_mean(k=K)`` for K in :data:`MEAN_SIZES` (below the number of features): the mean of the isotonic fits
  of the K features most rank-correlated (|Spearman|) with the risk on the training part.

The chosen candidate has the lowest mean absolute error of its out-of-fold predictions (:func:`group_kfold`
over the cases, so versions of one case are never on both sides), pooled over rows; it is then refitted on all
rows. Every prediction is clipped to [0, 1] and then tie-broken (:func:`predict_spec`): flat stretches keep the
order of the fit's own score, moving a prediction by at most :data:`TIE_BREAK` (the choice itself compares the
fits without it). Rows with a non-finite feature or Dice are left out of the fit; at prediction a NaN feature
gives a NaN risk (the case goes to review), while +-inf is beyond every knot and clip: the most extreme value.

Stored JSON (:meth:`QualityModel.to_json`): ``format`` ("nnunet_ood.quality_model"), ``schema_version`` (1),
``feature_names``, ``seed``, ``n_splits``, ``predictor`` (``{"kind": "constant", "value"}``, ``{"kind": "ridge",
"alpha", "clip", "center", "scale", "coef", "intercept"}``, ``{"kind": "isotonic", "feature", "increasing", "x",
"y"}`` or ``{"kind": "isotonic_mean", "members": [isotonic predictors]}``) and ``cross_validation`` (the CV
report). Reading it is strict and never executes anything (:mod:`nnunet_ood.quality.model_json`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnunet_ood.errors import OODInputError, OODStateError
from nnunet_ood.quality.grouped_cv import group_kfold
from nnunet_ood.quality.model_json import (
    FORMAT,
    REFIT,
    SCHEMA_VERSION,
    check_integer,
    check_keys,
    check_report,
    check_spec,
    corrupted,
)
from nnunet_ood.ranks import average_ranks, spearman  # noqa: F401 (re-exported for the tests)

#: ridge penalties tried, each its own candidate (on standardised features; the penalty adds to X'X)
RIDGE_ALPHAS: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0)
#: standardised features are clipped to [-CLIP, CLIP] before the linear model sees them
CLIP = 5.0
#: sizes of the averaged monotone fits (the k features most correlated with the risk on the training part)
MEAN_SIZES: tuple[int, ...] = (2, 3, 5)
#: weight of the tie-break: flat stretches of a fit (isotonic blocks, beyond the end knots, the clip at 0 and 1)
#: are ordered by the fit's underlying score, so that the ranking of cases is not lost to ties
TIE_BREAK = 1e-3
#: the normal distribution's IQR in standard deviations: IQR / 1.349 estimates the std robustly
_IQR_TO_STD = 1.349
SELECTION = "lowest grouped-CV mean absolute error (ties: first candidate in order)"


# ---------------------------------------------------------------------------------------------- candidates
def robust_scaling(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(center, scale)`` per column: the median, and IQR / 1.349, else the std, else 1 (never 0)."""
    center = np.median(X, axis=0)
    q25, q75 = np.percentile(X, [25, 75], axis=0)
    scale = (q75 - q25) / _IQR_TO_STD
    std = X.std(axis=0)
    # a feature constant on most rows has IQR 0: fall back on the std, and on 1 for a constant feature
    scale = np.where(scale > 0, scale, np.where(std > 0, std, 1.0))
    return center, scale


def standardise(X: np.ndarray, center: np.ndarray, scale: np.ndarray, clip: float = CLIP) -> np.ndarray:
    """``(X - center) / scale`` clipped to ``[-clip, clip]`` (NaN stays NaN)."""
    return np.clip((X - center) / scale, -clip, clip)


def fit_ridge(Z: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """``(coef, intercept)`` minimising ``|y - Z coef - intercept|^2 + alpha |coef|^2`` (intercept unpenalised):
    scikit-learn's ``Ridge``, whose fitted parameters the model stores as JSON."""
    from sklearn.linear_model import Ridge

    model = Ridge(alpha=alpha).fit(Z, y)
    return np.asarray(model.coef_, dtype=np.float64).reshape(-1), float(model.intercept_)


def fit_isotonic(x: np.ndarray, y: np.ndarray, increasing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Knots ``(kx, ky)`` of the least-squares monotone fit of ``y`` on ``x``: scikit-learn's
    ``IsotonicRegression`` (``out_of_bounds="clip"``), its ``X_thresholds_`` and ``y_thresholds_`` (the two ends of
    each constant block; ``kx`` strictly increasing). ``np.interp(x_new, kx, ky)`` reproduces its predictions, so the
    model stores the knots as JSON and needs no pickle."""
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(increasing=increasing, out_of_bounds="clip").fit(np.asarray(x, dtype=np.float64),
                                                                              np.asarray(y, dtype=np.float64))
    return np.asarray(model.X_thresholds_, dtype=np.float64), np.asarray(model.y_thresholds_, dtype=np.float64)


@dataclass(frozen=True)
class Candidate:
    """One kind of model the cross-validation compares: ``constant``, ``ridge`` (with ``alpha``), ``isotonic``
    (on ``feature``) or ``isotonic_mean`` (of ``k`` features)."""

    kind: str
    alpha: float | None = None
    feature: str | None = None
    k: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "ridge":
            return f"ridge(alpha={self.alpha:g})"
        if self.kind == "isotonic":
            return f"isotonic({self.feature})"
        if self.kind == "isotonic_mean":
            return f"isotonic_mean(k={self.k})"
        return self.kind


def candidates(feature_names: Sequence[str]) -> list[Candidate]:
    """The candidates in their tie-breaking order: constant, ridge (largest alpha first), isotonic per feature,
    then the means of the k best isotonic fits (k < number of features)."""
    return [Candidate("constant"), *(Candidate("ridge", alpha=a) for a in sorted(RIDGE_ALPHAS, reverse=True)),
            *(Candidate("isotonic", feature=f) for f in feature_names),
            *(Candidate("isotonic_mean", k=k) for k in MEAN_SIZES if k < len(feature_names))]


def _isotonic_spec(feature: str, x: np.ndarray, risk: np.ndarray) -> dict[str, Any]:
    increasing = not spearman(x, risk) < 0  # 0 or undefined (a constant side): increasing, the fit is flat
    kx, ky = fit_isotonic(x, risk, increasing)
    return {"kind": "isotonic", "feature": feature, "increasing": increasing, "x": kx.tolist(), "y": ky.tolist()}


def fit_candidate(candidate: Candidate, X: np.ndarray, risk: np.ndarray,
                  feature_names: Sequence[str]) -> dict[str, Any]:
    """Fit ``candidate`` on finite rows ``X`` and their risks; the fitted predictor as a JSON-able spec."""
    if candidate.kind == "constant":
        return {"kind": "constant", "value": float(risk.mean())}
    if candidate.kind == "ridge":
        center, scale = robust_scaling(X)
        coef, intercept = fit_ridge(standardise(X, center, scale), risk, float(candidate.alpha))
        return {"kind": "ridge", "alpha": float(candidate.alpha), "clip": CLIP, "center": center.tolist(),
                "scale": scale.tolist(), "coef": coef.tolist(), "intercept": float(intercept)}
    if candidate.kind == "isotonic_mean":  # the k features most rank-correlated with the risk, each fitted monotone
        strength = [abs(spearman(X[:, j], risk)) for j in range(X.shape[1])]
        order = sorted(range(X.shape[1]), key=lambda j: (-(0.0 if math.isnan(strength[j]) else strength[j]), j))
        return {"kind": "isotonic_mean", "members": [_isotonic_spec(feature_names[j], X[:, j], risk)
                                                     for j in order[:candidate.k]]}
    j = list(feature_names).index(candidate.feature)
    return _isotonic_spec(candidate.feature, X[:, j], risk)


def _squash(v: np.ndarray) -> np.ndarray:
    """A strictly increasing map of the real line into (0, 1) that keeps far-apart values distinct."""
    return 0.5 + np.arctan(np.sign(v) * np.log1p(np.abs(v))) / math.pi


def _raw_prediction(spec: dict[str, Any], X: np.ndarray, feature_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(risk before the clip to [0, 1], tie-break score in (0, 1))``; NaN features read as 0 (reset later)."""
    if spec["kind"] == "constant":
        return np.full(X.shape[0], spec["value"], dtype=np.float64), np.full(X.shape[0], 0.5)
    if spec["kind"] == "ridge":
        center, scale = np.asarray(spec["center"]), np.asarray(spec["scale"])
        coef = np.asarray(spec["coef"], dtype=np.float64)
        risk = np.nan_to_num(standardise(X, center, scale, spec["clip"]), nan=0.0) @ coef + spec["intercept"]
        # the tie-break orders what the clips flatten by the unclipped linear score; +-inf (or a standardised
        # value that overflows) is capped so that the sum stays finite (never inf - inf = NaN)
        cap = np.finfo(np.float64).max / (4.0 * max(1.0, float(np.abs(coef).sum())))
        unclipped = np.clip(np.nan_to_num(standardise(X, center, scale, math.inf), nan=0.0), -cap, cap) @ coef
        return risk, _squash(unclipped + spec["intercept"])
    if spec["kind"] == "isotonic_mean":
        parts = [_raw_prediction(m, X, feature_names) for m in spec["members"]]
        return np.mean([r for r, _ in parts], axis=0), np.mean([t for _, t in parts], axis=0)
    x = np.nan_to_num(X[:, list(feature_names).index(spec["feature"])], nan=0.0)
    return np.interp(x, spec["x"], spec["y"]), _squash(x if spec["increasing"] else -x)


def predict_spec(spec: dict[str, Any], X: np.ndarray, feature_names: Sequence[str],
                 tie_break: bool = True) -> np.ndarray:
    """Risk of every row of ``X`` under a fitted spec, in [0, 1]; NaN where any feature is NaN.

    ``tie_break``: ``(1 - TIE_BREAK) * clip(risk) + TIE_BREAK * s`` with ``s`` a strictly monotone function of the
    fit's own score (the feature in the fit's direction, the unclipped linear predictor), so that cases the fit
    puts on one flat stretch keep that score's order; it moves a prediction by at most :data:`TIE_BREAK`.
    """
    risk, tie = _raw_prediction(spec, X, feature_names)
    risk = np.clip(risk, 0.0, 1.0)
    if tie_break:
        risk = (1.0 - TIE_BREAK) * risk + TIE_BREAK * tie
    risk[np.isnan(X).any(axis=1)] = np.nan
    return risk


def _spec_name(spec: dict[str, Any]) -> str:
    return Candidate(spec["kind"], alpha=spec.get("alpha"), feature=spec.get("feature"),
                     k=len(spec["members"]) if spec["kind"] == "isotonic_mean" else None).name


# ---------------------------------------------------------------------------------------------- the model
class QualityModel:
    """Predicts a case's risk 1 - Dice from its features (columns named by ``feature_names``)."""

    def __init__(self, feature_names: Sequence[str], seed: int = 0, n_splits: int = 5) -> None:
        names = list(feature_names)
        if not names or any(not isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise OODInputError(f"the quality model needs distinct feature names (strings), got {names!r}")
        if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
            raise OODInputError(f"the quality model's cross-validation needs n_splits >= 2, got {n_splits!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise OODInputError(f"the quality model's seed must be an integer >= 0, got {seed!r}")
        self.feature_names = names
        self.seed = int(seed)
        self.n_splits = int(n_splits)
        self.predictor_: dict[str, Any] | None = None
        self.cv_report_: dict[str, Any] = {}
        #: the chosen candidate's out-of-fold risks of the rows given to fit (NaN for rows left out); None when
        #: the model was loaded rather than fitted
        self.oof_risk_: np.ndarray | None = None

    def _matrix(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.feature_names):
            raise OODInputError(f"the quality model reads {len(self.feature_names)} features "
                                f"({', '.join(self.feature_names)}), got an array of shape {X.shape}; pass one row "
                                "per case and one column per feature, in that order")
        return X

    def fit(self, X: np.ndarray, dice: np.ndarray, groups: Sequence[str]) -> QualityModel:
        """Choose a candidate by grouped cross-validation of its mean absolute error and refit it on all rows.

        ``groups`` names each row's case: its versions stay on one side of every split. Rows with a non-finite
        feature or Dice are left out (counted in ``cv_report_["n_dropped"]``); at least 2 cases must remain.
        """
        X = self._matrix(X)
        dice = np.asarray(dice, dtype=np.float64).reshape(-1)
        groups = [str(g) for g in groups]
        if not len(dice) == len(groups) == X.shape[0]:
            raise OODInputError(f"the quality model got {X.shape[0]} feature rows, {len(dice)} Dice values and "
                                f"{len(groups)} groups; give one of each per row")
        if np.any((dice < 0) | (dice > 1)):
            raise OODInputError("Dice values must lie in [0, 1] (NaN for unknown); check the failure table")
        keep = np.isfinite(X).all(axis=1) & np.isfinite(dice)
        Xk, risk = X[keep], 1.0 - dice[keep]
        gk = [g for g, k in zip(groups, keep) if k]
        if len(set(gk)) < 2:
            raise OODInputError(f"the quality model needs rows of at least 2 cases with finite features and Dice, "
                                f"got {len(set(gk))} ({int((~keep).sum())} of {len(keep)} rows have NaN/Inf); "
                                "check the failure table's features")
        folds = group_kfold(gk, self.n_splits, self.seed)
        cands = candidates(self.feature_names)
        oof, plain = np.empty((len(cands), len(risk))), np.empty((len(cands), len(risk)))
        for train, test in folds:
            for c, candidate in enumerate(cands):
                spec = fit_candidate(candidate, Xk[train], risk[train], self.feature_names)
                oof[c, test] = predict_spec(spec, Xk[test], self.feature_names)
                plain[c, test] = predict_spec(spec, Xk[test], self.feature_names, tie_break=False)
        # the choice by the fits' own error: the tie-break must not decide between near-equal candidates
        mae = np.abs(plain - risk).mean(axis=1)
        best = int(np.argmin(mae))  # the first of equal errors: the simpler candidate
        rows = []
        for c, candidate in enumerate(cands):
            rho = spearman(oof[c], risk)
            rows.append({"name": candidate.name, "cv_mae": float(mae[c]),
                         "cv_spearman": None if math.isnan(rho) else rho})
        self.predictor_ = fit_candidate(cands[best], Xk, risk, self.feature_names)
        self.cv_report_ = {"chosen": cands[best].name, "selection": SELECTION, "n_rows": int(keep.sum()),
                           "n_groups": len(set(gk)), "n_dropped": int((~keep).sum()), "n_splits": len(folds),
                           "candidates": rows}
        self.oof_risk_ = np.full(len(dice), np.nan)
        self.oof_risk_[keep] = oof[best]
        return self

    def _fitted(self) -> dict[str, Any]:
        if self.predictor_ is None:
            raise OODStateError(f"the quality model is not fitted; call fit or load a fitted one ({REFIT})")
        return self.predictor_

    def predict_risk(self, X: np.ndarray) -> np.ndarray:
        """Predicted risk 1 - Dice per row, in [0, 1]; NaN for rows with a NaN feature (send them to review)."""
        return predict_spec(self._fitted(), self._matrix(X), self.feature_names)

    def to_json(self) -> dict[str, Any]:
        """Everything needed to predict (and the CV report), as plain JSON: lists of floats, strings, ints."""
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "feature_names": list(self.feature_names),
                "seed": self.seed, "n_splits": self.n_splits, "predictor": json.loads(json.dumps(self._fitted())),
                "cross_validation": json.loads(json.dumps(self.cv_report_))}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> QualityModel:
        """A model from :meth:`to_json`'s dict; any missing, extra or ill-typed key -> :class:`OODStateError`."""
        check_keys(obj, ("format", "schema_version", "feature_names", "seed", "n_splits", "predictor",
                         "cross_validation"), "the quality model", where)
        if obj["format"] != FORMAT or obj["schema_version"] != SCHEMA_VERSION or isinstance(obj["schema_version"],
                                                                                            bool):
            raise corrupted(where, f"format {obj['format']!r} version {obj['schema_version']!r} is not {FORMAT} "
                            f"version {SCHEMA_VERSION}")
        names = obj["feature_names"]
        if not isinstance(names, list) or not names or any(not isinstance(n, str) for n in names) or \
                len(set(names)) != len(names):
            raise corrupted(where, "feature_names must be a non-empty list of distinct strings")
        model = cls(names, seed=check_integer(obj["seed"], "seed", where, 0),
                    n_splits=check_integer(obj["n_splits"], "n_splits", where, 2))
        model.predictor_ = check_spec(obj["predictor"], names, where)
        model.cv_report_ = check_report(obj["cross_validation"], where)
        if model.cv_report_["chosen"] != _spec_name(model.predictor_):
            raise corrupted(where, f"the predictor ({_spec_name(model.predictor_)}) is not the one cross_validation "
                            f"chose ({model.cv_report_['chosen']})")
        return model

    def save(self, path: str) -> None:
        """Write the model as a JSON file, atomically."""
        from nnunet_ood.io.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str) -> QualityModel:
        """Read a model written by :meth:`save`. Only JSON is parsed: anything else (a pickle, a binary or
        malformed file) raises :class:`OODStateError`; nothing in the file is ever executed."""
        try:
            with open(path, "rb") as f:
                obj = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise OODStateError(f"cannot read the quality model {path} as JSON ({e}); {REFIT}") from None
        return cls.from_json(obj, str(path))
