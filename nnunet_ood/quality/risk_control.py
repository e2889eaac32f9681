"""The accept/review rule of a method that predicts Dice: which predicted risks are accepted, and what that
guarantees (METHODS.md §6).

A case is accepted iff its predicted risk r is at most a threshold, and otherwise sent to review; it *fails*
when its Dice is below ``fail_below`` (an unknown Dice counts as failed). Two rules choose the threshold on
labelled calibration cases; never confuse what they bound:

* ``ltt`` (default), Learn then Test (Angelopoulos, Bates, Candès, Jordan & Lei 2021) on the failure rate
  **among accepted cases**. A grid of thresholds, label-free (the calibration risks' quantiles at every
  ``GRID_STEP`` of coverage), is tested from strictest to loosest, starting at the first threshold that
  accepts at least ``max(n_min, START_SHARE * n)`` cases (a stricter one cannot be rejected, or only with little
  power: one early failure would end the sequence). At threshold j, ``n_j`` calibration rows are accepted and
  ``k_j`` of them fail; the exact binomial p-value of "rate among accepted > alpha" is
  ``P(Bin(n_j, alpha) <= k_j)``. Fixed-sequence testing goes on while ``p_j <= delta``; the threshold is the
  last one reached (nothing is accepted when the first fails). Then, with probability at least ``1 - delta``
  over the calibration cases, P(Dice < fail_below | accepted) <= alpha for cases exchangeable with them. The
  grid and the start depend on the calibration risks (not on the labels); validity is shown by simulation
  (``tests/test_risk_control.py``, ``benchmarks/bench_risk_control.py``), not by argument. MAPIE's
  ``risk_control`` implements LTT for a binary classifier's precision with Hoeffding-Bentkus p-values over a
  fixed grid of probability thresholds; here the units are Dice failures of cases grouped by the failure table,
  the exact binomial p-value is more powerful than Hoeffding-Bentkus at these sample sizes (20-300 cases), and the
  grid adapts to the predicted risks' scale, so the ~40 lines are written with scipy.
* ``crc``, conformal risk control (Angelopoulos, Bates, Fisch, Lei & Schuster, ICLR 2024): the largest candidate
  t with ``(sum_g L_g(t) + 1) / (n + 1) <= alpha``, where ``L_g(t)`` is the share of unit g's rows accepted and
  failed. Then E[L_new(t)] <= alpha: the **expected share of all cases that are accepted and fail**, averaged
  over calibration sets; not the rate among accepted cases, and no statement with confidence.

Calibration units: with ``groups`` (the failure table's versions of one case), ``crc`` takes a unit per case;
``ltt`` counts rows, as if versions were independent (the fit's threshold is an estimate anyway, since its
corruptions are synthetic). A site's labelled cases have one row each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from nnunet_ood.errors import OODInputError, OODStateError

#: the rules, the first the default
RULES: tuple[str, ...] = ("ltt", "crc")
#: default confidence 1 - delta of ``ltt``
CONFIDENCE = 0.9
#: the bound of a unit's loss (a share of its rows)
B = 1.0
#: the threshold that accepts nothing (predicted risks are in [0, 1])
NOTHING = -1.0
#: ``ltt``'s grid: the calibration risks' quantiles at every GRID_STEP of coverage (coarse: each step adds cases)
GRID_STEP = 0.05
#: ``ltt`` starts at the first grid threshold accepting at least this share of the calibration rows (and n_min)
START_SHARE = 1 / 3
#: floating-point slack of the validity inequality, so that exact boundary cases (e.g. alpha (n + 1) = 1) hold
_TOL = 1e-9
REFIT = "re-fit with nnUNetv2_fit_ood"
#: the fields of thresholds stored before the rule was recorded (conformal risk control only)
_LEGACY_FIELDS = ("threshold", "alpha", "fail_below", "n_groups", "enough", "empirical_rate", "coverage")


@dataclass(frozen=True)
class RiskThreshold:
    """The accept/review threshold, the rule that chose it and what it did on the calibration cases."""

    threshold: float  # accept iff predicted risk <= threshold; -1.0 when nothing can be accepted
    alpha: float  # ltt: tolerated failure rate among accepted; crc: tolerated expected share accepted and failed
    fail_below: float  # Dice below this is a failure
    n_groups: int  # calibration units (cases)
    enough: bool  # False when no outcome of n_groups units could support alpha (then nothing is accepted)
    empirical_rate: float  # calibration rows accepted and failed, as a share of all (crc: mean unit loss)
    coverage: float  # share of calibration rows accepted at the threshold
    rule: str = "crc"  # "ltt" or "crc"
    confidence: float | None = None  # ltt: 1 - delta; crc: None (an expected value, no confidence)
    n_rows: int = 0  # calibration rows (versions of the cases); 0 for a threshold stored before the rule was recorded
    n_accepted: int = 0  # calibration rows accepted
    accepted_failure_rate: float = 0.0  # failed among the accepted rows (0 when none is accepted)
    n_needed: int = 0  # the fewest calibration units with which the rule can accept anything

    def to_json(self) -> dict[str, Any]:
        """The fields as a plain JSON dict."""
        return asdict(self)

    @property
    def accepts_anything(self) -> bool:
        return self.threshold != NOTHING

    @classmethod
    def from_json(cls, obj: Any, where: str) -> RiskThreshold:
        """Read :meth:`to_json`'s dict; a missing, extra, ill-typed or out-of-range field -> OODStateError.

        A threshold stored before the rule was recorded (the first seven fields only) was chosen by conformal
        risk control: it is read as ``rule = "crc"``, named so wherever it is shown."""
        names = [f.name for f in fields(cls)]
        legacy = isinstance(obj, dict) and set(obj) == set(_LEGACY_FIELDS)
        if not isinstance(obj, dict) or (set(obj) != set(names) and not legacy):
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise OODStateError(f"corrupted risk threshold in {where}: expected exactly the fields "
                                f"{', '.join(names)} (got {got}); {REFIT}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in obj:
                continue
            value = obj[f.name]
            if f.name == "rule":
                ok = value in RULES
            elif f.name == "confidence":
                ok = value is None or (_is_number(value) and 0 < value < 1)
            elif f.type == "bool":
                ok = isinstance(value, bool)
            elif f.type == "int":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            else:
                ok = _is_number(value)
                value = float(value) if ok else value
            if not ok:
                raise OODStateError(f"corrupted risk threshold in {where}: {f.name} = {value!r} is not a valid "
                                    f"{'non-negative int' if f.type == 'int' else f.type}; {REFIT}")
            values[f.name] = value
        t = cls(**values)
        # a predicted risk is in [0, 1]: 1e308 accepted every case, -5 none, both silently
        if not (0 <= t.threshold <= 1 or t.threshold == NOTHING):
            raise OODStateError(f"corrupted risk threshold in {where}: threshold = {t.threshold!r} is neither a "
                                f"predicted risk in [0, 1] nor {NOTHING:g} (accept nothing); {REFIT}")
        if legacy:
            t = replace(t, n_needed=min_groups_for(t.alpha) if 0 < t.alpha < 1 else 0)
        if not (0 < t.alpha < 1 and 0 < t.fail_below <= 1 and 0 <= t.empirical_rate <= 1 and 0 <= t.coverage <= 1
                and 0 <= t.accepted_failure_rate <= 1 and (t.enough or t.threshold == NOTHING)
                and (t.rule == "ltt") == (t.confidence is not None)):
            raise OODStateError(f"corrupted risk threshold in {where}: values out of range ({t}); {REFIT}")
        return t


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rate(value: Any, what: str, example: str) -> float:
    if not _is_number(value) or not 0 < value < 1:
        raise OODInputError(f"{what} must be in (0, 1), got {value!r}; pass e.g. {example}")
    return float(value)


def _check_alpha(alpha: float) -> float:
    return _check_rate(alpha, "the tolerated share of silent failures", "0.05")


def _check_confidence(confidence: float) -> float:
    return _check_rate(confidence, "the confidence", "0.9")


def _enough(n_groups: int, alpha: float) -> bool:
    """Whether accepting nothing (total loss 0) satisfies (0 + B) / (n + 1) <= alpha."""
    return B <= alpha * (n_groups + 1) + _TOL


def min_groups_for(alpha: float) -> int:
    """``crc``: the fewest calibration units (cases) with which anything can be accepted: 1 / (n + 1) <= alpha."""
    alpha = _check_alpha(alpha)
    n = max(1, math.floor(1 / alpha) - 2)  # just below the answer (floating point), then step up
    while not _enough(n, alpha):
        n += 1
    return n


def min_cases_ltt(alpha: float, confidence: float = CONFIDENCE) -> int:
    """``ltt``: the fewest accepted cases whose p-value can reach delta: with no failure among them,
    P(Bin(n, alpha) <= 0) = (1 - alpha)^n <= delta, i.e. n >= ln delta / ln(1 - alpha) (22 at alpha = delta = 0.1)."""
    alpha, delta = _check_alpha(alpha), 1 - _check_confidence(confidence)
    n = max(1, math.floor(math.log(delta) / math.log1p(-alpha)) - 1)
    while (1 - alpha) ** n > delta + _TOL:
        n += 1
    return n


def binomial_p_value(failed: int, accepted: int, alpha: float) -> float:
    """The exact p-value of "the failure rate among accepted exceeds alpha" given ``failed`` of ``accepted``:
    P(Bin(accepted, alpha) <= failed); 1 when nothing is accepted."""
    from scipy.stats import binom

    return 1.0 if accepted == 0 else float(binom.cdf(failed, accepted, alpha))


def _checked_rows(risk: Sequence[float], dice: Sequence[float], fail_below: float,
                  groups: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(risk, failed, unit)`` as arrays, every argument checked (one-line errors)."""
    if not _is_number(fail_below) or not 0 < fail_below <= 1:
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
    failed = ~(dice >= fail_below)  # NaN Dice: failed, which can only make the threshold stricter
    return risk, failed, unit.reshape(-1)


