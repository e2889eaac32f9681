"""Per-case OOD records and the ``ood_scores.csv`` / ``ood_scores.json`` tables of a prediction folder.

Each predicted case gets a small JSON record in ``<output>/ood_cases/`` as soon as it is scored, so that
``--continue_prediction`` and ``-num_parts`` runs can rebuild the complete tables from all records.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from nnunet_ood.io.atomic import atomic_write_text
from nnunet_ood.io.json_files import read_optional_json_object

RECORDS_DIRNAME = "ood_cases"
CSV_NAME = "ood_scores.csv"
JSON_NAME = "ood_scores.json"
CSV_COLUMNS = ("case", "method", "score", "normalized", "ood", "decision", "reason")
#: the ``decision`` of a method that predicts Dice (its ``ood`` flag: sent to review) and the ``reason`` of a
#: review; both empty for other methods
ACCEPT, REVIEW = "accept", "review"


def _json_number(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def record_path(output_folder: str, case: str) -> str:
    return os.path.join(output_folder, RECORDS_DIRNAME, f"{case}.json")


def write_case_record(output_folder: str, case: str, scores: Mapping[str, Mapping[str, Any]],
                      run_signature: str, input_folder: str | None = None) -> str:
    """Store one case's scores: ``{method: {score, normalized, ood, threshold}}`` (and the run's input folder)."""
    os.makedirs(os.path.join(output_folder, RECORDS_DIRNAME), exist_ok=True)
    payload = {"case": case, "run_signature": run_signature, "input_folder": input_folder,
               "methods": {m: {k: (_json_number(v) if isinstance(v, float) else v) for k, v in d.items()}
                           for m, d in scores.items()}}
    path = record_path(output_folder, case)
    atomic_write_text(path, json.dumps(payload, indent=1))
    return path


def _read_record(output_folder: str, case: str) -> dict[str, Any] | None:
    """A case's record, None when it is missing, unreadable, malformed or not of the record's shape (a JSON
    ``null`` or list made ``--continue_prediction`` stop with an ``AttributeError`` traceback): the case is
    then predicted again."""
    record = read_optional_json_object(record_path(output_folder, case))
    methods = record.get("methods")
    if not isinstance(methods, dict) or not all(isinstance(m, dict) for m in methods.values()):
        return None
    return record


def has_case_record(output_folder: str, case: str, run_signature: str) -> bool:
    """True if the case was already scored by a run with the same model, folds, checkpoint and methods."""
    record = _read_record(output_folder, case)
    return record is not None and record.get("run_signature") == run_signature


def recorded_cases(output_folder: str) -> list[str]:
    """Every case with a record in the output folder, sorted."""
    folder = os.path.join(output_folder, RECORDS_DIRNAME)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(n[:-len(".json")] for n in names if n.endswith(".json"))


def collect_records(output_folder: str, cases: Iterable[str] | None, run_signature: str) -> list[dict[str, Any]]:
    """Records of ``cases`` (None: every recorded case of the folder) written by runs with this signature (others
    are stale or of other settings and ignored)."""
    if cases is None:
        cases = recorded_cases(output_folder)
    records = []
    for case in cases:
        record = _read_record(output_folder, case)
        if record is not None and record.get("run_signature") == run_signature:
            records.append(record)
    return records


def common_input_folder(records: Iterable[Mapping[str, Any]]) -> str | None:
    """The input folder the records share, None when they come from several (or name none)."""
    folders = {r.get("input_folder") for r in records}
    return folders.pop() if len(folders) == 1 else None


def _nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def decision(ood: bool) -> str:
    """``review`` for a flagged case, ``accept`` otherwise."""
    return REVIEW if ood else ACCEPT


def write_score_tables(output_folder: str, records: list[dict[str, Any]], methods: list[str],
                       metadata: Mapping[str, Any], decision_methods: Iterable[str] = ()) -> tuple[str, str]:
    """Write the tidy CSV (``case,method,score,normalized,ood,decision,reason``) and the JSON with thresholds and
    provenance. ``decision`` is ``accept``/``review`` on the rows of ``decision_methods`` and ``reason`` why a
    case goes to review; both empty elsewhere."""
    deciding = set(decision_methods)
    rows = []
    for record in sorted(records, key=lambda r: r["case"]):
        for method in methods:
            entry = record["methods"].get(method)
            if entry is None:
                continue
            rows.append({"case": record["case"], "method": method, "score": _nan_if_none(entry["score"]),
                         "normalized": _nan_if_none(entry["normalized"]), "ood": bool(entry["ood"]),
                         "decision": decision(bool(entry["ood"])) if method in deciding else "",
                         "reason": (entry.get("reason") or "") if method in deciding else ""})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "score": repr(row["score"]), "normalized": repr(row["normalized"])})
    csv_path = os.path.join(output_folder, CSV_NAME)
    atomic_write_text(csv_path, buffer.getvalue())

    document = dict(metadata)
    document["scores"] = [{**r, "score": _json_number(r["score"]), "normalized": _json_number(r["normalized"])}
                          for r in rows]
    json_path = os.path.join(output_folder, JSON_NAME)
    atomic_write_text(json_path, json.dumps(document, indent=2, default=str))
    return csv_path, json_path
