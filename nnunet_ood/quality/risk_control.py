"""Conformal risk control of silent failures for the accept/review decision (Angelopoulos et al., "Conformal
Risk Control", ICLR 2024).

A case is accepted iff its predicted risk is at most a threshold t, and otherwise sent to review. A silent
failure is a case that is accepted and failed (Dice below ``fail_below``; an unknown Dice counts as failed). The
calibration units are cases (groups): all versions of one case (clean, corrupted) form one unit, so the
exchangeability assumed is between cases, not between the correlated versions of one case. The loss of a unit
at t is the share of its rows that are silent failures: bounded by B = 1 and non-decreasing in t. For n units,

    t = the largest candidate (finite predicted risk) with (sum_g L_g(t) + B) / (n + 1) <= alpha

gives E[L_new(t)] <= alpha for a new unit exchangeable with the calibration units: the expected share of silent
failures is at most ``alpha``. Because every L_g is non-decreasing in t, the valid t form a down-set and the
largest one is found by one sorted pass. When even accepting nothing does not satisfy the inequality
(1 / (n + 1) > alpha: fewer than :func:`min_groups_for` units), nothing is accepted and ``enough`` is False.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from nnunet_ood.errors import OODInputError, OODStateError

#: the bound of a unit's loss (a share of its rows)
B = 1.0
#: the threshold that accepts nothing (predicted risks are in [0, 1])
NOTHING = -1.0
#: floating-point slack of the validity inequality, so that exact boundary cases (e.g. alpha (n + 1) = 1) hold
_TOL = 1e-9
REFIT = "re-fit with nnUNetv2_fit_ood"


@dataclass(frozen=True)
class RiskThreshold:
    """The accept/review threshold chosen by conformal risk control, and what it did on the calibration cases."""

    threshold: float  # accept iff predicted risk <= threshold; -1.0 when nothing can be accepted
    alpha: float  # the tolerated expected share of silent failures (accepted and failed)
    fail_below: float  # Dice below this is a failure
    n_groups: int  # calibration units (cases)
    enough: bool  # False when even accepting nothing cannot meet alpha with n_groups units
    empirical_rate: float  # mean calibration-unit loss at the threshold
    coverage: float  # share of calibration rows accepted at the threshold

    def to_json(self) -> dict[str, Any]:
        """The fields as a plain JSON dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> RiskThreshold:
        """Read :meth:`to_json`'s dict; a missing, extra, ill-typed or out-of-range field -> OODStateError."""
        names = [f.name for f in fields(cls)]
        if not isinstance(obj, dict) or set(obj) != set(names):
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise OODStateError(f"corrupted risk threshold in {where}: expected exactly the fields "
                                f"{', '.join(names)} (got {got}); {REFIT}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = obj[f.name]
            if f.type == "bool":
                ok = isinstance(value, bool)
            elif f.type == "int":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                value = float(value) if ok else value
            if not ok:
                raise OODStateError(f"corrupted risk threshold in {where}: {f.name} = {value!r} is not a valid "
                                    f"{'non-negative int' if f.type == 'int' else f.type}; {REFIT}")
            values[f.name] = value
        t = cls(**values)
        if not (0 < t.alpha < 1 and 0 < t.fail_below <= 1 and 0 <= t.empirical_rate <= 1 and 0 <= t.coverage <= 1
                and (t.enough or t.threshold == NOTHING)):
            raise OODStateError(f"corrupted risk threshold in {where}: values out of range ({t}); {REFIT}")
        return t


def _enough(n_groups: int, alpha: float) -> bool:
    """Whether accepting nothing (total loss 0) satisfies (0 + B) / (n + 1) <= alpha."""
    return B <= alpha * (n_groups + 1) + _TOL


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise OODInputError(f"the tolerated share of silent failures must be in (0, 1), got {alpha!r}; "
                            "pass e.g. 0.05")
    return float(alpha)


def min_groups_for(alpha: float) -> int:
    """The fewest calibration units (cases) with which anything can be accepted: (0 + 1) / (n + 1) <= alpha."""
    alpha = _check_alpha(alpha)
    n = max(1, math.floor(1 / alpha) - 2)  # just below the answer (floating point), then step up
    while not _enough(n, alpha):
        n += 1
    return n


def crc_threshold(risk: Sequence[float], dice: Sequence[float], fail_below: float, alpha: float,
                  groups: Sequence[str] | None = None) -> RiskThreshold:
    """The largest candidate t (a finite predicted risk) with (sum_g L_g(t) + B) / (n + 1) <= alpha.

    ``L_g(t)``: the share of unit g's rows with risk <= t and Dice < ``fail_below`` (unknown Dice: failed); n:
    the number of units (``groups``, or every row its own unit when None). Rows with NaN risk are never
    accepted. Then a new unit exchangeable with the calibration units has E[L_new(t)] <= alpha. When no
    candidate is valid the threshold is -1.0 (accept nothing). O(n log n): the sum of unit losses is a sum over
    rows of failed / (rows of its unit), so one sort and one cumulative sum give it at every candidate.
    """
    alpha = _check_alpha(alpha)
    if isinstance(fail_below, bool) or not isinstance(fail_below, (int, float)) or not 0 < fail_below <= 1:
        raise OODInputError(f"fail_below must be a Dice in (0, 1], got {fail_below!r}")
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    dice = np.asarray(dice, dtype=np.float64).reshape(-1)
    labels = np.arange(len(risk)).astype(str) if groups is None else np.asarray([str(g) for g in groups])
    if not len(risk) == len(dice) == len(labels):
        raise OODInputError(f"risk control got {len(risk)} risks, {len(dice)} Dice values and {len(labels)} "
                            "groups; give one of each per calibration row")
    if len(risk) == 0:
        raise OODInputError("risk control got no calibration rows; give it labelled cases")
    finite = np.isfinite(risk)
    if np.any(np.isinf(risk)) or np.any(risk[finite] < 0) or np.any(risk[finite] > 1):
        raise OODInputError("predicted risks must lie in [0, 1] (NaN for cases that could not be scored)")
    _, unit = np.unique(labels, return_inverse=True)
    unit = unit.reshape(-1)
    n_units = int(unit.max()) + 1
    rows_of_unit = np.bincount(unit, minlength=n_units)
    failed = ~(dice >= fail_below)  # NaN Dice: failed, which can only make the threshold stricter
    # each accepted failed row adds 1 / (rows of its unit) to the sum of unit losses
    weight = np.where(failed, 1.0 / rows_of_unit[unit], 0.0)[finite]
    order = np.argsort(risk[finite], kind="stable")
    sorted_risk = risk[finite][order]
    total_loss = np.cumsum(weight[order])
    # the candidates are the distinct risks; accepting t takes every row up to the last one equal to t
    last = np.flatnonzero(np.append(np.diff(sorted_risk) > 0, True)) if sorted_risk.size else np.array([], int)
    valid = total_loss[last] + B <= alpha * (n_units + 1) + _TOL  # non-decreasing loss: a prefix is valid
    n_valid = int(np.count_nonzero(valid))
    enough = _enough(n_units, alpha)
    if n_valid == 0 or not enough:
        return RiskThreshold(threshold=NOTHING, alpha=alpha, fail_below=float(fail_below), n_groups=n_units,
                             enough=enough, empirical_rate=0.0, coverage=0.0)
    end = last[n_valid - 1]
    return RiskThreshold(threshold=float(sorted_risk[end]), alpha=alpha, fail_below=float(fail_below),
                         n_groups=n_units, enough=True, empirical_rate=float(total_loss[end]) / n_units,
                         coverage=(end + 1) / len(risk))


def decide(risk: np.ndarray | float, threshold: float) -> np.ndarray:
    """True = accept (predicted risk <= threshold); NaN risk -> False (review)."""
    return np.asarray(np.asarray(risk, dtype=np.float64) <= threshold)
