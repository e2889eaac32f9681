"""The review worklist's order: cases from least to most trustworthy, from a prediction folder's score table.

* Default: the number of methods that flag the case (descending), then the mean normalised score over the methods
  that have one (descending). A case no method could normalise (every score NaN) counts as most uncertain.
* ``method``: that method's normalised score (descending); ties (several cases clipped at 1, or a method without
  calibration, whose normalised scores are all NaN) are broken by its raw score. Cases it could not score (NaN)
  come first.

With a **deciding method** (one that predicts the Dice, ``Method.predicts_dice``, e.g. ``quality``; found through
the registry or the ``decision_rules`` of ``ood_scores.json``, :func:`deciding_method`), the cases it sends to
review come first and the accepted cases after them; within each part, the order above when ``method`` is given,
else the deciding method's own: cases it could not score first, then the predicted risk (1 - predicted Dice,
highest first).

Remaining ties keep the case names in alphabetical order, so the order is deterministic. No torch, no SimpleITK:
the command lines import this module before they check their arguments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nnunet_ood.errors import OODInputError
from nnunet_ood.io.score_reader import read_score_rows
from nnunet_ood.io.scores import CSV_NAME
from nnunet_ood.normalization import usable_bounds


@dataclass(frozen=True)
class MethodScore:
    """One method's values for one case, as in ``ood_scores.csv``."""

    score: float
    normalized: float
    ood: bool
    decision: str = ""  # accept/review for a deciding method, else empty
    reason: str = ""  # why a deciding method sends the case to review


@dataclass(frozen=True)
class RankedCase:
    """A case of the worklist: its rank (1 = least trustworthy), the values it was sorted by, the method whose map
    is shown."""

    rank: int
    case: str
    n_flagged: int
    ranking_score: float  # mean normalised score, the chosen method's normalised score, or the deciding method's
    overlay_method: str | None  # predicted risk (NaN: none)
    scores: Mapping[str, MethodScore]
    decision: str = ""  # the deciding method's accept/review ('' without one)
    reason: str = ""  # why it goes to review ('' when accepted or without a deciding method)


def check_report_arguments(report: bool, method: str | None, known: Sequence[str]) -> None:
    """``--report_method`` needs ``--report`` and must name a known method (checked before the model loads)."""
    if method is None:
        return
    if not report:
        raise OODInputError(f"--report_method {method} sets how review.html ranks the cases but no review is "
                            "written; add --report")
    if method not in known:
        raise OODInputError(f"--report_method {method!r} is not an OOD method; choose one of {', '.join(known)}")


def check_report_method(method: str | None, methods: Sequence[str]) -> None:
    """``--report_method`` must be one of the methods this prediction computes (checked once the model is loaded)."""
    if method is not None and method not in methods:
        raise OODInputError(f"--report_method {method} is not computed in this prediction (methods: "
                            f"{', '.join(methods)}); choose one of them or add it to --ood")


def read_scores(output_folder: str) -> tuple[list[str], dict[str, dict[str, MethodScore]]]:
    """Methods (table order) and ``{case: {method: MethodScore}}`` of a prediction folder's ``ood_scores.csv``
    (read and checked by :func:`nnunet_ood.io.score_reader.read_score_rows`)."""
    rows = read_score_rows(output_folder)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cases: dict[str, dict[str, MethodScore]] = {}
    for r in rows:
        cases.setdefault(r["case"], {})[r["method"]] = MethodScore(r["score"], r["normalized"], r["ood"],
                                                                   r["decision"], r["reason"])
    return methods, cases


def mean_normalized(scores: Mapping[str, MethodScore]) -> float:
    """Mean of the finite normalised scores (NaN when there is none)."""
    values = [s.normalized for s in scores.values() if math.isfinite(s.normalized)]
    return sum(values) / len(values) if values else math.nan


def calibration_bounds(document: Mapping[str, object]) -> dict[str, tuple[float, float]]:
    """``{method: (low, high)}`` of the normalisation in an ``ood_scores.json`` document: the methods whose bounds
    are :func:`nnunet_ood.normalization.usable_bounds`."""
    calibration = document.get("calibration")
    out = {}
    for method, values in (calibration.items() if isinstance(calibration, dict) else ()):
        try:
            low, high = float(values["low"]), float(values["high"])
        except (KeyError, TypeError, ValueError):
            continue
        if usable_bounds(low, high):
            out[method] = (low, high)
    return out


def deciding_method(methods: Sequence[str], document: Mapping[str, object]) -> str | None:
    """The method whose flag is the run's accept/review decision: the first method (table order) that the
    ``decision_rules`` of ``ood_scores.json`` name or that the registry says predicts the Dice; None without one."""
    from nnunet_ood.methods import REGISTRY

    rules = document.get("decision_rules")
    for m in methods:
        if (isinstance(rules, dict) and isinstance(rules.get(m), dict)) or \
                (m in REGISTRY and getattr(REGISTRY.get(m), "predicts_dice", False)):
            return m
    return None


