"""The short summary of an evaluation: which method is best at what, and what it does per group of cases.

Written by ``nnUNetv2_evaluate_ood`` as ``ood_summary.md`` and printed by the demo. The best method at
detecting shifts has the highest AUROC over all shifted domains pooled; the best at predicting failures
the lowest AURC there. Per group (ID test and each domain): cases, mean Dice, failures (Dice below the
evaluation's ``fail_below``, by default :data:`~nnunet_ood.evaluation.groups.FAILURE_DICE`) and, for the
best failure predictor, the share of cases it flags and the failures it catches (flagged) or misses
(accepted: silent failures). Flags use the table's threshold (percentile of the ID validation cases)
where there is one, else the plugin's own (from ``ood_scores.json``); a NaN score is always flagged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nnunet_ood.evaluation.decisions import DEFAULT_RISK
from nnunet_ood.evaluation.groups import ALL_SHIFTED, ID_VAL, Evaluation

SUMMARY_MD = "ood_summary.md"


def _best(rows: Sequence[Mapping[str, Any]], metric: str, highest: bool) -> str | None:
    candidates = [r for r in rows if r["domain"] == ALL_SHIFTED and not math.isnan(r[metric])]
    if not candidates:
        return None
    return (max if highest else min)(candidates, key=lambda r: r[metric])["method"]


def best_methods(evaluation: Evaluation) -> dict[str, str | None]:
    """``{"shift": highest pooled AUROC, "failure": lowest pooled AURC}`` (None when undefined)."""
    return {"shift": _best(evaluation.rows, "auroc", True), "failure": _best(evaluation.rows, "aurc", False)}


def flag_threshold(evaluation: Evaluation, method: str) -> float:
    """The raw-score threshold above which ``method`` flags a case (NaN when there is none).

    Methods that predict Dice flag with their own accept/review threshold (risk control at prediction time),
    never with a percentile of the ID validation scores.
    """
    if method in evaluation.dice_methods:
        value = (evaluation.calibration.get(method) or {}).get("threshold")
        return float(value) if isinstance(value, (int, float)) else math.nan
    table = [r["threshold"] for r in evaluation.rows if r["method"] == method and not math.isnan(r["threshold"])]
    if table:
        return float(table[0])
    value = (evaluation.calibration.get(method) or {}).get("threshold")
    return float(value) if isinstance(value, (int, float)) else math.nan


def flagged(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Cases a method flags: score above the threshold, or NaN (could not be scored)."""
    return np.isnan(scores) | (scores > threshold)


def group_rows(evaluation: Evaluation, method: str | None) -> list[dict[str, Any]]:
    """One row per group but the ID validation cases, with ``method``'s flags."""
    threshold = flag_threshold(evaluation, method) if method else math.nan
    rows = []
    for group in (g for g in evaluation.groups if g.spec.role != ID_VAL):
        failed = group.dice < evaluation.fail_below
        row = {"group": group.spec.name, "cases": len(group.cases), "mean_dice": float(np.mean(group.dice)),
               "failures": int(failed.sum()), "flagged": math.nan, "caught": math.nan, "missed": math.nan}
        if method and not math.isnan(threshold):
            flags = flagged(group.score[method], threshold)
            row.update(flagged=float(flags.mean()), caught=int((flags & failed).sum()),
                       missed=int((~flags & failed).sum()))
        rows.append(row)
    return rows


