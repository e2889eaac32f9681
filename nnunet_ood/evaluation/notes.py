"""The notes under the comparison table: what each column means, and why a value is undefined ("-")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nnunet_ood.evaluation.groups import FAILURE_DICE, ID_VAL, MIN_CASES, Group, dropped_methods_note, short_list
from nnunet_ood.io.scores import CSV_NAME, JSON_NAME


def collect_notes(groups: Sequence[Group], methods: Sequence[str], rows: Sequence[Mapping[str, Any]],
                  percentile: float, dropped_methods: Sequence[str] = (), fail_below: float = FAILURE_DICE,
                  dice_methods: Sequence[str] = (), recorded_fail_below: Mapping[str, Mapping[str, Sequence[float]]]
                  | None = None) -> list[str]:
    """Notes under the table: definitions, and why a value is undefined ("-").

    ``recorded_fail_below``: method -> group -> the ``fail_below`` values the ``ood_scores.json`` of the group's
    prediction folder records; a value other than ``fail_below`` for a method in ``dice_methods`` gets a note.
    """
    notes = definition_notes(percentile, fail_below, dice_methods)
    if dropped_methods:
        notes.append(dropped_methods_note(dropped_methods))
    if not any(g.spec.role == ID_VAL for g in groups):
        notes.append("No --id_val given: the threshold, FPR, TPR and detection error are undefined; pass --id_val "
                     "PRED_FOLDER LABEL_FOLDER with ID validation cases.")
    notes += _group_notes(groups, methods)
    notes += _fail_below_notes(dice_methods, recorded_fail_below or {}, fail_below)
    notes += _constant_notes(groups, methods, rows)
    return notes


def definition_notes(percentile: float, fail_below: float, dice_methods: Sequence[str]) -> list[str]:
    """What the columns mean (the first notes, whatever the data)."""
    return [
        "AUROC: each shifted domain (positive) against the ID test cases (negative); unscored (NaN) cases count as "
        "maximally uncertain.",
        f"Threshold: {percentile:g}th percentile of each method's raw score on the ID validation cases; TPR: share of "
        "ID test cases at or below it; FPR: share of shifted cases at or below it (accepted although shifted); "
        "detection error = 0.5 (1 - TPR) + 0.5 FPR.",
        "ESCE (normalised scores), Spearman (raw score vs 1 - Dice), AURC and e-AURC (risk = 1 - Dice) pool the ID "
        "test cases with the row's shifted cases; mean Dice is that of the shifted cases.",
        f"A metric needs at least {MIN_CASES} (scored) cases in every group it uses; '-' marks an undefined value.",
        "id_test rows: the ID test cases alone (TPR at the threshold; ESCE, Spearman, AURC and e-AURC among them; "
        "their mean Dice); AUROC, FPR and detection error need shifted cases.",
        f"coverage, silent and silent (accepted): the accept/review decision taken at prediction time (the ood "
        f"flag of {CSV_NAME}; accepted = not flagged, a case that could not be scored is never accepted), over "
        f"the row's own cases (the ID test cases, a domain's, or all shifted cases). silent = accepted and failed "
        f"(Dice < {fail_below:g}) among all cases; silent (accepted) = the same among the accepted cases; coverage "
        "= share accepted. '-' for a method whose flag is no decision (no calibrated threshold, e.g. fold "
        "ensembles without a site calibration).",
        "Dice MAE and Dice r: for methods whose score is a predicted risk 1 - Dice, the mean absolute error and "
        "the Pearson correlation of the predicted Dice (1 - score) with the true Dice over the row's scored cases"
        + (f" ({', '.join(dice_methods)})" if dice_methods else " (none of the evaluated methods)") + "; '-' for the "
        "other methods.",
    ]


def _group_notes(groups: Sequence[Group], methods: Sequence[str]) -> list[str]:
    """Groups with too few cases, cases a method could not score, folders where a method's flag is no decision."""
    notes = []
    for g in groups:
        if len(g.cases) < MIN_CASES:
            notes.append(f"{g.spec.name} has only {len(g.cases)} case(s): the metrics that use it are undefined.")
    for method in methods:
        for g in groups:
            unscored = int((~g.values(method).scored_mask).sum())
            if unscored:
                notes.append(f"{method}: {unscored} case(s) of {g.spec.name} could not be scored (NaN); they count "
                             "as maximally uncertain for the AUROC and are left out of every other metric "
                             "(column n_unscored).")
    for method in methods:
        without = [g.spec.name for g in groups if g.spec.role != ID_VAL and method not in g.flagged]
        if without:
            notes.append(f"{method}: no calibrated threshold in the prediction folder(s) of {', '.join(without)}, so "
                         "its flags are no accept/review decision there: coverage and silent rates are undefined.")
    return notes


def _fail_below_notes(dice_methods: Sequence[str], recorded: Mapping[str, Mapping[str, Sequence[float]]],
                      fail_below: float) -> list[str]:
    """Methods fitted for another ``fail_below`` than this evaluation's: their silent rates check no guarantee."""
    notes = []
    for method in dice_methods:
        by_folder = recorded.get(method, {})
        differing = [group for group, values in by_folder.items() if any(v != fail_below for v in values)]
        if differing:
            values = sorted({v for group in differing for v in by_folder[group]})
            notes.append(f"{method} was fitted to keep failures at Dice < {' or '.join(f'{v:g}' for v in values)} "
                         f"rare ({JSON_NAME} of {short_list(differing)}), but this evaluation counts Dice < "
                         f"{fail_below:g} as a failure: its silent rates do not check its own guarantee; pass "
                         f"--fail_below {values[0]:g} for that.")
    return notes


def _constant_notes(groups: Sequence[Group], methods: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Why AUROC is 0.5 and Spearman undefined: constant scores, or constant scores or Dice within a row."""
    notes = []
    compared = [g for g in groups if g.spec.role != ID_VAL]
    constant = [m for m in methods if _is_constant(np.concatenate([g.score[m] for g in compared]))]
    for method in constant:
        notes.append(f"{method}: all scores of the ID test and shifted cases are equal; AUROC is 0.5 by the rank "
                     "formula and Spearman is undefined.")
    for row in rows:
        if row["method"] not in constant and np.isnan(row["spearman"]) and not np.isnan(row["aurc"]):
            notes.append(f"{row['method']} / {row['domain']}: Spearman is undefined because the scores or the Dice "
                         "values of the cases it uses are all equal.")
    return notes


def _is_constant(scores: np.ndarray) -> bool:
    """True when the finite scores are all equal (and there are at least two)."""
    finite = scores[np.isfinite(scores)]
    return finite.size >= MIN_CASES and bool(np.all(finite == finite[0]))
