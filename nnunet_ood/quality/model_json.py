"""A stored quality model's JSON (:meth:`nnunet_ood.quality.model.QualityModel.to_json`), read strictly: every
missing, extra or ill-typed key, every value a fit cannot have written, is an :class:`OODStateError` naming the file
and the fix. Only JSON values are read; nothing is ever executed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnunet_ood.errors import OODStateError

FORMAT = "nnunet_ood.quality_model"
SCHEMA_VERSION = 1
REFIT = "re-fit with nnUNetv2_fit_ood"


def corrupted(where: str, detail: str) -> OODStateError:
    """The error for a stored model that a fit cannot have written: what is wrong and the fix."""
    return OODStateError(f"corrupted quality model in {where}: {detail}; {REFIT}")


def check_keys(obj: Any, required: Sequence[str], what: str, where: str) -> dict[str, Any]:
    """``obj`` itself, when it is a dict with exactly the keys ``required``."""
    if not isinstance(obj, dict) or set(obj) != set(required):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise corrupted(where, f"{what} must have exactly the keys {', '.join(required)} (got {got})")
    return obj


def check_number(value: Any, what: str, where: str) -> float:
    """``value`` as a float, when it is a finite number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise corrupted(where, f"{what} = {value!r} is not a finite number")
    return float(value)


def check_integer(value: Any, what: str, where: str, minimum: int) -> int:
    """``value``, when it is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise corrupted(where, f"{what} = {value!r} is not an integer >= {minimum}")
    return value


def check_numbers(value: Any, what: str, where: str, length: int | None = None) -> list[float]:
    """``value`` as floats, when it is a non-empty list (of ``length`` entries, if given) of finite numbers."""
    if not isinstance(value, list) or (length is not None and len(value) != length) or not value:
        size = f"{length} " if length is not None else "a non-empty list of "
        raise corrupted(where, f"{what} must be {size}numbers")
    return [check_number(v, f"{what}[{i}]", where) for i, v in enumerate(value)]


def check_spec(spec: Any, feature_names: Sequence[str], where: str) -> dict[str, Any]:
    """A stored predictor (:func:`nnunet_ood.quality.model.predict_spec`'s ``spec``) of a model with
    ``feature_names``, checked entry by entry."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    p = len(feature_names)
    if kind == "constant":
        check_keys(spec, ("kind", "value"), "the constant predictor", where)
        return {"kind": kind, "value": check_number(spec["value"], "value", where)}
    if kind == "ridge":
        check_keys(spec, ("kind", "alpha", "clip", "center", "scale", "coef", "intercept"), "the ridge predictor",
                   where)
        out = {"kind": kind, "alpha": check_number(spec["alpha"], "alpha", where),
               "clip": check_number(spec["clip"], "clip", where),
               "center": check_numbers(spec["center"], "center", where, p),
               "scale": check_numbers(spec["scale"], "scale", where, p),
               "coef": check_numbers(spec["coef"], "coef", where, p),
               "intercept": check_number(spec["intercept"], "intercept", where)}
        if out["alpha"] <= 0 or out["clip"] <= 0 or min(out["scale"]) <= 0:
            raise corrupted(where, "the ridge predictor needs alpha, clip and every scale > 0")
        return out
    if kind == "isotonic":
        check_keys(spec, ("kind", "feature", "increasing", "x", "y"), "the isotonic predictor", where)
        if spec["feature"] not in feature_names or not isinstance(spec["increasing"], bool):
            raise corrupted(where, f"the isotonic predictor's feature {spec['feature']!r} is not one of the model's "
                            "features, or its direction is not true/false")
        x = check_numbers(spec["x"], "x", where)
        y = check_numbers(spec["y"], "y", where, len(x))
        dy = np.diff(y) if spec["increasing"] else -np.diff(y)
        if np.any(np.diff(x) <= 0) or np.any(dy < 0):
            raise corrupted(where, "the isotonic knots must have increasing x and y monotone in the stated direction")
        return {"kind": kind, "feature": spec["feature"], "increasing": spec["increasing"], "x": x, "y": y}
    if kind == "isotonic_mean":
        check_keys(spec, ("kind", "members"), "the isotonic_mean predictor", where)
        members = spec["members"]
        if not isinstance(members, list) or not members or \
                any(not isinstance(m, dict) or m.get("kind") != "isotonic" for m in members):
            raise corrupted(where, "the isotonic_mean predictor needs a non-empty list of isotonic members")
        return {"kind": kind, "members": [check_spec(m, feature_names, where) for m in members]}
    raise corrupted(where, f"unknown predictor kind {kind!r} (one of constant, ridge, isotonic, isotonic_mean)")


_REPORT_KEYS = ("chosen", "selection", "n_rows", "n_groups", "n_dropped", "n_splits", "candidates")
_CANDIDATE_KEYS = ("name", "cv_mae", "cv_spearman")


def check_report(report: Any, where: str) -> dict[str, Any]:
    """A stored cross-validation report (``QualityModel.cv_report_``), checked entry by entry."""
    check_keys(report, _REPORT_KEYS, "cross_validation", where)
    if not isinstance(report["chosen"], str) or not isinstance(report["selection"], str):
        raise corrupted(where, "cross_validation's chosen and selection must be strings")
    out = {"chosen": report["chosen"], "selection": report["selection"]}
    for key in ("n_rows", "n_groups", "n_dropped", "n_splits"):
        out[key] = check_integer(report[key], f"cross_validation.{key}", where, 0)
    if not isinstance(report["candidates"], list) or not report["candidates"]:
        raise corrupted(where, "cross_validation.candidates must be a non-empty list")
    rows = []
    for entry in report["candidates"]:
        check_keys(entry, _CANDIDATE_KEYS, "a cross-validation candidate", where)
        rho = None if entry["cv_spearman"] is None else check_number(entry["cv_spearman"], "cv_spearman", where)
        mae = check_number(entry["cv_mae"], "cv_mae", where)
        if not isinstance(entry["name"], str) or mae < 0 or (rho is not None and not -1 <= rho <= 1):
            raise corrupted(where, f"cross-validation candidate {entry['name']!r}: needs a string name, cv_mae >= 0 "
                            "and cv_spearman null or in [-1, 1]")
        rows.append({"name": entry["name"], "cv_mae": mae, "cv_spearman": rho})
    if out["chosen"] not in [r["name"] for r in rows]:
        raise corrupted(where, f"cross_validation.chosen {out['chosen']!r} is not one of its candidates")
    out["candidates"] = rows
    return out
