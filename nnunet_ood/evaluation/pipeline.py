"""``nnUNetv2_evaluate_ood``'s evaluation: :func:`evaluate` reads and checks every input before anything is
written, computes the per-case Dice, the metric rows, the notes and the warnings.

Each group is one prediction folder of ``nnUNetv2_predict_ood`` (segmentations, ``ood_scores.csv``,
``ood_scores.json``, ``dataset.json``) plus a folder with the reference label files; its cases are the cases of
its ``ood_scores.csv``. :mod:`nnunet_ood.evaluation.outputs` renders and writes the files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from nnunet_ood.errors import OODInputError
from nnunet_ood.evaluation.decisions import bound_note, recorded_statements, risk_level
from nnunet_ood.evaluation.dice import check_case_files, check_reference_labels, load_group, make_reader
from nnunet_ood.evaluation.groups import FAILURE_DICE, Evaluation, GroupSpec
from nnunet_ood.evaluation.label_setup import LabelSetup
from nnunet_ood.evaluation.metric_rows import compute_metric_rows, method_predicts_dice
from nnunet_ood.evaluation.notes import collect_notes
from nnunet_ood.evaluation.score_tables import (
    load_score_table,
    provenance_warnings,
    resolve_methods,
    unlisted_segmentation_warnings,
)
from nnunet_ood.io.scores import CSV_NAME


def evaluate(specs: Sequence[GroupSpec], setup: LabelSetup, requested_methods: Sequence[str] | None = None,
             percentile: float = 95.0, fail_below: float = FAILURE_DICE) -> Evaluation:
    """Read and check every input, compute per-case Dice and all metric rows. Writes nothing.

    ``fail_below``: a segmentation with a Dice below it is a failure (silent rates, failure counts, galleries).
    """
    if not 0 < percentile <= 100:
        raise OODInputError(f"--threshold_percentile must be in (0, 100], got {percentile:g}")
    check_fail_below(fail_below)
    tables = [load_score_table(s.prediction_folder) for s in specs]
    methods, dropped = resolve_methods(tables, requested_methods)
    for spec, table in zip(specs, tables):
        check_case_files(spec, table.cases, setup.file_ending)
    example = os.path.join(specs[0].label_folder, tables[0].cases[0] + setup.file_ending)
    reader = make_reader(setup.file_ending, example)
    check_reference_labels(specs, tables, setup, reader)
    groups = [load_group(s, t, methods, setup, reader) for s, t in zip(specs, tables)]
    dice_methods = [m for m in methods if method_predicts_dice(m)]
    alpha, risk_note = risk_level([t.decision_rules for t in tables], dice_methods)
    rows = compute_metric_rows(groups, methods, percentile, fail_below, dice_methods, alpha)
    recorded = {m: {s.name: t.fail_below[m] for s, t in zip(specs, tables) if m in t.fail_below} for m in dice_methods}
    notes = collect_notes(groups, methods, rows, percentile, dropped, fail_below, dice_methods, recorded)
    notes += [bound_note(), risk_note]
    warnings = [f"method(s) {', '.join(dropped)} are not in the {CSV_NAME} of every prediction folder and were "
                "dropped; pass --methods to require them"] if dropped else []
    warnings += provenance_warnings(tables, specs)
    warnings += unlisted_segmentation_warnings(specs, tables, setup.file_ending)
    calibration: dict[str, dict[str, Any]] = {}
    for table in tables:  # the ID test folder's calibration first, then any other folder's
        for method, values in table.calibration.items():
            calibration.setdefault(method, values)
    return Evaluation(groups, methods, rows, notes, warnings, calibration, percentile, fail_below, dice_methods,
                      dropped=dropped, risk_level=alpha,
                      statements=recorded_statements([t.decision_rules for t in tables], dice_methods))


def check_fail_below(fail_below: float) -> None:
    """``--fail_below`` must be a Dice in (0, 1]."""
    if not (isinstance(fail_below, (int, float)) and 0 < fail_below <= 1):
        raise OODInputError(f"--fail_below must be a Dice in (0, 1], got {fail_below}")
