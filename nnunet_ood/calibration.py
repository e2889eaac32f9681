"""Per-method calibration: display normalisation, ID threshold and case aggregation (no torch, no nnU-Net).

A method's case scores are put on a common scale (``normalized``, [0, 1]) and flagged ``ood`` above a
threshold. Both numbers come from in-distribution cases (METHODS.md §1): ``low`` = the smallest and
``high`` = twice the largest training-case score, and the threshold from the validation-case scores (at
fit time) or from a site's own cases (``nnUNetv2_calibrate_ood``). The normalisation itself lives in
:mod:`nnunet_ood.normalization` (re-exported here as ``normalize_score`` and ``normalization_bounds``).

Thresholds are finite-sample quantiles (:func:`conformal_threshold`): for a false-alarm rate a on n
calibration cases, the ceil((n + 1)(1 - a))-th smallest score, so that a new case exchangeable with the
calibration cases is flagged with probability at most a.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from nnunet_ood.errors import OODStateError
from nnunet_ood.normalization import bounds_from_scores, normalize, usable_bounds

#: the names this module gave the normalisation before it moved to nnunet_ood.normalization
normalize_score = normalize
normalization_bounds = bounds_from_scores

#: how a method's voxel map becomes its case score (chosen at fit time, stored with the calibration)
CASE_AGGREGATIONS: tuple[str, ...] = ("mean", "foreground_mean", "max_patch")
#: default share of in-distribution cases the ``ood`` flag may reject (the false-alarm rate)
FALSE_ALARM_RATE = 0.05
REFIT = "re-fit it with nnUNetv2_fit_ood"
#: the largest magnitude a stored score, bound or threshold may have. Case scores are means of float32 voxel maps
#: (at most 3.4e38) and the normalisation adds at most twice their range: a larger value (1e308) was never
#: computed, and one such bound made ``high - low`` overflow to inf (every normalised score NaN)
SCORE_LIMIT = 1e40
#: every value a score can take
ANY_SCORE: tuple[float, float] = (-math.inf, math.inf)


def conformal_rank(n: int, false_alarm_rate: float) -> int:
    """The rank k = ceil((n + 1)(1 - a)) of the threshold among n sorted calibration scores (1-based)."""
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"the false-alarm rate must be in (0, 1), got {false_alarm_rate}")
    return math.ceil((n + 1) * (1 - false_alarm_rate) - 1e-9)  # the tolerance keeps exact products exact


def min_cases_for(false_alarm_rate: float) -> int:
    """The fewest calibration cases for which the rank exists: ceil((n + 1)(1 - a)) <= n."""
    return next(n for n in range(1, 10**7) if conformal_rank(n, false_alarm_rate) <= n)


def conformal_threshold(scores: Sequence[float], false_alarm_rate: float = FALSE_ALARM_RATE) -> tuple[float, bool]:
    """``(threshold, enough)``: the ceil((n + 1)(1 - a))-th smallest finite score.

    A new case exchangeable with the calibration cases scores above it with probability at most a
    (split-conformal quantile). With too few cases for the rate (rank above n), the threshold is the largest
    score and ``enough`` is False: the false-alarm rate is then only bounded by 1 / (n + 1).
    """
    finite = sorted(s for s in scores if math.isfinite(s))
    if not finite:
        raise ValueError("no finite scores to take a threshold from")
    rank = conformal_rank(len(finite), false_alarm_rate)
    return finite[min(rank, len(finite)) - 1], rank <= len(finite)


@dataclass
class MethodCalibration:
    """Per-method numbers recorded at fit time: display normalisation, ID threshold, case aggregation."""

    low: float  # min of ID training case scores
    high: float  # 2 * max of ID training case scores (max + (max - min) if some are negative)
    threshold: float  # finite-sample quantile of the calibration case scores (conformal_threshold)
    n_train_cases: int = 0
    n_val_cases: int = 0
    aggregation: str = "mean"  # how the voxel map becomes the case score (nnunet_ood.aggregation)
    false_alarm_rate: float = FALSE_ALARM_RATE  # the rate the threshold was chosen for

    @property
    def calibrated(self) -> bool:
        """False for methods without a per-fold calibration (fold ensembles): no normalisation, no flag."""
        return not math.isnan(self.threshold)

    def normalize(self, score: float) -> float:
        """The score on the [0, 1] display scale (NaN for uncalibrated methods and NaN scores)."""
        return normalize(score, self.low, self.high) if self.calibrated else math.nan

    def flag(self, score: float) -> bool:
        """Out of distribution: above the threshold, or NaN (a case that could not be scored)."""
        return self.calibrated and not (score <= self.threshold)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def bounds_problem(self) -> str | None:
        """Why the normalisation bounds cannot be used, None when they can: a calibrated method needs finite
        bounds with ``low <= high``."""
        if not self.calibrated:
            return None
        if not usable_bounds(self.low, self.high):
            return f"normalisation bounds low={self.low:g}, high={self.high:g} are not finite with low <= high"
        return None

    @classmethod
    def from_json(cls, entry: Any, where: str, fix: str = REFIT, score_range: tuple[float, float] = ANY_SCORE,
                  special_thresholds: Sequence[float] = ()) -> MethodCalibration:
        """Read a manifest entry; a one-line error (ending in ``fix``) when a field is missing or of the wrong
        type, out of range, or the bounds are unusable (:meth:`bounds_problem`).

        ``score_range``: the values the method's case scores can take (``Method.score_range``); the lower bound
        and the threshold must lie in it (a negative threshold of a distance flagged every case), the upper bound
        above its start. ``special_thresholds``: thresholds with a meaning of their own outside it (quality's -1,
        accept nothing). Every value is at most :data:`SCORE_LIMIT` in magnitude and every count non-negative."""
        names = {f.name: f for f in fields(cls)}
        if not isinstance(entry, dict) or any(k not in names for k in entry) or \
                any(k not in entry for k in ("low", "high", "threshold")):
            raise OODStateError(f"corrupted calibration in {where}: expected the fields {', '.join(names)}; "
                                f"{fix}")
        values = {}
        for key, value in entry.items():
            kind = names[key].type
            if kind == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif kind == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, str) and value in CASE_AGGREGATIONS
            if not ok:
                allowed = f" (one of {', '.join(CASE_AGGREGATIONS)})" if key == "aggregation" else ""
                raise OODStateError(f"corrupted calibration in {where}: {key} = {value!r} is not a valid "
                                    f"{'aggregation' if key == 'aggregation' else kind}{allowed}; {fix}")
            values[key] = float(value) if kind == "float" else value
        # a stored threshold is always finite (NaN made the method silently 'uncalibrated': it never flagged)
        if not math.isfinite(values["threshold"]) or not 0 < values.get("false_alarm_rate", FALSE_ALARM_RATE) < 1:
            raise OODStateError(f"corrupted calibration in {where}: threshold = {values['threshold']!r} must be finite "
                                f"and false_alarm_rate = {values.get('false_alarm_rate', FALSE_ALARM_RATE)!r} in "
                                f"(0, 1); {fix}")
        problem = _range_problem(values, score_range, special_thresholds)
        if problem is not None:
            raise OODStateError(f"corrupted calibration in {where}: {problem}; {fix}")
        calibration = cls(**values)
        problem = calibration.bounds_problem()
        if problem is not None:
            raise OODStateError(f"corrupted calibration in {where}: {problem}; {fix}")
        return calibration

    @classmethod
    def uncalibrated(cls) -> MethodCalibration:
        """The calibration of a method that a per-fold fit cannot calibrate (fold ensembles)."""
        return cls(math.nan, math.nan, math.nan)

    @classmethod
    def from_scores(cls, train_scores: Sequence[float], val_scores: Sequence[float],
                    false_alarm_rate: float = FALSE_ALARM_RATE, aggregation: str = "mean") -> MethodCalibration:
        """Normalisation from training case scores, threshold from validation case scores (NaNs ignored)."""
        train = [s for s in train_scores if math.isfinite(s)]
        val = [s for s in val_scores if math.isfinite(s)]
        if not train or not val:
            raise OODStateError("no finite OOD scores on the fold's training or validation cases; "
                                "check the preprocessed data for NaN/Inf and re-run nnUNetv2_fit_ood")
        low, high = bounds_from_scores(train)
        threshold, _ = conformal_threshold(val, false_alarm_rate)
        return cls(low=low, high=high, threshold=threshold, n_train_cases=len(train_scores),
                   n_val_cases=len(val_scores), aggregation=aggregation, false_alarm_rate=false_alarm_rate)


def _range_problem(values: dict[str, Any], score_range: tuple[float, float],
                   special_thresholds: Sequence[float]) -> str | None:
    """Why the values of a stored calibration lie outside what a fit or calibration computes, or None."""
    for key in ("n_train_cases", "n_val_cases"):
        if values.get(key, 0) < 0:
            return f"{key} = {values[key]!r} is negative"
    for key in ("low", "high", "threshold"):
        if abs(values[key]) > SCORE_LIMIT:  # NaN passes here: bounds_problem and the threshold check name it
            return f"{key} = {values[key]!r} is beyond any score (|value| <= {SCORE_LIMIT:g})"
    start, end = score_range
    shown = f"[{start:g}, {end:g}]"
    if math.isfinite(values["low"]) and not start <= values["low"] <= end:
        return f"low = {values['low']!r} is outside the method's scores {shown}"
    if math.isfinite(values["high"]) and values["high"] < start:
        return f"high = {values['high']!r} is below the method's scores {shown}"
    threshold = values["threshold"]
    if not start <= threshold <= end and threshold not in special_thresholds:
        return f"threshold = {threshold!r} is outside the method's scores {shown}"
    return None


def combine_calibrations(calibrations: Sequence[MethodCalibration]) -> MethodCalibration:
    """Several folds average their per-patch scores, so bounds and threshold are averaged the same way."""
    n = len(calibrations)
    if len({c.aggregation for c in calibrations}) > 1:
        raise OODStateError("the folds' OOD states aggregate a method's map to case scores differently; re-fit "
                            "them with the same --ood_aggregation")
    return MethodCalibration(low=sum(c.low for c in calibrations) / n, high=sum(c.high for c in calibrations) / n,
                             threshold=sum(c.threshold for c in calibrations) / n,
                             n_train_cases=sum(c.n_train_cases for c in calibrations),
                             n_val_cases=sum(c.n_val_cases for c in calibrations),
                             aggregation=calibrations[0].aggregation,
                             false_alarm_rate=calibrations[0].false_alarm_rate)


def calibrated_scores(scores: dict[str, float], calibration: dict[str, MethodCalibration]) -> dict[str, dict[str, Any]]:
    """Per method ``{score, normalized, ood, threshold}``; uncalibrated methods are never flagged."""
    out = {}
    for method, value in scores.items():
        c = calibration[method]
        out[method] = {"score": value, "normalized": c.normalize(value), "ood": c.flag(value),
                       "threshold": c.threshold if c.calibrated else None}
    return out