def in_review(scores: Mapping[str, MethodScore], deciding: str) -> bool:
    """Whether the deciding method sends the case to review: flagged, not scored, or no row for it."""
    entry = scores.get(deciding)
    return entry is None or entry.ood or math.isnan(entry.score)


def review_reason(scores: Mapping[str, MethodScore], deciding: str) -> str:
    """The reason the prediction wrote; for tables written before reasons existed, what can be said."""
    entry = scores.get(deciding)
    if entry is None:
        return f"no {deciding} score"
    if entry.reason:
        return entry.reason
    return "could not be scored" if math.isnan(entry.score) else "sent to review (no reason recorded)"


def has_maps(method: str) -> bool:
    """Whether the method writes voxel maps (derived methods do not; unknown names are assumed to)."""
    from nnunet_ood.methods import REGISTRY, MethodKind

    return method not in REGISTRY or REGISTRY.get(method).kind is not MethodKind.DERIVED


def overlay_method(scores: Mapping[str, MethodScore], methods: Sequence[str], method: str | None,
                   bounds: Mapping[str, tuple[float, float]] | None = None, deciding: str | None = None,
                   with_maps: Sequence[str] | None = None) -> str | None:
    """The method whose map a case shows: ``method`` if given and it has maps, else the one with the highest
    normalised score among the methods with maps (a derived method such as ``quality`` has none; ``with_maps``:
    the methods whose maps were written, when ``--save_ood_maps`` named some).

    Ties (typically several methods clipped at 1) go to the method whose score lies furthest beyond its scale, the
    unclipped ``(score - low) / (high - low)`` with the ``bounds`` of ``ood_scores.json``, then to the first in
    table order. Without any finite normalised score: the first method with a row. The ``deciding`` method (a
    derived score, registered or not) has no map either.
    """
    mapped = [m for m in methods if has_maps(m) and m != deciding and (with_maps is None or m in with_maps)]
    if method is not None and method in mapped:
        return method
    present = [m for m in mapped if m in scores]
    finite = [m for m in present if math.isfinite(scores[m].normalized)]
    if not finite:
        return present[0] if present else None

    def unclipped(m: str) -> float:
        low, high = (bounds or {}).get(m, (math.nan, math.nan))
        if high == low:  # equal bounds: a step, no scale to lie beyond
            return scores[m].normalized
        value = (scores[m].score - low) / (high - low)
        return value if math.isfinite(value) else scores[m].normalized

    return max(finite, key=lambda m: (scores[m].normalized, unclipped(m), -present.index(m)))


def _sort_key(case: str, scores: Mapping[str, MethodScore], method: str | None) -> tuple:
    if method is None:
        mean = mean_normalized(scores)
        return (-sum(s.ood for s in scores.values()), -(math.inf if math.isnan(mean) else mean), case)
    entry = scores.get(method)
    if entry is None or math.isnan(entry.score):  # not scored: maximally uncertain
        return (0, 0.0, 0.0, case)
    normalized = entry.normalized if math.isfinite(entry.normalized) else -math.inf
    return (1, -normalized, -entry.score, case)


def _decision_key(case: str, scores: Mapping[str, MethodScore], deciding: str, method: str | None) -> tuple:
    part = 0 if in_review(scores, deciding) else 1
    if method is not None:
        return (part, *_sort_key(case, scores, method))
    entry = scores.get(deciding)
    if entry is None or math.isnan(entry.score):
        return (part, 0, 0.0, case)
    return (part, 1, -entry.score, case)


def rank_cases(methods: Sequence[str], cases: Mapping[str, Mapping[str, MethodScore]], method: str | None = None,
               bounds: Mapping[str, tuple[float, float]] | None = None,
               deciding: str | None = None, with_maps: Sequence[str] | None = None) -> list[RankedCase]:
    """Every case, least trustworthy first (see the module's docstring); ``method``: rank by that method only.
    ``bounds``: the calibration's normalisation bounds, and ``with_maps`` the methods whose maps were written (None:
    all), to choose the overlay (:func:`overlay_method`).
    ``deciding``: the method whose decision splits the cases (reviews first, :func:`deciding_method`)."""
    if method is not None and method not in methods:
        raise OODInputError(f"--report_method {method} has no scores in this folder's {CSV_NAME} (methods: "
                            f"{', '.join(methods)}); choose one of them")
    if deciding is not None:
        order = sorted(cases, key=lambda c: _decision_key(c, cases[c], deciding, method))
    else:
        order = sorted(cases, key=lambda c: _sort_key(c, cases[c], method))
    ranked = []
    for rank, case in enumerate(order, start=1):
        scores = cases[case]
        if method is not None:
            value = scores[method].normalized if method in scores else math.nan
        elif deciding is not None:
            value = scores[deciding].score if deciding in scores else math.nan
        else:
            value = mean_normalized(scores)
        decision = reason = ""
        if deciding is not None:
            review = in_review(scores, deciding)
            decision, reason = ("review", review_reason(scores, deciding)) if review else ("accept", "")
        ranked.append(RankedCase(rank, case, sum(s.ood for s in scores.values()), value,
                                 overlay_method(scores, methods, method, bounds, deciding, with_maps), scores, decision,
                                 reason))
    return ranked