def _outcome(risk: np.ndarray, failed: np.ndarray, threshold: float) -> dict[str, Any]:
    """What ``threshold`` does on the calibration rows (NaN risk never accepted)."""
    accepted = risk <= threshold
    n_accepted, n_failed = int(np.count_nonzero(accepted)), int(np.count_nonzero(accepted & failed))
    return {"n_rows": len(risk), "n_accepted": n_accepted, "coverage": n_accepted / len(risk),
            "accepted_failure_rate": n_failed / n_accepted if n_accepted else 0.0}


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
    risk, failed, unit = _checked_rows(risk, dice, fail_below, groups)
    finite = np.isfinite(risk)
    n_units = int(unit.max()) + 1
    rows_of_unit = np.bincount(unit, minlength=n_units)
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
    common = {"alpha": alpha, "fail_below": float(fail_below), "n_groups": n_units, "enough": enough,
              "rule": "crc", "confidence": None, "n_needed": min_groups_for(alpha)}
    if n_valid == 0 or not enough:
        return RiskThreshold(threshold=NOTHING, empirical_rate=0.0, **common, **_outcome(risk, failed, NOTHING))
    end = last[n_valid - 1]
    threshold = float(sorted_risk[end])
    return RiskThreshold(threshold=threshold, empirical_rate=float(total_loss[end]) / n_units, **common,
                         **_outcome(risk, failed, threshold))


