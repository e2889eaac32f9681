"""The gate for cases unlike the calibration cases: conformal p-values (Bates, Candès, Lei, Romano & Sesia,
"Testing for outliers with conformal p-values", Annals of Statistics 2023).

No accept/review threshold covers a case unlike its calibration cases. The gate sends such a case to review
with a reason, whatever its predicted risk. For one score s (higher = more unusual) and n in-distribution
calibration scores s_1..s_n, the conformal p-value is p = (1 + #{i : s_i >= s}) / (n + 1) (METHODS.md §6);
for a new case exchangeable with the calibration cases, P(p <= gamma) <= gamma.

Several scores (the feature distances and the predicted risk) are combined into **one** p-value instead of a
Bonferroni correction, which with n cases never fires when gamma / k < 1 / (n + 1) (60 cases, gamma = 0.05: at
most 3 scores). The statistic of a case is Fisher's combination of its per-score p-values, T = sum_k -ln p_k,
computed for the test case and every calibration case within the n + 1 cases together (full conformal: T is a
symmetric function of the augmented set), and the combined p-value is the conformal p-value of the test case's T
among those n + 1. It keeps the guarantee exactly: P(combined p <= gamma) <= gamma for an exchangeable
in-distribution case, so the gate costs at most a share gamma of in-distribution coverage. Fisher's sum rather
than the smallest p-value (min-p): with min-p, each score's most extreme calibration case ties with a test case
that is extreme in one score, so the smallest reachable p-value is about k / (n + 1), no better than Bonferroni;
a shifted scan is far out in *several* correlated feature distances at once, which the sum rewards (measured in
``tests/test_gate.py``). The smallest reachable p-value is still 1 / (n + 1): with fewer than 1 / gamma - 1
calibration cases the gate cannot fire, and :attr:`ConformalGate.active` says so.

Plain numpy, O(n^2 k) per case (n: calibration cases, hundreds at most).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nnunet_ood.errors import OODInputError

#: default gate level gamma: the share of in-distribution cases the gate may send to review
GATE_LEVEL = 0.05


def conformal_p_value(calibration: Sequence[float], score: float) -> float:
    """(1 + #{i : s_i >= score}) / (n + 1) over the finite calibration scores; NaN for a NaN score."""
    cal = np.asarray(calibration, dtype=np.float64)
    cal = cal[np.isfinite(cal)]
    if math.isnan(score):
        return math.nan
    return float((1 + np.count_nonzero(cal >= score)) / (cal.size + 1))


def min_cases_for_gate(level: float) -> int:
    """The fewest calibration cases with which a p-value can reach ``level``: 1 / (n + 1) <= level."""
    if not 0 < level < 1:
        raise OODInputError(f"the gate level must be in (0, 1), got {level!r}; pass e.g. 0.05")
    return max(1, math.ceil(1 / level - 1 - 1e-9))


@dataclass(frozen=True)
class GateResult:
    """A case's gate outcome: the combined p-value, each score's own p-value, and whether it is unusual."""

    p_value: float  # NaN when a score is missing (the case could not be scored)
    per_score: dict[str, float]
    unusual: bool

    @property
    def most_unusual(self) -> str | None:
        """The score with the smallest own p-value (the reason's name), None without scores."""
        finite = {m: p for m, p in self.per_score.items() if not math.isnan(p)}
        return min(finite, key=finite.get) if finite else None


class ConformalGate:
    """Combined conformal p-value of a case's ``scores`` against in-distribution calibration cases.

    ``calibration``: score name -> the calibration cases' scores (same cases, same order in every list);
    calibration cases with a NaN in any score are left out. ``level``: gamma (0 switches the gate off)."""

    def __init__(self, calibration: Mapping[str, Sequence[float]], level: float = GATE_LEVEL,
                 source: str = "") -> None:
        if not 0 <= level < 1:
            raise OODInputError(f"the gate level must be in [0, 1) (0 = off), got {level!r}")
        self.names = list(calibration)
        lengths = {len(v) for v in calibration.values()}
        if len(lengths) > 1:
            raise OODInputError("the gate's calibration scores must come from the same cases for every score")
        table = np.array([np.asarray(calibration[m], dtype=np.float64) for m in self.names]).T \
            if self.names else np.empty((0, 0))
        self.scores = table[np.all(np.isfinite(table), axis=1)] if table.size else np.empty((0, len(self.names)))
        self.level, self.source = float(level), source

    @property
    def n_cases(self) -> int:
        return int(self.scores.shape[0])

    @property
    def active(self) -> bool:
        """Whether any case can be gated: scores to compare, a level, and 1 / (n + 1) <= level."""
        return bool(self.names) and self.level > 0 and 1 / (self.n_cases + 1) <= self.level + 1e-12

    def test(self, case_scores: Mapping[str, float]) -> GateResult:
        """The case's combined p-value (Fisher's statistic, full conformal) and per-score p-values."""
        s = np.array([case_scores.get(m, math.nan) for m in self.names], dtype=np.float64)
        per_score = {m: conformal_p_value(self.scores[:, k], float(s[k])) for k, m in enumerate(self.names)}
        if not self.names or np.any(np.isnan(s)):
            return GateResult(math.nan, per_score, False)
        augmented = np.vstack([self.scores, s[None, :]])  # (n + 1) x k, the test case last
        # p-value of every case's score k within the augmented set: #{j : s_jk >= s_ik} / (n + 1)
        at_least = (augmented[None, :, :] >= augmented[:, None, :]).sum(axis=1) / augmented.shape[0]
        statistic = -np.log(at_least).sum(axis=1)  # Fisher: large = unusual in several scores or far in one
        p = float(np.count_nonzero(statistic >= statistic[-1] - 1e-12) / augmented.shape[0])
        return GateResult(p, per_score, self.active and p <= self.level)


def drift_summary(p_values: Sequence[float | None], level: float) -> str:
    """"31 of 60 cases unusual; expected about 3; p < 0.001": the share of a run's cases the gate sent to review
    against the ``level`` expected on in-distribution data, with the exact binomial p-value of seeing that many
    or more (has the scanner or population drifted?). Cases without a p-value (unscored) are left out."""
    from scipy.stats import binom

    scored = [p for p in p_values if p is not None and not math.isnan(p)]
    n, k = len(scored), sum(p <= level for p in scored)
    if n == 0:
        return "no case could be tested for being unusual"
    tail = float(binom.sf(k - 1, n, level)) if k > 0 else 1.0
    shown = "p < 0.001" if tail < 0.001 else f"p = {tail:.3g}"
    expected = n * level
    shown_expected = f"{expected:.0f}" if expected >= 10 else f"{expected:.1g}" if expected < 1 else f"{expected:.1f}"
    return (f"{k} of {n} cases unusual; expected about {shown_expected} on in-distribution data; {shown}"
            + (" (drift: scanner, protocol or population unlike the calibration?)" if tail < 0.01 else ""))