def _cell(value: Any, kind: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if kind == "share":
        return f"{value:.0%}"
    return f"{value:.3f}" if kind == "dice" else str(value)


def format_summary(evaluation: Evaluation) -> str:
    """Markdown: the best methods, then the per-group table for the best failure predictor."""
    best = best_methods(evaluation)
    method = best["failure"]
    lines = ["# OOD summary", ""]
    if best["shift"]:
        auroc = next(r["auroc"] for r in evaluation.rows if r["method"] == best["shift"] and r["domain"] == ALL_SHIFTED)
        lines.append(f"- Best at detecting shifted cases: **{best['shift']}** (AUROC {auroc:.3f}, all shifted "
                     "domains against the ID test cases).")
    if method:
        row = next(r for r in evaluation.rows if r["method"] == method and r["domain"] == ALL_SHIFTED)
        lines.append(f"- Best at ranking failures: **{method}** (AURC {row['aurc']:.3f}, Spearman with 1 - Dice "
                     f"{row['spearman']:.3f}); the table shows what its flag does.")
    lines.append(f"- A failure is a segmentation with Dice < {evaluation.fail_below:g}; missed = failed and not "
                 "flagged (a silent failure).")
    header = ["group", "cases", "mean Dice", "failures", f"flagged by {method or '-'}", "failures caught",
              "failures missed"]
    kinds = ["text", "text", "dice", "text", "share", "text", "text"]
    keys = ["group", "cases", "mean_dice", "failures", "flagged", "caught", "missed"]
    lines += ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in group_rows(evaluation, method):
        lines.append("| " + " | ".join(_cell(row[k], kind) for k, kind in zip(keys, kinds)) + " |")
    for deciding in evaluation.dice_methods:
        lines += ["", *decision_lines(evaluation, deciding)]
    return "\n".join(lines) + "\n"


def _row(evaluation: Evaluation, method: str, domain: str) -> Mapping[str, Any] | None:
    return next((r for r in evaluation.rows if r["method"] == method and r["domain"] == domain), None)


def missed_failures(evaluation: Evaluation, method: str) -> set[tuple[str, str]]:
    """``(group, case)`` of the failures ``method`` accepted at prediction time (its silent failures); cases
    of ID test and shifted groups."""
    missed = set()
    for group in (g for g in evaluation.groups if g.spec.role != ID_VAL):
        accepted = group.accepted(method)
        if accepted is None:
            continue
        failed = group.dice < evaluation.fail_below
        missed |= {(group.spec.name, c) for c, a, f in zip(group.cases, accepted, failed) if a and f}
    return missed


def _accepted_rate_cell(row: Mapping[str, Any]) -> str:
    """``12% (<= 31%)``: the failure rate among the accepted cases and its exact 95% upper bound."""
    rate = float(row.get("silent_rate_accepted", math.nan))
    upper = float(row.get("silent_rate_accepted_upper", math.nan))
    return "-" if math.isnan(rate) else f"{_cell(rate, 'share')} (<= {_cell(upper, 'share')})"


def decision_lines(evaluation: Evaluation, deciding: str) -> list[str]:
    """The accept/review section of ``deciding`` (a method that predicts Dice) next to every single method:
    pooled AURC and Spearman, silent-failure rate on the ID test and all shifted cases, the failure rate among the
    accepted shifted cases with its exact 95% upper bound, the coverage at risk alpha (the largest share any
    threshold of the score could accept with at most alpha of the accepted failing), and the silent failures
    of the best single method (lowest pooled AURC) that ``deciding`` sends to review."""
    alpha = f"{evaluation.risk_level:g}"
    lines = [f"## Accept or review: {deciding}", "",
             "| method | AURC | Spearman | silent failures, ID test | silent failures, all shifted | accepted, all "
             f"shifted | failed among accepted, all shifted (95% upper) | coverage at risk {alpha}, all shifted |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    singles = [m for m in evaluation.methods if m not in evaluation.dice_methods]
    order = [deciding] + sorted(singles, key=lambda m: (_row(evaluation, m, ALL_SHIFTED) or {}).get("aurc", math.inf))
    for m in order:
        pooled, id_row = _row(evaluation, m, ALL_SHIFTED) or {}, _row(evaluation, m, "id_test") or {}
        cells = [pooled.get("aurc", math.nan), pooled.get("spearman", math.nan)]
        name = f"**{m}**" if m == deciding else m
        lines.append(f"| {name} | " + " | ".join(_cell(float(v), "dice") for v in cells) + " | "
                     + " | ".join(_cell(float(v), "share") for v in (id_row.get("silent_rate", math.nan),
                                                                    pooled.get("silent_rate", math.nan),
                                                                    pooled.get("coverage", math.nan))) + " | "
                     + _accepted_rate_cell(pooled) + " | " + _cell(float(pooled.get("coverage_at_risk", math.nan)),
                                                                   "share") + " |")
    ranked = [m for m in order[1:] if not math.isnan((_row(evaluation, m, ALL_SHIFTED) or {}).get("aurc", math.nan))
              and any(g.accepted(m) is not None for g in evaluation.groups)]
    lines += ["", f"- Coverage at risk {alpha}: the largest share of all shifted cases that any threshold of the "
              f"method's score could accept with at most {alpha} of the accepted failing (Dice < "
              f"{evaluation.fail_below:g}); {alpha} is {deciding}'s max_silent_failures where its decision_rules "
              f"record it, else {DEFAULT_RISK:g}. The 95% upper bound is exact (Clopper–Pearson)."]
    if ranked:
        best = ranked[0]
        caught = missed_failures(evaluation, best) - missed_failures(evaluation, deciding)
        lines.append(f"- Silent failures (Dice < {evaluation.fail_below:g}, accepted) of the best single method "
                     f"**{best}** that {deciding} sends to review: {len(caught)} of "
                     f"{len(missed_failures(evaluation, best))}; {deciding}'s own silent failures: "
                     f"{len(missed_failures(evaluation, deciding))}.")
    return lines
