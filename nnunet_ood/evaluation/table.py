"""``nnUNetv2_evaluate_ood``: the papers' comparison table from prediction folders and ground-truth labels.

Groups of cases:

* ``id_test``: in-distribution test cases, the negatives of the AUROC;
* ``id_val`` (optional): in-distribution validation cases, whose ``percentile``-th raw score percentile is the
  threshold of FPR, TPR and detection error;
* one group per shifted domain (the positives).

Besides the detection and ranking metrics, every row says what each method's accept/review decision taken at
prediction time did (the ``ood`` flag of ``ood_scores.csv``: accepted = not flagged, a NaN score is never
accepted): coverage and the realised silent-failure rates (accepted and Dice below ``fail_below``), and, for
methods that predict the Dice (``Method.predicts_dice``, e.g. ``quality``), the error of that prediction.

Each group is one prediction folder of ``nnUNetv2_predict_ood`` (segmentations, ``ood_scores.csv``,
``ood_scores.json``, ``dataset.json``) plus a folder with the reference label files; its cases are the cases of
its ``ood_scores.csv``. Everything is read and checked by :func:`evaluate` before anything is written, and
:func:`render_outputs` builds every output file in memory so that :func:`write_outputs` only writes.

Scores are uncertainties: higher = worse. Risk = 1 - Dice.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nnunet_ood.calibration import normalize_score
from nnunet_ood.errors import OODInputError
from nnunet_ood.evaluation.decisions import (
    BOUND_COLUMNS,
    DEFAULT_RISK,
    HEADERS,
    RISK_COLUMNS,
    bound_metrics,
    bound_note,
    recorded_statements,
    risk_level,
)
from nnunet_ood.evaluation.metrics import (
    aurc,
    auroc,
    dice_prediction_errors,
    e_aurc,
    esce,
    oracle_risk_coverage_curve,
    risk_coverage_curve,
    selective_outcomes,
    spearman,
    threshold_metrics,
)
from nnunet_ood.io.atomic import atomic_write_bytes
from nnunet_ood.io.json_files import read_json
from nnunet_ood.io.labels import LabelOrRegion, check_references, check_requested_labels, dataset_label_values
from nnunet_ood.io.scores import CSV_NAME, JSON_NAME, read_score_csv

ID_TEST = "id_test"
ID_VAL = "id_val"
DOMAIN = "domain"
ALL_SHIFTED = "all shifted"
MIN_CASES = 2  # distribution metrics need at least this many (scored) cases in every group they use
FAILURE_DICE = 0.6  # default --fail_below: below this Dice a segmentation counts as failed (silent when accepted)
PREDICT_COMMAND = "nnUNetv2_predict_ood"

EVALUATION_CSV = "ood_evaluation.csv"
EVALUATION_MD = "ood_evaluation.md"
CASES_CSV = "ood_cases.csv"
SCORE_PLOT = "score_distributions.png"
CORRELATION_PLOT = "correlation_with_failure.png"
RISK_COVERAGE_PLOT = "risk_coverage.png"

#: what the prediction-time accept/review decision did, and how well a predicted Dice matches the true one
DECISION_COLUMNS: tuple[str, ...] = ("coverage", "silent_rate", "silent_rate_accepted", *BOUND_COLUMNS, "dice_mae",
                                     "dice_pearson")
METRIC_COLUMNS: tuple[str, ...] = ("method", "domain", "n_id", "n_domain", "n_unscored", "auroc", "fpr", "tpr",
                                   "detection_error", "esce", "spearman", "aurc", "e_aurc", *RISK_COLUMNS, "mean_dice",
                                   "threshold", *DECISION_COLUMNS)
MARKDOWN_HEADERS: dict[str, str] = {
    "method": "method", "domain": "domain", "n_id": "n_id", "n_domain": "n_domain", "n_unscored": "n_unscored",
    "auroc": "AUROC", "fpr": "FPR", "tpr": "TPR", "detection_error": "det. error", "esce": "ESCE",
    "spearman": "Spearman", "aurc": "AURC", "e_aurc": "e-AURC", "coverage_at_risk": HEADERS["coverage_at_risk"],
    "mean_dice": "mean Dice", "coverage": "coverage", "silent_rate": "silent",
    "silent_rate_accepted": "silent (accepted)", "silent_rate_accepted_upper": HEADERS["silent_rate_accepted_upper"],
    "dice_mae": "Dice MAE", "dice_pearson": "Dice r"}

# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class GroupSpec:
    """One group of cases as given on the command line."""

    name: str  # "id_test", "id_val" or the domain's name
    role: str  # ID_TEST, ID_VAL or DOMAIN
    prediction_folder: str
    label_folder: str


@dataclass(frozen=True)
class LabelSetup:
    """What to evaluate: foreground labels (int) or regions (tuple of labels), file ending, ignore label.

    ``label_values``: every value a reference may hold (those of the dataset.json named by ``label_source``);
    None without a dataset.json (then every ``--labels`` value must occur in some reference).
    """

    labels_or_regions: list[LabelOrRegion]
    file_ending: str
    ignore_label: int | None = None
    label_values: frozenset[int] | None = None
    label_source: str = "dataset.json"


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
    """Result of :func:`evaluate`: the groups, the metric rows and the notes and warnings for the user."""

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


def _short_list(items: Sequence[str], limit: int = 5) -> str:
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


# ----------------------------------------------------------------------------------------------- labels


def parse_label_arguments(values: Sequence[str]) -> list[LabelOrRegion]:
    """``--labels`` values: ``2`` is label 2, ``1,2`` the region made of labels 1 and 2."""
    out: list[LabelOrRegion] = []
    for value in values:
        try:
            parts = tuple(int(p) for p in value.split(","))
        except ValueError:
            raise OODInputError(f"--labels takes integer labels or comma-separated regions like 1,2; got {value!r}")\
                from None
        if any(p <= 0 for p in parts):
            raise OODInputError(f"--labels takes foreground labels (> 0); got {value!r}")
        out.append(parts if len(parts) > 1 else parts[0])
    return out


def foreground_from_dataset_labels(labels: Mapping[str, Any]) -> list[LabelOrRegion]:
    """Foreground labels of a ``dataset.json`` ``labels`` dict, or its regions (tuples) if it is region-based.

    Background, the ignore label and regions made of background only are left out.
    """
    region_based = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
    out: list[LabelOrRegion] = []
    for name, value in labels.items():
        if name in ("background", "ignore"):
            continue
        try:
            members = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
        except (TypeError, ValueError):
            raise OODInputError(f"dataset.json label {name!r} has value {value!r}, not an integer or a list of "
                                "integers") from None
        if not members or set(members) == {0}:
            continue
        out.append(members if region_based else members[0])
    return out


def read_dataset_json(folder: str) -> dict[str, Any] | None:
    """The ``dataset.json`` nnU-Net copies into a prediction folder, or None if there is none."""
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        return None
    data = read_json(path, lambda reason: OODInputError(f"cannot read {path} ({reason}); fix it or pass --labels "
                                                         "and --file_ending"))
    if not isinstance(data, dict):
        raise OODInputError(f"{path} is not a JSON object; fix it or pass --labels and --file_ending")
    return data


def resolve_label_setup(specs: Sequence[GroupSpec], labels: Sequence[str] | None,
                        file_ending: str | None) -> LabelSetup:
    """Labels and file ending from ``--labels``/``--file_ending``, else from the first dataset.json found;
    ``--labels`` must name labels that dataset.json has."""
    found = next(((s.prediction_folder, d) for s in specs if (d := read_dataset_json(s.prediction_folder))
                  is not None), None)
    source, dataset = (os.path.join(found[0], "dataset.json"), found[1]) if found else ("dataset.json", None)
    if dataset is None and (labels is None or file_ending is None):
        raise OODInputError("no dataset.json in the prediction folders (nnU-Net copies it there); pass --labels and "
                            "--file_ending")
    dataset_labels = dataset.get("labels") if dataset else None
    dataset_labels = dataset_labels if isinstance(dataset_labels, dict) else None
    ignore = dataset_labels.get("ignore") if dataset_labels else None
    ignore = int(ignore) if ignore is not None else None
    values = frozenset(dataset_label_values(dataset_labels)) if dataset_labels else None
    if labels is not None:
        labels_or_regions = parse_label_arguments(labels)
        if values is not None:
            check_requested_labels(labels_or_regions, set(values) - {0, ignore}, source)
    elif dataset_labels is None:
        raise OODInputError(f"{source} has no 'labels' dict; pass --labels")
    else:
        labels_or_regions = foreground_from_dataset_labels(dataset_labels)
    if not labels_or_regions:
        raise OODInputError("no foreground labels to evaluate; pass --labels")
    ending = file_ending if file_ending is not None else dataset.get("file_ending")
    if not isinstance(ending, str) or not ending:
        raise OODInputError("dataset.json in the prediction folder has no 'file_ending'; pass --file_ending")
    return LabelSetup(labels_or_regions, ending, ignore, values, source)


def check_reference_labels(specs: Sequence[GroupSpec], tables: Sequence[ScoreTable], setup: LabelSetup,
                           reader: Any) -> None:
    """Every reference holds only the dataset's label values; without a dataset.json, every ``--labels`` value
    occurs in some reference (a Dice of labels that are absent everywhere is 1 and says nothing)."""
    paths = [os.path.join(s.label_folder, c + setup.file_ending) for s, t in zip(specs, tables) for c in t.cases]
    found = check_references(paths, reader, None if setup.label_values is None else set(setup.label_values),
                             setup.label_source)
    if setup.label_values is None:
        seen = set().union(*found.values())
        members = {m for item in setup.labels_or_regions for m in (item if isinstance(item, tuple) else (item,))}
        absent = sorted(m for m in members if float(m) not in seen)
        if absent:
            raise OODInputError(f"--labels value(s) {', '.join(map(str, absent))} occur in none of the {len(paths)} "
                                f"reference segmentations (their values: "
                                f"{', '.join(f'{v:g}' for v in sorted(seen))}); pass existing labels")


# ----------------------------------------------------------------------------------------------- scores


#: entries of ``ood_scores.json`` that say which model made a prediction folder
PROVENANCE_KEYS = ("model_folder", "configuration", "plans", "folds", "checkpoint")
#: entries of ``ood_scores.json`` with the settings that change the scores or their flags, and how to name them
SETTING_KEYS = {"tile_step_size": "step sizes (-step_size)", "use_mirroring": "mirroring settings (--disable_tta)",
                "use_gaussian": "Gaussian weightings", "calibration_source": "calibrations (--calibration)"}


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


def _read_score_document(folder: str) -> dict[str, Any]:
    """``ood_scores.json`` of a prediction folder as a dict (empty if missing or not an object)."""
    path = os.path.join(folder, JSON_NAME)
    if not os.path.isfile(path):
        if os.path.lexists(path):  # a dangling link or a folder is a damaged file, not an older folder without one
            what = "a dangling symbolic link" if os.path.islink(path) else "not a file"
            raise OODInputError(f"{path} is {what}; re-run {PREDICT_COMMAND} into {folder} or remove it")
        return {}
    document = read_json(path, lambda reason: OODInputError(f"cannot read {path} ({reason}); re-run "
                                                             f"{PREDICT_COMMAND} into {folder}"))
    return document if isinstance(document, dict) else {}


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
            warnings.append(f"{len(unlisted)} segmentation(s) in {spec.prediction_folder} ({_short_list(unlisted)}) "
                            f"are not in its {CSV_NAME} and are not evaluated; re-run {PREDICT_COMMAND} with "
                            "--continue_prediction into that folder to score them")
    return warnings


def load_score_table(folder: str) -> ScoreTable:
    """Read and check the ``ood_scores.csv`` of a prediction folder (plus the calibration of ``ood_scores.json``).

    Columns are read by name: the ``decision`` column of newer tables (``accept``/``review`` for the quality
    method, the same as its ``ood`` flag) is not needed, and older tables without it read the same.
    """
    path = os.path.join(folder, CSV_NAME)
    if not os.path.isfile(path):
        raise OODInputError(f"no {CSV_NAME} in {folder}; {PREDICT_COMMAND} writes it next to the segmentations")
    try:
        rows = read_score_csv(path)
    except (KeyError, ValueError, TypeError, csv.Error) as e:
        raise OODInputError(f"{path} is not a valid {CSV_NAME} ({type(e).__name__}: {e}); re-run "
                            f"{PREDICT_COMMAND}") from None
    if not rows:
        raise OODInputError(f"{path} lists no cases; run {PREDICT_COMMAND} on this group's images into {folder}")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    score: dict[str, dict[str, float]] = {m: {} for m in methods}
    normalized: dict[str, dict[str, float]] = {m: {} for m in methods}
    flagged: dict[str, dict[str, bool]] = {m: {} for m in methods}
    for r in rows:
        if r["case"] in score[r["method"]]:
            raise OODInputError(f"{path} has two rows for case {r['case']}, method {r['method']}; re-run "
                                f"{PREDICT_COMMAND}")
        if r["normalized"] < 0 or r["normalized"] > 1:  # NaN passes: it marks an unscored case
            raise OODInputError(f"{path}: normalized score {r['normalized']} of case {r['case']}, method "
                                f"{r['method']} is outside [0, 1]; re-run {PREDICT_COMMAND}")
        score[r["method"]][r["case"]] = r["score"]
        normalized[r["method"]][r["case"]] = r["normalized"]
        flagged[r["method"]][r["case"]] = bool(r["ood"])
    document = _read_score_document(folder)
    calibration = document.get("calibration")
    calibration = {m: c for m, c in calibration.items() if isinstance(c, dict)} if isinstance(calibration, dict) \
        else {}
    recorded = {m: values for m in methods if (values := recorded_fail_below(document, m))}
    rules = document.get("decision_rules")
    return ScoreTable(folder, cases, methods, score, normalized, calibration,
                      {k: document[k] for k in (*PROVENANCE_KEYS, *SETTING_KEYS) if k in document}, flagged, recorded,
                      rules if isinstance(rules, dict) else {})


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


# ----------------------------------------------------------------------------------------------- files and Dice


def check_case_files(spec: GroupSpec, cases: Sequence[str], file_ending: str) -> None:
    """Every case needs a segmentation in the prediction folder and a reference label file in the label folder."""
    no_reference = [c for c in cases if not os.path.isfile(os.path.join(spec.label_folder, c + file_ending))]
    if len(no_reference) == len(cases):
        raise OODInputError(
            f"label folder {spec.label_folder} of {spec.name} contains none of its {len(cases)} case(s) "
            f"({_short_list(list(cases))}, as <case>{file_ending}); pass the folder with these cases' reference "
            "labels (e.g. labelsTs) or check --file_ending")
    no_prediction = [c for c in cases if not os.path.isfile(os.path.join(spec.prediction_folder, c + file_ending))]
    if no_prediction:
        raise OODInputError(
            f"case(s) {_short_list(no_prediction)} of {spec.name} are in {CSV_NAME} but have no segmentation "
            f"<case>{file_ending} in {spec.prediction_folder}; re-run {PREDICT_COMMAND} into that folder")
    if no_reference:
        raise OODInputError(
            f"case(s) {_short_list(no_reference)} of {spec.name} have no reference label file <case>{file_ending} "
            f"in {spec.label_folder}; add their labels or predict without them")


def make_reader(file_ending: str, example_file: str) -> Any:
    """nnU-Net's image reader/writer for the file ending (tried on one example file)."""
    import contextlib
    import io as _io

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    if os.path.isfile(example_file) and os.path.getsize(example_file) == 0:
        raise OODInputError(f"{example_file} is empty (0 bytes); replace it with the case's label file")
    try:  # nnU-Net prints a traceback for each reader that fails on the example, even with verbose=False
        with contextlib.redirect_stderr(_io.StringIO()), contextlib.redirect_stdout(_io.StringIO()):
            return determine_reader_writer_from_file_ending(file_ending, example_file, verbose=False)()
    except RuntimeError:
        raise OODInputError(f"nnU-Net has no reader for {file_ending} files that can open {example_file} (a "
                            "truncated or damaged file, or another format); replace the file or check "
                            "--file_ending") from None


