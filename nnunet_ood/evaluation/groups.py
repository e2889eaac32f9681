"""The groups of cases of ``nnUNetv2_evaluate_ood`` and the result of an evaluation.

Groups of cases:

* ``id_test``: in-distribution test cases, the negatives of the AUROC;
* ``id_val`` (optional): in-distribution validation cases, whose ``percentile``-th raw score percentile is the
  threshold of FPR, TPR and detection error;
* one group per shifted domain (the positives).

Each group is one prediction folder of ``nnUNetv2_predict_ood`` plus a folder with the reference label files.
Scores are uncertainties: higher = worse. Risk = 1 - Dice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nnunet_ood.errors import OODInputError
from nnunet_ood.evaluation.decisions import DEFAULT_RISK

ID_TEST = "id_test"
ID_VAL = "id_val"
DOMAIN = "domain"
ALL_SHIFTED = "all shifted"
MIN_CASES = 2  # distribution metrics need at least this many (scored) cases in every group they use
FAILURE_DICE = 0.6  # default --fail_below: below this Dice a segmentation counts as failed (silent when accepted)
PREDICT_COMMAND = "nnUNetv2_predict_ood"


@dataclass(frozen=True)
class GroupSpec:
    """One group of cases as given on the command line."""

    name: str  # "id_test", "id_val" or the domain's name
    role: str  # ID_TEST, ID_VAL or DOMAIN
    prediction_folder: str
    label_folder: str


@dataclass(frozen=True)
class CaseValues:
    """Aligned per-case arrays of one set of cases for one method.

    ``accepted``: the cases the method's prediction-time decision accepted (not flagged, finite score); None
    when the method makes no decision (no calibrated threshold) in some of these cases' folders.
    """

    score: np.ndarray
    normalized: np.ndarray
    dice: np.ndarray
    accepted: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.dice.size)

    @property
    def scored_mask(self) -> np.ndarray:
        """Cases with a finite raw score (the others could not be scored).

        The normalised score may still be NaN: methods without calibration (the fold-ensemble scores)
        have none; only ESCE needs it.
        """
        return np.isfinite(self.score)

    def scored(self) -> CaseValues:
        keep = self.scored_mask
        return CaseValues(self.score[keep], self.normalized[keep], self.dice[keep],
                          None if self.accepted is None else self.accepted[keep])

    @staticmethod
    def concat(parts: Sequence[CaseValues]) -> CaseValues:
        accepted = None if any(p.accepted is None for p in parts) else \
            np.concatenate([np.asarray(p.accepted, dtype=bool) for p in parts])
        return CaseValues(np.concatenate([p.score for p in parts]), np.concatenate([p.normalized for p in parts]),
                          np.concatenate([p.dice for p in parts]), accepted)


@dataclass
class Group:
    """A group with everything evaluated: its cases, their Dice and, per method, their scores."""

    spec: GroupSpec
    cases: list[str]
    dice: np.ndarray
    score: dict[str, np.ndarray]
    normalized: dict[str, np.ndarray]
    flagged: dict[str, np.ndarray] = field(default_factory=dict)  # prediction-time ood flags; only methods with one

    def accepted(self, method: str) -> np.ndarray | None:
        """Cases ``method`` accepted at prediction time (not flagged; a NaN score never), None without a decision."""
        if method not in self.flagged:
            return None
        return ~np.asarray(self.flagged[method], dtype=bool) & np.isfinite(self.score[method])

    def values(self, method: str) -> CaseValues:
        return CaseValues(self.score[method], self.normalized[method], self.dice, self.accepted(method))


@dataclass
class Evaluation:
    """Result of :func:`~nnunet_ood.evaluation.pipeline.evaluate`: the groups, the metric rows and the notes and
    warnings for the user."""

    groups: list[Group]
    methods: list[str]
    rows: list[dict[str, Any]]
    notes: list[str]
    warnings: list[str]
    calibration: dict[str, dict[str, Any]]
    percentile: float
    fail_below: float = FAILURE_DICE  # Dice below which a segmentation counts as failed
    dice_methods: list[str] = field(default_factory=list)  # the evaluated methods that predict the Dice
    dropped: list[str] = field(default_factory=list)  # methods left out: not in every folder (a warning says so)
    risk_level: float = DEFAULT_RISK  # alpha of coverage_at_risk (the deciding method's max_silent_failures)
    statements: dict[str, str] = field(default_factory=dict)  # deciding method -> what its decision guarantees

    @property
    def console_notes(self) -> list[str]:
        """The notes without those a warning already says (the command prints both; the files keep every note)."""
        repeated = {dropped_methods_note(self.dropped)} if self.dropped else set()
        return [n for n in self.notes if n not in repeated]


def dropped_methods_note(methods: Sequence[str]) -> str:
    """The note under the table about methods left out because some folders lack them."""
    return f"Method(s) {', '.join(methods)} are not in every prediction folder and were left out."


def short_list(items: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are (for one-line messages)."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def build_group_specs(id_test: Sequence[str], id_val: Sequence[str] | None,
                      domains: Sequence[Sequence[str]]) -> list[GroupSpec]:
    """Group specs from the ``--id_test``, ``--id_val`` and ``--domain`` values; checks names and folders."""
    specs = [GroupSpec(ID_TEST, ID_TEST, id_test[0], id_test[1])]
    if id_val is not None:
        specs.append(GroupSpec(ID_VAL, ID_VAL, id_val[0], id_val[1]))
    for name, prediction, labels in domains:
        if name in (ID_TEST, ID_VAL, ALL_SHIFTED) or not name.strip():
            raise OODInputError(f"--domain name {name!r} is reserved or empty; choose another name")
        if name in [s.name for s in specs]:
            raise OODInputError(f"--domain {name} is given twice; every shifted domain needs its own name")
        specs.append(GroupSpec(name, DOMAIN, prediction, labels))
    if not any(s.role == DOMAIN for s in specs):
        raise OODInputError("no shifted domain given; add --domain NAME PRED_FOLDER LABEL_FOLDER")
    seen: dict[str, str] = {}
    for spec in specs:
        for kind, folder in (("prediction", spec.prediction_folder), ("label", spec.label_folder)):
            if not os.path.isdir(folder):
                raise OODInputError(f"{kind} folder {folder} of {spec.name} does not exist or is not a folder")
        key = os.path.realpath(spec.prediction_folder)
        if key in seen:
            raise OODInputError(f"prediction folder {spec.prediction_folder} is given for both {seen[key]} and "
                                f"{spec.name}; predict every group into its own folder with {PREDICT_COMMAND}")
        seen[key] = spec.name
    return specs
