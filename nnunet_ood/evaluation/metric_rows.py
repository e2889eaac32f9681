"""The rows of the comparison table: per method, the ID test cases, each shifted domain and all shifted domains
pooled, with the detection, ranking and decision metrics of :mod:`nnunet_ood.evaluation.metrics`.

Besides the detection and ranking metrics, every row says what each method's accept/review decision taken at
prediction time did (the ``ood`` flag of ``ood_scores.csv``: accepted = not flagged, a NaN score is never
accepted): coverage and the realised silent-failure rates (accepted and Dice below ``fail_below``), and, for
methods that predict the Dice (``Method.predicts_dice``, e.g. ``quality``), the error of that prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nnunet_ood.evaluation.decisions import BOUND_COLUMNS, DEFAULT_RISK, RISK_COLUMNS, bound_metrics
from nnunet_ood.evaluation.groups import (
    ALL_SHIFTED,
    DOMAIN,
    FAILURE_DICE,
    ID_TEST,
    ID_VAL,
    MIN_CASES,
    CaseValues,
    Group,
)
from nnunet_ood.evaluation.metrics import (
    aurc,
    auroc,
    dice_prediction_errors,
    e_aurc,
    esce,
    selective_outcomes,
    spearman,
    threshold_metrics,
)

#: what the prediction-time accept/review decision did, and how well a predicted Dice matches the true one
DECISION_COLUMNS: tuple[str, ...] = ("coverage", "silent_rate", "silent_rate_accepted", *BOUND_COLUMNS, "dice_mae",
                                     "dice_pearson")
METRIC_COLUMNS: tuple[str, ...] = ("method", "domain", "n_id", "n_domain", "n_unscored", "auroc", "fpr", "tpr",
                                   "detection_error", "esce", "spearman", "aurc", "e_aurc", *RISK_COLUMNS, "mean_dice",
                                   "threshold", *DECISION_COLUMNS)


def _nan_row(method: str, domain: str) -> dict[str, Any]:
    return {c: float("nan") for c in METRIC_COLUMNS} | {"method": method, "domain": domain}


def _ranking_metrics(row: dict[str, Any], pooled: CaseValues) -> None:
    """ESCE, Spearman, AURC and e-AURC of scored cases into ``row``."""
    risk = 1.0 - pooled.dice
    if np.isfinite(pooled.normalized).all():  # ESCE is defined on the normalised scale only
        row["esce"] = esce(pooled.normalized, pooled.dice)
    row.update(spearman=spearman(pooled.score, risk), aurc=aurc(pooled.score, risk),
               e_aurc=e_aurc(pooled.score, risk))


def decision_metrics(values: CaseValues, fail_below: float = FAILURE_DICE,
                     predicts_dice: bool = False, alpha: float = DEFAULT_RISK) -> dict[str, float]:
    """The :data:`DECISION_COLUMNS` and ``coverage_at_risk`` of one set of cases (all of them, unscored ones included).

    * ``coverage``, ``silent_rate`` and ``silent_rate_accepted``
      (:func:`nnunet_ood.evaluation.metrics.selective_outcomes`) of the prediction-time decision, failure =
      Dice below ``fail_below``; NaN without a decision (``values.accepted`` is None) or without cases.
    * ``silent_rate_accepted_upper`` and ``coverage_at_risk`` at ``alpha``
      (:func:`nnunet_ood.evaluation.decisions.bound_metrics`).
    * ``dice_mae`` and ``dice_pearson`` of the predicted Dice ``1 - score`` over the scored cases, only for a
      method that ``predicts_dice``; NaN otherwise.
    """
    out = {c: float("nan") for c in (*DECISION_COLUMNS, *RISK_COLUMNS)}
    if values.n:
        out.update(bound_metrics(values.score, values.accepted, values.dice, fail_below, alpha))
    if values.accepted is not None and values.n:
        out.update(selective_outcomes(values.accepted, values.dice, fail_below))
    if predicts_dice:
        scored = values.scored()
        if scored.n:
            out.update(dice_prediction_errors(1.0 - scored.score, scored.dice))
    return out


def metric_row(method: str, domain: str, id_test: CaseValues, id_val: CaseValues | None, shifted: CaseValues,
               percentile: float = 95.0, fail_below: float = FAILURE_DICE,
               predicts_dice: bool = False, alpha: float = DEFAULT_RISK) -> dict[str, Any]:
    """One row of the table: ``shifted`` (positives) against ``id_test`` (negatives) for one method.

    * AUROC and the threshold metrics use every case (a NaN score counts as maximally uncertain, i.e. rejected);
      the other metrics use scored cases only, ``n_unscored`` counts the ID test and shifted cases left out.
    * Threshold = ``percentile``-th percentile of the scored ID validation raw scores; FPR, TPR and detection error
      as in :func:`nnunet_ood.metrics.threshold_metrics`.
    * ESCE (normalised scores), Spearman (raw score vs 1 - Dice), AURC and e-AURC (risk 1 - Dice) pool the scored
      ID test and shifted cases.
    * Every metric needs at least :data:`MIN_CASES` (scored) cases in each group it uses, else it is NaN.
    * The :data:`DECISION_COLUMNS` are those of the shifted cases alone (:func:`decision_metrics`).
    """
    row = _nan_row(method, domain)
    id_scored, shifted_scored = id_test.scored(), shifted.scored()
    row.update(n_id=id_test.n, n_domain=shifted.n,
               n_unscored=(id_test.n - id_scored.n) + (shifted.n - shifted_scored.n),
               mean_dice=float(shifted.dice.mean()) if shifted.n else float("nan"))
    if id_test.n >= MIN_CASES and shifted.n >= MIN_CASES:
        row["auroc"] = auroc(id_test.score, shifted.score)
    val_scores = id_val.scored().score if id_val is not None else np.empty(0)
    if val_scores.size >= MIN_CASES:
        row["threshold"] = float(np.percentile(val_scores, percentile))
        if id_test.n >= MIN_CASES and shifted.n >= MIN_CASES:  # NaN scores count as rejected
            t = threshold_metrics(val_scores, id_test.score, shifted.score, percentile)
            row.update(fpr=t["fpr"], tpr=t["tpr"], detection_error=t["detection_error"])
    if id_scored.n >= MIN_CASES and shifted_scored.n >= MIN_CASES:
        _ranking_metrics(row, CaseValues.concat([id_scored, shifted_scored]))
    row.update(decision_metrics(shifted, fail_below, predicts_dice, alpha))
    return row


def id_metric_row(method: str, id_test: CaseValues, id_val: CaseValues | None, percentile: float = 95.0,
                  fail_below: float = FAILURE_DICE, predicts_dice: bool = False,
                  alpha: float = DEFAULT_RISK) -> dict[str, Any]:
    """The ``id_test`` row of a method: only what the ID test cases alone define.

    ``n_id``, ``n_unscored``, ``mean_dice``, the threshold and TPR (share of ID test cases at or below it), ESCE,
    Spearman, AURC and e-AURC over the scored ID test cases, and the :data:`DECISION_COLUMNS` of the ID test
    cases (the guarantee of a risk-controlled decision is about in-distribution cases). AUROC, FPR, detection
    error and ``n_domain`` need shifted cases: NaN.
    """
    row = _nan_row(method, ID_TEST)
    scored = id_test.scored()
    row.update(n_id=id_test.n, n_unscored=id_test.n - scored.n,
               mean_dice=float(id_test.dice.mean()) if id_test.n else float("nan"))
    val_scores = id_val.scored().score if id_val is not None else np.empty(0)
    if val_scores.size >= MIN_CASES:
        row["threshold"] = float(np.percentile(val_scores, percentile))
        if id_test.n >= MIN_CASES:
            row["tpr"] = threshold_metrics(val_scores, id_test.score, np.empty(0), percentile)["tpr"]
    if scored.n >= MIN_CASES:
        _ranking_metrics(row, scored)
    row.update(decision_metrics(id_test, fail_below, predicts_dice, alpha))
    return row


def compute_metric_rows(groups: Sequence[Group], methods: Sequence[str], percentile: float,
                        fail_below: float = FAILURE_DICE, dice_methods: Sequence[str] = (),
                        alpha: float = DEFAULT_RISK) -> list[dict[str, Any]]:
    """Rows for every method x (the ID test cases, each shifted domain, then all shifted domains pooled)."""
    id_test = next(g for g in groups if g.spec.role == ID_TEST)
    id_val = next((g for g in groups if g.spec.role == ID_VAL), None)
    domains = [g for g in groups if g.spec.role == DOMAIN]
    rows = []
    for method in methods:
        val = id_val.values(method) if id_val is not None else None
        options = {"fail_below": fail_below, "predicts_dice": method in dice_methods, "alpha": alpha}
        rows.append(id_metric_row(method, id_test.values(method), val, percentile, **options))
        for domain in domains:
            rows.append(metric_row(method, domain.spec.name, id_test.values(method), val, domain.values(method),
                                   percentile, **options))
        pooled = CaseValues.concat([d.values(method) for d in domains])
        rows.append(metric_row(method, ALL_SHIFTED, id_test.values(method), val, pooled, percentile, **options))
    return rows


def method_predicts_dice(name: str) -> bool:
    """Whether the registered method ``name`` predicts the Dice (its score is 1 - predicted Dice); unknown
    names (methods of a newer or older plugin, hand-made tables) do not."""
    from nnunet_ood.methods import REGISTRY  # light: method modules import neither torch nor nnU-Net

    return name in REGISTRY and bool(getattr(REGISTRY.get(name), "predicts_dice", False))
