"""The accept/review decision of a case, its reason, and the one sentence that says what it guarantees.

A case is **accepted** only when (1) it could be scored, (2) its predicted risk is at most the threshold of the
rule in force (:mod:`nnunet_ood.quality.risk_control`) and (3) the gate (:mod:`nnunet_ood.quality.gate`) does
not find it unusual against the in-distribution calibration cases. Every review has a reason:
``could not be scored``, ``predicted Dice 0.48 < 0.71``, ``unusual for mahalanobis (p = 0.004)`` (several joined
by ``; ``). The statement (:meth:`DecisionRule.statement`) says, in one sentence a clinician understands, which
guarantee is in force: a site's labelled cases give one (``ltt``: with stated confidence, on the failures
among accepted cases), the fold's validation cases and their synthetic corruptions only an estimate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nnunet_ood.quality.gate import ConformalGate, drift_summary, min_cases_for_gate
from nnunet_ood.quality.risk_control import RiskThreshold

#: the reason of a case whose risk or gate scores are NaN
UNSCORED = "could not be scored"
#: the command that gives a guarantee on a site's own data
LABELLED_CALIBRATION = "nnUNetv2_calibrate_ood -l LABELS"


@dataclass(frozen=True)
class Decision:
    """One case's decision: ``accept``, the ``reason`` of a review ('' when accepted), the gate's p-value."""

    accept: bool
    reason: str
    p_value: float


@dataclass
class DecisionRule:
    """The rule in force for one method that predicts Dice: its risk threshold, where it was set, the gate.

    ``origin``: ``fit``, ``fit, N folds pooled`` or ``calibration NAME`` (a site's labelled cases);
    ``labelled``: whether the threshold was set on labelled cases drawn like the deployment's (then it is a
    guarantee; otherwise an estimate)."""

    risk: RiskThreshold
    origin: str
    labelled: bool
    gate: ConformalGate

    def decide(self, risk: float, case_scores: Mapping[str, float]) -> Decision:
        """The decision on one case from its predicted risk and the gate's scores (the case's method scores)."""
        gate = self.gate.test(case_scores)
        reasons = []
        if math.isnan(risk) or (self.gate.active and math.isnan(gate.p_value)):
            reasons.append(UNSCORED)
        else:
            if not risk <= self.risk.threshold:
                reasons.append(self._risk_reason(risk))
            if gate.unusual:
                reasons.append(f"unusual for {gate.most_unusual} (p = {gate.p_value:.2g})")
        return Decision(not reasons, "; ".join(reasons), gate.p_value)

    def _risk_reason(self, risk: float) -> str:
        if not self.risk.accepts_anything:
            return "nothing is auto-accepted: the calibration cases cannot support the rule"
        return f"predicted Dice {1 - risk:.2f} < {1 - self.risk.threshold:.2f}"

    # ------------------------------------------------------------------ what it says
    def drift_line(self, p_values: Sequence[float | None]) -> str | None:
        """With the gate active, the run's drift line from its cases' gate p-values
        (:func:`~nnunet_ood.quality.gate.drift_summary`); ``None`` without an active gate."""
        return drift_summary(p_values, self.gate.level) if self.gate.active else None

    def statement(self) -> str:
        """One sentence (two at most) that says which guarantee is in force, for which cases, and no more."""
        return f"{self._threshold_sentence()} {self._gate_sentence()}"

    def _threshold_sentence(self) -> str:
        t = self.risk
        a, dice = f"{t.alpha:.0%}", f"{t.fail_below:g}"
        if self.labelled:
            where = f"Set on {t.n_groups} labelled cases from your site"
            if t.rule == "crc":
                return (f"{where} (conformal risk control): on average at most {a} of all scans like those "
                        f"{t.n_groups} are auto-accepted with Dice below {dice}; this bounds the share of all "
                        "scans, not of the accepted ones, and holds on average, not with stated confidence.")
            if not t.accepts_anything:
                return (f"{where}: they cannot support at most {a} of auto-accepted segmentations with Dice below "
                        f"{dice} at {t.confidence:.0%} confidence (that takes at least {t.n_needed} accepted cases "
                        "without a failure, more with failures), so every case goes to review.")
            return (f"{where}: with {t.confidence:.0%} confidence at most {a} of auto-accepted segmentations have "
                    f"Dice below {dice}, for scans like those {t.n_groups}.")
        where = (f"Estimated on the fold's {t.n_groups} validation cases and their corrupted versions ({t.n_rows} "
                 f"rows; synthetic shifts, no guarantee)" if self.origin == "fit" else
                 f"Estimated on the validation cases of the folds pooled ({self.origin}; {t.n_groups} cases, "
                 f"{t.n_rows} rows with corrupted versions; synthetic shifts, no guarantee)")
        fix = f"for a guarantee on your scans, calibrate on labelled cases of your site ({LABELLED_CALIBRATION})."
        if not t.accepts_anything:
            need = f"{t.n_needed} accepted cases without a failure"
            return (f"{where}: no threshold keeps failures among accepted at most {a} (Dice below {dice}; it "
                    f"takes at least {need}), so every case goes to review; {fix}")
        if t.rule == "crc":
            legacy = "; fitted before the rule on accepted cases existed (re-fit with nnUNetv2_fit_ood for it)" \
                if t.n_rows == 0 else ""  # n_rows is 0 only in thresholds stored before the rule was recorded
            return (f"{where}: conformal risk control, the expected share of all cases accepted with Dice below "
                    f"{dice} at most {a} (realised {t.empirical_rate:.1%} of all rows){legacy}; {fix}")
        return (f"{where}: {t.accepted_failure_rate:.1%} of the accepted rows have Dice below {dice} (target at "
                f"most {a} among accepted, tested at {t.confidence:.0%} confidence); {fix}")

    def _gate_sentence(self) -> str:
        g = self.gate
        if g.level == 0 or not g.names:
            return "No check for unusual scans is in force."
        if not g.active:
            return (f"The check for unusual scans is off: {g.n_cases} in-distribution calibration cases cannot "
                    f"reach p <= {g.level:g} (it needs {min_cases_for_gate(g.level)}; calibrate on more of your "
                    "site's scans with nnUNetv2_calibrate_ood).")
        return (f"Unusual scans always go to review (p <= {g.level:g} against {g.n_cases} in-distribution "
                f"{g.source or 'calibration'} cases, on {', '.join(g.names)}).")

    def to_json(self) -> dict[str, Any]:
        """What ``ood_scores.json``'s ``decision_rules`` records for this method."""
        t = self.risk
        return {"rule": t.rule, "fail_below": t.fail_below, "max_silent_failures": t.alpha,
                "confidence": t.confidence, "threshold": t.threshold, "threshold_from": self.origin,
                "guarantee": self.labelled, "calibration_cases": t.n_groups,
                "gate": {"level": self.gate.level, "scores": self.gate.names, "calibration_cases": self.gate.n_cases,
                         "source": self.gate.source, "active": self.gate.active},
                "statement": self.statement()}
