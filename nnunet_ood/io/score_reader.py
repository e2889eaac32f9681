"""The one reader of a prediction folder's ``ood_scores.csv`` and ``ood_scores.json``.

``nnUNetv2_evaluate_ood``, the review page of ``nnUNetv2_predict_ood --report``, ``report.html`` and
``nnUNetv2_calibrate_ood`` read the tables through :func:`read_score_rows` and :func:`read_score_document`.
Both check what they hand on: a damaged or hand-edited table is refused with one :class:`OODInputError` line
naming the file, the row or case and the field, and the fix, instead of being read as something else (a score
``"0.5"`` that is a string, a flag ``"yes"`` read as not flagged, a calibration that is a list silently left
out).

Unknown entries of ``ood_scores.json`` are ignored (a newer plugin may add some) and missing ones are allowed
(older folders lack some); an entry that is there must have the type the plugin writes. Numbers may be ``NaN``
or ``Infinity`` (Python's JSON reads and writes them; the plugin writes ``null`` where a value is undefined), but
never a string such as ``"NaN"``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

from nnunet_ood.errors import OODInputError
from nnunet_ood.io.json_files import read_json
from nnunet_ood.io.scores import CSV_NAME, JSON_NAME

PREDICT_COMMAND = "nnUNetv2_predict_ood"
#: the columns every ``ood_scores.csv`` has; ``decision`` and ``reason`` came later and may be missing
REQUIRED_COLUMNS = ("case", "method", "score", "normalized", "ood")


class ScoreRow(TypedDict):
    """One row of ``ood_scores.csv``: a case's score under one method."""

    case: str
    method: str
    score: float  # raw score, NaN when the case could not be scored
    normalized: float  # in [0, 1]; NaN when unscored or the method has no calibration
    ood: bool  # flagged (for a method that predicts the Dice: sent to review)
    decision: str  # accept/review for a deciding method, else empty (and in tables written before it existed)
    reason: str  # why a deciding method sends the case to review, else empty


# ----------------------------------------------------------------------------------------------- ood_scores.csv


def read_score_rows(folder: str) -> list[ScoreRow]:
    """The rows of ``folder``'s ``ood_scores.csv``, typed and checked: the columns of :data:`REQUIRED_COLUMNS`,
    a case and method name in every row, numbers (``nan`` allowed) for the scores, ``True``/``False`` for the
    flag, one row per case and method, normalised scores in [0, 1] or NaN. An empty table gives ``[]``."""
    path = os.path.join(folder, CSV_NAME)
    if not os.path.isfile(path):  # a dangling link or a folder is no table either
        raise OODInputError(f"no {CSV_NAME} in {folder}; {PREDICT_COMMAND} writes it next to the segmentations")
    try:
        with open(path, newline="") as f:
            rows = _parse_rows(path, csv.DictReader(f))
    except (OSError, ValueError, csv.Error) as e:  # ValueError: a binary file that is no UTF-8 text
        raise OODInputError(f"{path} is not a valid {CSV_NAME} ({type(e).__name__}: {e}); re-run "
                            f"{PREDICT_COMMAND}") from None
    seen: set[tuple[str, str]] = set()
    for r in rows:
        if (r["case"], r["method"]) in seen:
            raise OODInputError(f"{path} has two rows for case {r['case']}, method {r['method']}; re-run "
                                f"{PREDICT_COMMAND}")
        seen.add((r["case"], r["method"]))
        if r["normalized"] < 0 or r["normalized"] > 1:  # NaN passes: it marks an unscored case
            raise OODInputError(f"{path}: normalized score {r['normalized']} of case {r['case']}, method "
                                f"{r['method']} is outside [0, 1]; re-run {PREDICT_COMMAND}")
    return rows


def _parse_rows(path: str, reader: csv.DictReader) -> list[ScoreRow]:
    """Every row of an open table, or a one-line error naming the first bad line and cell."""

    def invalid(detail: str) -> OODInputError:
        return OODInputError(f"{path} is not a valid {CSV_NAME} ({detail}); re-run {PREDICT_COMMAND}")

    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise invalid(f"no column {', '.join(missing)}; expected the columns {', '.join(REQUIRED_COLUMNS)}")
    rows: list[ScoreRow] = []
    for r in reader:
        line = reader.line_num
        if any(r.get(c) is None for c in REQUIRED_COLUMNS):  # a short line: a truncated table
            raise invalid(f"line {line} has fewer cells than the columns {', '.join(REQUIRED_COLUMNS)}")
        if not r["case"] or not r["method"]:
            raise invalid(f"line {line} has no case or method name")
        where = f"line {line}, case {r['case']}, method {r['method']}"
        values = {}
        for column in ("score", "normalized"):
            try:
                values[column] = float(r[column])
            except ValueError:
                raise invalid(f"{where}: {column} {r[column]!r} is not a number") from None
        if r["ood"] not in ("True", "False"):  # anything else was read as False: accepted, silently
            raise invalid(f"{where}: ood {r['ood']!r} is not True or False")
        rows.append(ScoreRow(case=r["case"], method=r["method"], score=values["score"],
                             normalized=values["normalized"], ood=r["ood"] == "True",
                             decision=r.get("decision") or "", reason=r.get("reason") or ""))
    return rows


