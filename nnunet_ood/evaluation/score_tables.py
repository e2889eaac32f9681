"""The score tables of the prediction folders: each folder's ``ood_scores.csv`` and what its ``ood_scores.json``
records (calibration, provenance, decision rules), the methods to evaluate, and the warnings about folders that
do not belong together.

Columns are read by name: the ``decision`` column of newer tables is not needed, and older tables without it
read the same.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nnunet_ood.errors import OODInputError
from nnunet_ood.evaluation.groups import PREDICT_COMMAND, GroupSpec, short_list
from nnunet_ood.io.score_reader import read_score_document, read_score_rows
from nnunet_ood.io.scores import CSV_NAME

#: entries of ``ood_scores.json`` that say which model made a prediction folder
PROVENANCE_KEYS = ("model_folder", "configuration", "plans", "folds", "checkpoint")
#: entries of ``ood_scores.json`` with the settings that change the scores or their flags, and how to name them
SETTING_KEYS = {"tile_step_size": "step sizes (-step_size)", "use_mirroring": "mirroring settings (--disable_tta)",
                "use_gaussian": "Gaussian weightings", "calibration_source": "calibrations (--calibration)"}


@dataclass
class ScoreTable:
    """The ``ood_scores.csv`` (and, if present, the calibration of ``ood_scores.json``) of one prediction folder."""

    folder: str
    cases: list[str]
    methods: list[str]
    score: dict[str, dict[str, float]]  # method -> case -> raw score
    normalized: dict[str, dict[str, float]]  # method -> case -> normalised score in [0, 1]
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> {"low", "high", "threshold"}
    provenance: dict[str, Any] = field(default_factory=dict)  # model and settings that made it (PROVENANCE_KEYS,
    # SETTING_KEYS)
    flagged: dict[str, dict[str, bool]] = field(default_factory=dict)  # method -> case -> ood flag (sent to review)
    fail_below: dict[str, list[float]] = field(default_factory=dict)  # method -> fail_below its document records
    decision_rules: dict[str, Any] = field(default_factory=dict)  # ood_scores.json's decision_rules (per method)

    def has_flag(self, method: str) -> bool:
        """Whether ``method``'s ``ood`` flags are a decision: its calibration has a finite threshold.

        Uncalibrated methods (fold ensembles without a site calibration) are written with ``ood`` False
        everywhere, which is no decision. Without a calibration entry (hand-made or older tables) the flags are
        taken as written.
        """
        entry = self.calibration.get(method)
        if entry is None:
            return True
        threshold = entry.get("threshold")
        return isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)


def recorded_fail_below(document: Any, method: str) -> list[float]:
    """The ``fail_below`` values ``ood_scores.json`` records for ``method``: every numeric ``fail_below`` inside
    an object that the document keys by the method's name, at any depth (``{"quality": {"fail_below": 0.7}}``,
    ``{"calibration_per_fold": {"0": {"quality": {"risk_threshold": {"fail_below": 0.7}}}}}``), the per-case
    ``scores`` list left out."""
    found: set[float] = set()

    def walk(node: Any, depth: int, inside: bool) -> None:
        if depth > 8 or not isinstance(node, dict):  # a score document is shallow; never follow it far
            return
        for key, value in node.items():
            if key == "scores" and depth == 0:
                continue
            if inside and key == "fail_below" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                found.add(float(value))
            walk(value, depth + 1, inside or key == method)

    walk(document, 0, False)
    return sorted(found)


def provenance_warnings(tables: Sequence[ScoreTable], specs: Sequence[GroupSpec]) -> list[str]:
    """One warning per provenance entry that differs between the prediction folders."""
    warnings = []
    for key in (*PROVENANCE_KEYS, *SETTING_KEYS):
        values = {spec.name: table.provenance[key] for spec, table in zip(specs, tables) if key in table.provenance}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            shown = "; ".join(f"{name}: {value}" for name, value in values.items())
            what, same = (SETTING_KEYS[key], "settings") if key in SETTING_KEYS else (f"{key.replace('_', ' ')}s",
                                                                                     "model")
            warnings.append(f"the prediction folders were made with different {what} ({shown}); their scores are "
                            f"not comparable: predict every group with the same {same}")
    return warnings


def unlisted_segmentation_warnings(specs: Sequence[GroupSpec], tables: Sequence[ScoreTable],
                                   file_ending: str) -> list[str]:
    """One warning per prediction folder holding segmentations that its ``ood_scores.csv`` does not list (they
    are not evaluated); map files ``<case>_ood_<method>`` are no segmentations."""
    warnings = []
    for spec, table in zip(specs, tables):
        listed = set(table.cases)
        names = [f[:-len(file_ending)] for f in sorted(os.listdir(spec.prediction_folder)) if f.endswith(file_ending)]
        unlisted = [n for n in names if n not in listed and not any(n.endswith(f"_ood_{m}") for m in table.methods)]
        if unlisted:
            warnings.append(f"{len(unlisted)} segmentation(s) in {spec.prediction_folder} ({short_list(unlisted)}) "
                            f"are not in its {CSV_NAME} and are not evaluated; re-run {PREDICT_COMMAND} with "
                            "--continue_prediction into that folder to score them")
    return warnings


def load_score_table(folder: str) -> ScoreTable:
    """The ``ood_scores.csv`` of a prediction folder and what its ``ood_scores.json`` records (calibration,
    provenance, decision rules), both read and checked by :mod:`nnunet_ood.io.score_reader`; a table without
    cases is refused.

    Columns are read by name: the ``decision`` column of newer tables (``accept``/``review`` for the quality
    method, the same as its ``ood`` flag) is not needed, and older tables without it read the same.
    """
    rows = read_score_rows(folder)
    if not rows:
        raise OODInputError(f"{os.path.join(folder, CSV_NAME)} lists no cases; run {PREDICT_COMMAND} on this "
                            f"group's images into {folder}")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    score: dict[str, dict[str, float]] = {m: {} for m in methods}
    normalized: dict[str, dict[str, float]] = {m: {} for m in methods}
    flagged: dict[str, dict[str, bool]] = {m: {} for m in methods}
    for r in rows:
        score[r["method"]][r["case"]] = r["score"]
        normalized[r["method"]][r["case"]] = r["normalized"]
        flagged[r["method"]][r["case"]] = r["ood"]
    document = read_score_document(folder)  # its entries have the types the plugin writes
    recorded = {m: values for m in methods if (values := recorded_fail_below(document, m))}
    return ScoreTable(folder, cases, methods, score, normalized, dict(document.get("calibration", {})),
                      {k: document[k] for k in (*PROVENANCE_KEYS, *SETTING_KEYS) if k in document}, flagged, recorded,
                      dict(document.get("decision_rules", {})))


def resolve_methods(tables: Sequence[ScoreTable], requested: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Methods to evaluate and methods dropped because some folders lack them.

    With ``requested`` every requested method must be in every folder. Without, the methods of all folders
    (in the order of the first folder) are used and the others are reported as dropped.
    """
    if requested:
        for table in tables:
            missing = [m for m in requested if m not in table.methods]
            if missing:
                raise OODInputError(f"method(s) {', '.join(missing)} requested with --methods are not in "
                                    f"{os.path.join(table.folder, CSV_NAME)} (it has: {', '.join(table.methods)}); "
                                    f"predict with {PREDICT_COMMAND} --ood or drop them from --methods")
        return list(dict.fromkeys(requested)), []
    common = [m for m in tables[0].methods if all(m in t.methods for t in tables)]
    every = list(dict.fromkeys(m for t in tables for m in t.methods))
    dropped = [m for m in every if m not in common]
    if not common:
        raise OODInputError(f"no OOD method is in the {CSV_NAME} of every prediction folder (found: "
                            f"{', '.join(every)}); predict every group with the same --ood methods")
    return common, dropped
