"""The comparison table and the per-case table as text: ``ood_evaluation.csv`` (full precision, NaN as an empty
cell), ``ood_evaluation.md`` (3 decimals, "-" for undefined, the notes below) and ``ood_cases.csv``."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nnunet_ood.evaluation.decisions import HEADERS
from nnunet_ood.evaluation.groups import Group
from nnunet_ood.evaluation.metric_rows import METRIC_COLUMNS

EVALUATION_CSV = "ood_evaluation.csv"
EVALUATION_MD = "ood_evaluation.md"
CASES_CSV = "ood_cases.csv"


MARKDOWN_HEADERS: dict[str, str] = {
    "method": "method", "domain": "domain", "n_id": "n_id", "n_domain": "n_domain", "n_unscored": "n_unscored",
    "auroc": "AUROC", "fpr": "FPR", "tpr": "TPR", "detection_error": "det. error", "esce": "ESCE",
    "spearman": "Spearman", "aurc": "AURC", "e_aurc": "e-AURC", "coverage_at_risk": HEADERS["coverage_at_risk"],
    "mean_dice": "mean Dice", "coverage": "coverage", "silent_rate": "silent",
    "silent_rate_accepted": "silent (accepted)", "silent_rate_accepted_upper": HEADERS["silent_rate_accepted_upper"],
    "dice_mae": "Dice MAE", "dice_pearson": "Dice r"}


def _csv_cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else repr(float(value))
    return str(value)


def _md_cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def format_metrics_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """All rows and metrics as CSV (columns :data:`METRIC_COLUMNS`, NaN as an empty cell)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    for row in rows:
        writer.writerow([_csv_cell(row[c]) for c in METRIC_COLUMNS])
    return buffer.getvalue()


def format_markdown(rows: Sequence[Mapping[str, Any]], notes: Sequence[str]) -> str:
    """The comparison table (3 decimals, "-" for undefined) with the notes below it."""
    columns = list(MARKDOWN_HEADERS)
    lines = ["| " + " | ".join(MARKDOWN_HEADERS[c] for c in columns) + " |",
             "|" + "|".join("---" if c in ("method", "domain") else "---:" for c in columns) + "|"]
    lines += ["| " + " | ".join(_md_cell(row[c]) for c in columns) + " |" for row in rows]
    return "# OOD evaluation\n\n" + "\n".join(lines) + "\n\nNotes:\n\n" + "".join(f"- {n}\n" for n in notes)


def format_cases_csv(groups: Sequence[Group], methods: Sequence[str]) -> str:
    """Per case: group, case, Dice and, per method, raw and normalised score (NaN as an empty cell)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["group", "case", "dice", *(f"{m}_{k}" for m in methods for k in ("score", "normalized"))])
    for g in groups:
        for i, case in enumerate(g.cases):
            values = [v for m in methods for v in (g.score[m][i], g.normalized[m][i])]
            writer.writerow([g.spec.name, case, *(_csv_cell(float(v)) for v in (g.dice[i], *values))])
    return buffer.getvalue()
