"""What the accept/review decisions achieved, with the uncertainty of a finite count, and what a score could achieve.

* ``silent_rate_accepted_upper``: the exact one-sided 95% upper bound (Clopper–Pearson,
  :func:`~nnunet_ood.evaluation.metrics.failure_rate_upper_bound`) of the failure rate among the cases the
  prediction-time decision accepted. Ten accepted cases without a failure still allow a rate of 26%.
* ``coverage_at_risk``: the largest share of the cases that any threshold of the score could accept with at most
  a share alpha of the accepted failing (:func:`~nnunet_ood.evaluation.metrics.coverage_at_risk`): a ranking
  measure for decisions, next to AURC and Spearman. alpha is the deciding method's ``max_silent_failures`` as the
  prediction's ``ood_scores.json`` records it in ``decision_rules`` (the first folder that has one), else
  :data:`DEFAULT_RISK`.

Plain numpy (and scipy for the bound); it imports none of the evaluation modules that use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nnunet_ood.evaluation.metrics import coverage_at_risk, failure_rate_upper_bound

#: alpha of ``coverage_at_risk`` when no deciding method records its ``max_silent_failures``
DEFAULT_RISK = 0.1
#: confidence of the upper bound of the failure rate among accepted cases
BOUND_CONFIDENCE = 0.95
BOUND_COLUMNS: tuple[str, ...] = ("silent_rate_accepted_upper",)
RISK_COLUMNS: tuple[str, ...] = ("coverage_at_risk",)
HEADERS: dict[str, str] = {"silent_rate_accepted_upper": "silent (accepted) 95% upper",
                           "coverage_at_risk": "coverage at risk α"}


def accepted_failures(accepted: np.ndarray, dice: np.ndarray, fail_below: float) -> tuple[int, int]:
    """(failures among the accepted cases, accepted cases): a failure has Dice below ``fail_below``."""
    a = np.asarray(accepted, dtype=bool)
    return int(np.sum(a & (np.asarray(dice) < fail_below))), int(a.sum())


def bound_metrics(score: np.ndarray, accepted: np.ndarray | None, dice: np.ndarray, fail_below: float,
                  alpha: float) -> dict[str, float]:
    """``silent_rate_accepted_upper`` (NaN without a decision or without accepted cases) and ``coverage_at_risk``
    (every scored method; NaN without cases) of one set of cases."""
    out = {"silent_rate_accepted_upper": math.nan,
           "coverage_at_risk": coverage_at_risk(score, np.asarray(dice) < fail_below, alpha)}
    if accepted is not None:
        out["silent_rate_accepted_upper"] = failure_rate_upper_bound(*accepted_failures(accepted, dice, fail_below),
                                                                     BOUND_CONFIDENCE)
    return out


def recorded_risks(rules: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[float]:
    """The distinct ``max_silent_failures`` the ``decision_rules`` of the folders record for ``methods``, in the
    folders' order (the ID test folder first)."""
    found: list[float] = []
    for document_rules in rules:
        for method in methods:
            value = (document_rules.get(method) or {}).get("max_silent_failures") \
                if isinstance(document_rules.get(method), dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1 \
                    and value not in found:
                found.append(float(value))
    return found


def recorded_statements(rules: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> dict[str, str]:
    """Per deciding method, the statement of what its decision guarantees (``decision_rules[m]["statement"]``) of
    the first folder that records one (the ID test folder first)."""
    found: dict[str, str] = {}
    for document_rules in rules:
        for method in methods:
            entry = document_rules.get(method)
            if isinstance(entry, dict) and isinstance(entry.get("statement"), str):
                found.setdefault(method, entry["statement"])
    return found


def risk_level(rules: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> tuple[float, str]:
    """alpha of ``coverage_at_risk`` and a note saying where it comes from."""
    found = recorded_risks(rules, methods)
    if not found:
        return DEFAULT_RISK, (f"coverage at risk α: the largest share of the row's cases that any threshold of the "
                              f"score could accept with at most α = {DEFAULT_RISK:g} of the accepted failing (least "
                              "uncertain first, equal scores together; unscored cases never accepted); α is the "
                              "default: no deciding method records its max_silent_failures in decision_rules.")
    note = (f"coverage at risk α: the largest share of the row's cases that any threshold of the score could accept "
            f"with at most α = {found[0]:g} of the accepted failing (least uncertain first, equal scores together; "
            f"unscored cases never accepted); α = the max_silent_failures of {', '.join(methods)} (decision_rules of "
            "ood_scores.json).")
    if len(found) > 1:
        note += (f" The prediction folders record different values ({', '.join(f'{v:g}' for v in found)}); the "
                 "first is used.")
    return found[0], note


def bound_note() -> str:
    return ("silent (accepted) 95% upper: exact one-sided 95% upper confidence bound (Clopper–Pearson) of the "
            "failure rate among the accepted cases; 1 when every accepted case failed, '-' when none is accepted.")