def case_dice(reference_file: str, prediction_file: str, reader: Any, labels_or_regions: Sequence[LabelOrRegion],
              ignore_label: int | None = None) -> float:
    """Mean Dice over foreground labels/regions with nnU-Net's ``compute_metrics``; empty in both counts as 1."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics

    try:
        result = compute_metrics(reference_file, prediction_file, reader, list(labels_or_regions), ignore_label)
    except Exception as e:  # any reader or shape error means these two files cannot be compared
        message = " ".join(str(e).split())
        raise OODInputError(f"cannot compare segmentation {prediction_file} with reference {reference_file} "
                            f"({type(e).__name__}: {message}); check that both belong to the same case") from None
    dices = [result["metrics"][r]["Dice"] for r in labels_or_regions]
    return float(np.mean([1.0 if np.isnan(d) else d for d in dices]))


def load_group(spec: GroupSpec, table: ScoreTable, methods: Sequence[str], setup: LabelSetup, reader: Any) -> Group:
    """Per-case Dice and scores of one group (a method without a row for a case gives NaN: unscored)."""
    dice = np.array([case_dice(os.path.join(spec.label_folder, c + setup.file_ending),
                               os.path.join(spec.prediction_folder, c + setup.file_ending), reader,
                               setup.labels_or_regions, setup.ignore_label) for c in table.cases], dtype=np.float64)
    score = {m: np.array([table.score[m].get(c, np.nan) for c in table.cases], dtype=np.float64) for m in methods}
    normalized = {m: np.array([table.normalized[m].get(c, np.nan) for c in table.cases], dtype=np.float64)
                  for m in methods}
    # a case without a row was not scored: it is not accepted either
    flagged = {m: np.array([table.flagged[m].get(c, True) for c in table.cases], dtype=bool)
               for m in methods if table.has_flag(m)}
    return Group(spec, list(table.cases), dice, score, normalized, flagged)


# ----------------------------------------------------------------------------------------------- metrics


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


def collect_notes(groups: Sequence[Group], methods: Sequence[str], rows: Sequence[Mapping[str, Any]],
                  percentile: float, dropped_methods: Sequence[str] = (), fail_below: float = FAILURE_DICE,
                  dice_methods: Sequence[str] = (), recorded_fail_below: Mapping[str, Mapping[str, Sequence[float]]]
                  | None = None) -> list[str]:
    """Notes under the table: definitions, and why a value is undefined ("-").

    ``recorded_fail_below``: method -> group -> the ``fail_below`` values the ``ood_scores.json`` of the group's
    prediction folder records; a value other than ``fail_below`` for a method in ``dice_methods`` gets a note.
    """
    has_val = any(g.spec.role == ID_VAL for g in groups)
    notes = [
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
    if dropped_methods:
        notes.append(dropped_methods_note(dropped_methods))
    if not has_val:
        notes.append("No --id_val given: the threshold, FPR, TPR and detection error are undefined; pass --id_val "
                     "PRED_FOLDER LABEL_FOLDER with ID validation cases.")
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
    for method in dice_methods:
        by_folder = (recorded_fail_below or {}).get(method, {})
        differing = [group for group, values in by_folder.items() if any(v != fail_below for v in values)]
        if differing:
            values = sorted({v for group in differing for v in by_folder[group]})
            notes.append(f"{method} was fitted to keep failures at Dice < {' or '.join(f'{v:g}' for v in values)} "
                         f"rare ({JSON_NAME} of {_short_list(differing)}), but this evaluation counts Dice < "
                         f"{fail_below:g} as a failure: its silent rates do not check its own guarantee; pass "
                         f"--fail_below {values[0]:g} for that.")
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


# ----------------------------------------------------------------------------------------------- tables


def normalized_threshold(calibration: Mapping[str, Any] | None, threshold: float | None = None) -> float | None:
    """A raw threshold (default: the plugin's, from ``calibration``) on the normalised scale of ``calibration``
    (:func:`nnunet_ood.calibration.normalize_score`).

    None when the calibration lacks the bounds, the threshold is missing, or the bounds are not finite and ordered.
    """
    if not calibration:
        return None
    try:
        low, high = float(calibration["low"]), float(calibration["high"])
        t = float(calibration["threshold"] if threshold is None else threshold)
        return normalize_score(t, low, high) if math.isfinite(t) else None
    except (KeyError, TypeError, ValueError):
        return None


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


# ----------------------------------------------------------------------------------------------- risk-coverage


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


# ----------------------------------------------------------------------------------------------- outputs


def safe_file_part(name: str) -> str:
    """``name`` with every character other than letters, digits, ``-``, ``_`` and ``.`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def render_outputs(evaluation: Evaluation) -> dict[str, bytes]:
    """Every output file (tables and plots) as bytes, keyed by file name."""
    from nnunet_ood.evaluation.plots import (
        correlation_png,
        dice_vs_uncertainty_png,
        group_color,
        risk_coverage_png,
        score_distributions_png,
    )
    from nnunet_ood.evaluation.summary import SUMMARY_MD, flag_threshold, flagged, format_summary

    shown = [g for g in evaluation.groups if g.spec.role != ID_VAL]
    colors = {g.spec.name: group_color(i) for i, g in enumerate(evaluation.groups)} | {ALL_SHIFTED: "dimgray"}
    files = {
        EVALUATION_CSV: format_metrics_csv(evaluation.rows).encode(),
        EVALUATION_MD: format_markdown(evaluation.rows, evaluation.notes).encode(),
        CASES_CSV: format_cases_csv(evaluation.groups, evaluation.methods).encode(),
    }
    for method in evaluation.methods:  # the table's threshold, as in the summary's flags
        raw = flag_threshold(evaluation, method)
        threshold = normalized_threshold(evaluation.calibration.get(method), raw)
        points = [(g.spec.name, g.normalized[method], g.dice, flagged(g.score[method], raw) if threshold is not None
                   else None) for g in shown]
        files[f"dice_vs_uncertainty_{safe_file_part(method)}.png"] = dice_vs_uncertainty_png(method, points, threshold,
                                                                                      evaluation.fail_below, colors)
    distributions = {m: [(g.spec.name, g.normalized[m]) for g in evaluation.groups] for m in evaluation.methods}
    files[SCORE_PLOT] = score_distributions_png(distributions, colors)
    domains = list(dict.fromkeys(r["domain"] for r in evaluation.rows))
    rho = {(r["method"], r["domain"]): r["spearman"] for r in evaluation.rows}
    files[CORRELATION_PLOT] = correlation_png(evaluation.methods, domains, rho, colors)
    method_colors = {m: group_color(i) for i, m in enumerate(evaluation.methods)}
    files[RISK_COVERAGE_PLOT] = risk_coverage_png(*risk_coverage_curves(evaluation), method_colors)
    files[SUMMARY_MD] = format_summary(evaluation).encode()
    return files


def check_output_folder(folder: str) -> None:
    """The output folder must be a folder or not exist yet."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OODInputError(f"output folder {folder} exists and is not a folder; choose another -o")


def write_outputs(folder: str, files: Mapping[str, bytes]) -> list[str]:
    """Write every file atomically into ``folder`` (created if needed); returns the paths."""
    paths = []
    for name, data in files.items():
        path = os.path.join(folder, name)
        atomic_write_bytes(path, data)
        paths.append(path)
    return paths
