"""The failure table of a fold: its validation cases, clean and corrupted, with their Dice and features.

One row per predicted version of a validation case: ``case``, ``version`` (0 = the clean case),
``corruption`` (``none`` for the clean case), ``severity`` (0 for the clean case), ``dice`` against the
(transformed) reference, then one column per feature (method case scores, segmentation properties). The fit
writes it as ``quality_calibration.csv`` into the fold's ``ood`` folder, with a plot of Dice against severity
per corruption (``quality_calibration.png``): the user's view of how the model degrades.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nnunet_ood.errors import OODStateError

#: the columns before the features
KEY_COLUMNS = ("case", "version", "corruption", "severity", "dice")
CLEAN = "none"
CSV_NAME = "quality_calibration.csv"
#: the column the quality fit adds to the stored table: each row's out-of-fold predicted risk
OOF_RISK = "oof_risk"
PLOT_NAME = "quality_calibration.png"


@dataclass
class FailureTable:
    """Rows of predicted versions; ``features`` names the feature columns in order."""

    features: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, case: str, version: int, corruption: str, severity: int, dice: float,
            values: Mapping[str, float]) -> None:
        missing = [f for f in self.features if f not in values]
        if missing:
            raise KeyError(f"row of {case} lacks the features {missing}")
        self.rows.append({"case": case, "version": int(version), "corruption": corruption,
                          "severity": int(severity), "dice": float(dice),
                          **{f: float(values[f]) for f in self.features}})

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def groups(self) -> list[str]:
        return [r["case"] for r in self.rows]

    @property
    def dice(self) -> np.ndarray:
        return np.array([r["dice"] for r in self.rows], dtype=np.float64)

    def matrix(self, features: Sequence[str] | None = None) -> np.ndarray:
        """The feature matrix ``(rows, features)`` in float64."""
        names = self.features if features is None else list(features)
        values = [[r[f] for f in names] for r in self.rows]
        return np.array(values, dtype=np.float64).reshape(len(self.rows), len(names))

    def to_csv(self, extra: Mapping[str, Sequence[float]] | None = None) -> str:
        """The table as CSV; ``extra`` adds columns (e.g. the out-of-fold predicted risk) after the Dice."""
        extra = dict(extra or {})
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*KEY_COLUMNS, *extra, *self.features])
        for i, r in enumerate(self.rows):
            writer.writerow([*(r[c] for c in KEY_COLUMNS), *(_cell(extra[k][i]) for k in extra),
                             *(_cell(r[f]) for f in self.features)])
        return out.getvalue()


def _cell(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


def read_failure_table(text: str, extra: Sequence[str] = ()) -> FailureTable:
    """Parse :meth:`FailureTable.to_csv` output (``extra``: the added column names, dropped)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    features = [c for c in header if c not in KEY_COLUMNS and c not in extra]
    table = FailureTable(features)
    for values in reader:
        row = dict(zip(header, values))
        table.add(row["case"], int(row["version"]), row["corruption"], int(row["severity"]),
                  _float(row["dice"]), {f: _float(row[f]) for f in features})
    return table


def check_table_complete(text: str, path: str, expected_rows: int | None = None) -> None:
    """A stored failure table must be whole: a header, at least one row, every row as long as the header and a
    final newline (what :meth:`FailureTable.to_csv` writes), and ``expected_rows`` rows when the fit recorded how
    many it wrote (None: a table of a fit from before, checked for its form only). A table cut short (a truncated
    copy) gave fewer validation cases, a different pooled threshold and gate calibration, without a word; cut
    exactly at a line end it has a valid form, and only the count tells."""
    rows = list(csv.reader(io.StringIO(text)))
    fix = ("the decision reads the folds' validation cases from it; restore it, re-fit with nnUNetv2_fit_ood, or leave "
           "quality out (--ood METHOD ...)")
    if len(rows) < 2 or not text.endswith("\n") or any(len(r) != len(rows[0]) for r in rows[1:]):
        raise OODStateError(f"the quality method's failure table {path} is truncated or not a failure table: {fix}")
    if expected_rows is not None and len(rows) - 1 != expected_rows:
        raise OODStateError(f"the quality method's failure table {path} is truncated or not this fit's: it has "
                            f"{len(rows) - 1} rows, the fit wrote {expected_rows}; {fix}")


def read_out_of_fold_risks(text: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(case per row, out-of-fold predicted risk, Dice)`` of a stored failure table (its :data:`OOF_RISK`
    column, written by the quality fit); NaN where a value is empty."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and OOF_RISK not in rows[0]:
        raise OODStateError(f"the stored failure table has no {OOF_RISK} column; re-fit with nnUNetv2_fit_ood")
    return ([r["case"] for r in rows], np.array([_float(r[OOF_RISK]) for r in rows], dtype=np.float64),
            np.array([_float(r["dice"]) for r in rows], dtype=np.float64))


def _float(text: str) -> float:
    return float(text) if text != "" else math.nan


def dice_by_severity_png(table: FailureTable) -> bytes:
    """Mean Dice against severity, one line per corruption, severity 0 = the clean validation cases."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from nnunet_ood.figures import figure_png

    clean = [r["dice"] for r in table.rows if r["corruption"] == CLEAN]
    clean_mean = float(np.mean(clean)) if clean else math.nan
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    corruptions = sorted({r["corruption"] for r in table.rows} - {CLEAN})
    cmap = colormaps["tab20"]
    for i, name in enumerate(corruptions):
        rows = [r for r in table.rows if r["corruption"] == name]
        severities = sorted({r["severity"] for r in rows})
        means = [float(np.mean([r["dice"] for r in rows if r["severity"] == s])) for s in severities]
        ax.plot([0, *severities], [clean_mean, *means], marker="o", label=name, color=cmap(i % 20))
    ax.set_xlabel("severity (0 = clean validation cases)")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"How the fold's model degrades ({len(clean)} validation cases, {len(table) - len(clean)} "
                 "corrupted versions)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    return figure_png(fig)
