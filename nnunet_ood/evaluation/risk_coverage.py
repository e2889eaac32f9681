"""Risk-coverage curves of the evaluated methods over the ID test and shifted cases, and the oracle's (the data of
``risk_coverage.png``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnunet_ood.evaluation.groups import ID_VAL, CaseValues, Evaluation
from nnunet_ood.evaluation.metrics import aurc, oracle_risk_coverage_curve, risk_coverage_curve


@dataclass(frozen=True)
class RiskCoverage:
    """One method's risk-coverage curve over the ID test and shifted cases it scored.

    ``coverage``/``risk``: :func:`~nnunet_ood.evaluation.metrics.risk_coverage_curve` (its area is ``aurc``);
    ``point``: where the prediction-time decision operates on these cases (share accepted, mean risk of the
    accepted; the risk NaN when it accepts none), None without a decision.
    """

    method: str
    coverage: np.ndarray
    risk: np.ndarray
    aurc: float
    n_unscored: int
    highlighted: bool
    point: tuple[float, float] | None


def risk_coverage_curves(evaluation: Evaluation) -> tuple[list[RiskCoverage], tuple[np.ndarray, np.ndarray] | None]:
    """Every method's curve over the pooled ID test and shifted cases (the set of the pooled rows' AURC:
    scored cases only), methods that predict the Dice first, and the oracle's curve over all these cases."""
    compared = [g for g in evaluation.groups if g.spec.role != ID_VAL]
    curves = []
    for method in evaluation.methods:
        values = CaseValues.concat([g.values(method) for g in compared])
        scored = values.scored()
        if not scored.n:
            continue
        coverage, risk = risk_coverage_curve(scored.score, 1.0 - scored.dice)
        point = None
        if scored.accepted is not None:
            taken = scored.accepted
            point = (float(taken.mean()), float(np.mean(1.0 - scored.dice[taken])) if taken.any() else float("nan"))
        curves.append(RiskCoverage(method, coverage, risk, aurc(scored.score, 1.0 - scored.dice),
                                   values.n - scored.n, method in evaluation.dice_methods, point))
    curves.sort(key=lambda c: not c.highlighted)  # stable: table order within each kind
    dice = np.concatenate([g.dice for g in compared]) if compared else np.empty(0)
    return curves, (oracle_risk_coverage_curve(1.0 - dice) if dice.size else None)