# ----------------------------------------------------------------------------------------------- ood_scores.json

#: (what the message says is expected, whether a value is of that kind)
Kind = tuple[str, Callable[[Any], bool]]
#: builds the one-line error: (where in the document, the value found, what was expected)
Fail = Callable[[str, Any, str], OODInputError]
_MISSING = object()  # stands for an entry that is not there


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


NUMBER: Kind = ("a number", _is_number)
NUMBER_OR_NULL: Kind = ("a number or null", lambda v: v is None or _is_number(v))
STRING: Kind = ("a string", lambda v: isinstance(v, str))
STRING_OR_NULL: Kind = ("a string or null", lambda v: v is None or isinstance(v, str))
BOOLEAN: Kind = ("true or false", lambda v: isinstance(v, bool))
STRINGS: Kind = ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
FOLDS: Kind = ("a list of fold names or numbers",
               lambda v: isinstance(v, list) and all(isinstance(x, str) or (_is_number(x) and
                                                                           float(x).is_integer()) for x in v))

#: a method's entry of ``calibration`` (and of each fold in ``calibration_per_fold``)
CALIBRATION_FIELDS: dict[str, Kind] = {
    "low": NUMBER_OR_NULL, "high": NUMBER_OR_NULL, "threshold": NUMBER_OR_NULL, "n_train_cases": NUMBER_OR_NULL,
    "n_val_cases": NUMBER_OR_NULL, "aggregation": STRING_OR_NULL, "false_alarm_rate": NUMBER_OR_NULL}
#: ``decision_rules[method]["gate"]``
GATE_FIELDS: dict[str, Kind] = {"level": NUMBER_OR_NULL, "scores": STRINGS, "calibration_cases": NUMBER_OR_NULL,
                                "source": STRING_OR_NULL, "active": BOOLEAN}
#: ``decision_rules[method]`` (``gate``: :data:`GATE_FIELDS`)
RULE_FIELDS: dict[str, Kind] = {
    "rule": STRING_OR_NULL, "fail_below": NUMBER_OR_NULL, "max_silent_failures": NUMBER_OR_NULL,
    "confidence": NUMBER_OR_NULL, "threshold": NUMBER_OR_NULL, "threshold_from": STRING_OR_NULL,
    "guarantee": BOOLEAN, "calibration_cases": NUMBER_OR_NULL, "statement": STRING_OR_NULL}
#: ``ood_maps`` (null without maps)
MAPS_FIELDS: dict[str, Kind] = {"dtype": STRING, "values": STRING, "non_finite_code": NUMBER_OR_NULL,
                                "scaling": STRING_OR_NULL}
#: an entry of ``scores``, the same values as a row of ``ood_scores.csv``
SCORE_FIELDS: dict[str, Kind] = {"case": STRING, "method": STRING, "score": NUMBER_OR_NULL,
                                 "normalized": NUMBER_OR_NULL, "ood": BOOLEAN, "decision": STRING,
                                 "reason": STRING}
#: the plain entries of the document (its objects and lists are checked by :func:`check_score_document`)
TOP_FIELDS: dict[str, Kind] = {
    "plugin": STRING, "plugin_version": STRING, "created": STRING, "model_folder": STRING, "folds": FOLDS,
    "checkpoint": STRING, "methods": STRINGS, "configuration": STRING, "plans": STRING, "tile_step_size": NUMBER,
    "use_gaussian": BOOLEAN, "use_mirroring": BOOLEAN, "calibration_source": STRING, "run_signature": STRING,
    "input_folder": STRING_OR_NULL}


def read_score_document(folder: str) -> dict[str, Any]:
    """``folder``'s ``ood_scores.json``, checked (:func:`check_score_document`); ``{}`` when the folder has none
    (predicted before the plugin wrote it). A dangling link, a folder or malformed JSON is a one-line error."""
    path = os.path.join(folder, JSON_NAME)
    if not os.path.isfile(path):
        if os.path.lexists(path):  # a dangling link or a folder is a damaged file, not an older folder without one
            what = "a dangling symbolic link" if os.path.islink(path) else "not a file"
            raise OODInputError(f"{path} is {what}; re-run {PREDICT_COMMAND} into {folder} or remove it")
        return {}
    document = read_json(path, lambda reason: OODInputError(f"cannot read {path} ({reason}); re-run "
                                                             f"{PREDICT_COMMAND} into {folder}"))
    return check_score_document(document, path, folder)