def ltt_grid(risk: np.ndarray) -> np.ndarray:
    """The candidate thresholds of ``ltt``, strictest first: the finite calibration risks' quantiles at every
    ``GRID_STEP`` of coverage (each an observed risk, so that it accepts exactly that share; ties merge)."""
    finite = risk[np.isfinite(risk)]
    if finite.size == 0:
        return np.empty(0)
    levels = np.arange(1, round(1 / GRID_STEP) + 1) * GRID_STEP
    return np.unique(np.quantile(finite, np.minimum(levels, 1.0), method="inverted_cdf"))


def ltt_threshold(risk: Sequence[float], dice: Sequence[float], fail_below: float, alpha: float,
                  confidence: float = CONFIDENCE, groups: Sequence[str] | None = None) -> RiskThreshold:
    """Learn then Test on the failure rate among accepted rows (the module's docstring): the loosest grid
    threshold reached by fixed-sequence testing of exact binomial p-values at level 1 - ``confidence``."""
    alpha, confidence = _check_alpha(alpha), _check_confidence(confidence)
    risk, failed, unit = _checked_rows(risk, dice, fail_below, groups)
    delta = 1 - confidence
    n_min = min_cases_ltt(alpha, confidence)
    start = max(n_min, math.ceil(START_SHARE * len(risk) - _TOL))
    chosen = NOTHING
    for candidate in ltt_grid(risk):
        accepted = risk <= candidate
        n_accepted = int(np.count_nonzero(accepted))
        if n_accepted < start:
            continue  # cannot be rejected (below n_min), or too weak a start
        if binomial_p_value(int(np.count_nonzero(accepted & failed)), n_accepted, alpha) > delta:
            break
        chosen = float(candidate)
    joint = float(np.count_nonzero((risk <= chosen) & failed)) / len(risk)
    return RiskThreshold(threshold=chosen, alpha=alpha, fail_below=float(fail_below), n_groups=int(unit.max()) + 1,
                         enough=len(risk) >= n_min, empirical_rate=joint, rule="ltt", confidence=confidence,
                         n_needed=n_min, **_outcome(risk, failed, chosen))


def choose_threshold(rule: str, risk: Sequence[float], dice: Sequence[float], fail_below: float, alpha: float,
                     confidence: float = CONFIDENCE, groups: Sequence[str] | None = None) -> RiskThreshold:
    """The accept/review threshold by ``rule`` (``ltt`` or ``crc``): the one function the fit, the folds pooled
    and a site's labelled calibration use."""
    if rule == "ltt":
        return ltt_threshold(risk, dice, fail_below, alpha, confidence, groups)
    if rule == "crc":
        return crc_threshold(risk, dice, fail_below, alpha, groups)
    raise OODInputError(f"unknown risk control rule {rule!r}; use one of {', '.join(RULES)}")


def decide(risk: np.ndarray | float, threshold: float) -> np.ndarray:
    """True = accept (predicted risk <= threshold); NaN risk -> False (review)."""
    return np.asarray(np.asarray(risk, dtype=np.float64) <= threshold)