def check_score_document(document: Any, path: str, folder: str) -> dict[str, Any]:
    """``document`` (the content of ``path``) when every entry the plugin reads has the type it writes, else a
    one-line :class:`OODInputError` naming the file, the entry (for a score: the case and method) and the fix."""

    def fail(where: str, value: Any, expected: str) -> OODInputError:
        return OODInputError(f"{path}: {where} is {_describe(value)}, expected {expected}; regenerate it with "
                             f"{PREDICT_COMMAND} into {folder}")

    if not isinstance(document, dict):
        raise fail("the document", document, "a JSON object")
    _check_fields(document, TOP_FIELDS, "", fail)
    for key in ("calibration", "decision_rules"):
        _check_mapping(document, key, fail)
    for method, entry in document.get("calibration", {}).items():
        _check_fields(entry, CALIBRATION_FIELDS, f"calibration.{method}.", fail)
    for method, rule in document.get("decision_rules", {}).items():
        _check_fields(rule, RULE_FIELDS, f"decision_rules.{method}.", fail)
        if "gate" in rule:
            _check_mapping(rule, "gate", fail, f"decision_rules.{method}.", nested=False)
            _check_fields(rule["gate"], GATE_FIELDS, f"decision_rules.{method}.gate.", fail)
    _check_per_fold(document, fail)
    maps = document.get("ood_maps")
    if maps is not None:
        if not isinstance(maps, dict):
            raise fail("ood_maps", maps, "an object or null")
        _check_fields(maps, MAPS_FIELDS, "ood_maps.", fail)
    _check_scores(document, fail)
    return document



def _check_fields(entry: Mapping[str, Any], fields: Mapping[str, Kind], prefix: str, fail: Fail) -> None:
    for key, (expected, ok) in fields.items():
        if key in entry and not ok(entry[key]):
            raise fail(f"{prefix}{key}", entry[key], expected)


def _check_mapping(entry: Mapping[str, Any], key: str, fail: Fail, prefix: str = "", nested: bool = True) -> None:
    """``entry[key]``, if there, is an object (of objects, one per method, when ``nested``)."""
    if key not in entry:
        return
    value = entry[key]
    if not isinstance(value, dict):
        raise fail(f"{prefix}{key}", value, "an object" + (" with one object per method" if nested else ""))
    for name, item in (value.items() if nested else ()):
        if not isinstance(item, dict):
            raise fail(f"{prefix}{key}.{name}", item, "an object")


def _check_per_fold(document: Mapping[str, Any], fail: Fail) -> None:
    """``calibration_per_fold``: fold -> method -> a calibration entry."""
    if "calibration_per_fold" not in document:
        return
    per_fold = document["calibration_per_fold"]
    if not isinstance(per_fold, dict):
        raise fail("calibration_per_fold", per_fold, "an object with one object per fold")
    for fold in per_fold:
        _check_mapping(per_fold, fold, fail, "calibration_per_fold.")
        for method, entry in per_fold[fold].items():
            _check_fields(entry, CALIBRATION_FIELDS, f"calibration_per_fold.{fold}.{method}.", fail)


def _check_scores(document: Mapping[str, Any], fail: Fail) -> None:
    """``scores``: one object per case and method, with the values of :data:`SCORE_FIELDS`."""
    scores = document.get("scores", [])
    if not isinstance(scores, list):
        raise fail("scores", scores, "a list of objects, one per case and method")
    for i, entry in enumerate(scores):
        if not isinstance(entry, dict):
            raise fail(f"scores[{i}]", entry, "an object with case, method, score, normalized and ood")
        named = isinstance(entry.get("case"), str) and isinstance(entry.get("method"), str)
        where = f"scores[{i}] (case {entry['case']}, method {entry['method']})" if named else f"scores[{i}]"
        for key in ("case", "method", "score", "normalized", "ood"):
            if key not in entry:
                raise fail(f"{where}.{key}", _MISSING, SCORE_FIELDS[key][0])
        _check_fields(entry, SCORE_FIELDS, f"{where}.", fail)



def _describe(value: Any) -> str:
    """How a message names a JSON value: its type, and the value itself when it is short."""
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if _is_number(value):
        return f"the number {value!r}" if math.isfinite(value) else f"the number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    return "an object" if isinstance(value, dict) else type(value).__name__
