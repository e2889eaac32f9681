"""``review.html`` and ``review.csv``: the worklist of ``nnUNetv2_predict_ood --report``, for deployment without
labels.

Cases from least to most trustworthy (:mod:`nnunet_ood.reports.ranking`), each with thumbnails of the input
image, the segmentation and one method's uncertainty map (the slice with the largest summed uncertainty for 3D
images), its scores, normalised scores and flags. ``review.csv`` lists the same cases in the same order:
``rank, case, decision, reason, n_flagged, ranking_score``, then ``<method>_score, <method>_normalized,
<method>_ood`` per method. Everything comes from the prediction folder and the input folder; nothing is predicted
again.

When the run has a deciding method (one that predicts the Dice, e.g. ``quality``), the page leads with its
decision: the sentence saying which guarantee is in force (``decision_rules[m]["statement"]`` of
``ood_scores.json``), the run's drift line (:func:`nnunet_ood.quality.gate.drift_summary` of the per-case
records' ``unusual_p``, when the gate is active), then the cases to review, each with its reason, predicted Dice
and thumbnails, then the accepted cases folded (``<details>``); every method's scores are folded per case.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from nnunet_ood.io.atomic import atomic_write_text
from nnunet_ood.io.json_files import read_optional_json_object
from nnunet_ood.io.score_reader import read_score_document
from nnunet_ood.io.scores import JSON_NAME, record_path
from nnunet_ood.reports import page
from nnunet_ood.reports.cases import (
    IMAGE,
    MAP,
    PREDICTION,
    CaseFiles,
    CaseSlices,
    channel0_file,
    existing,
    file_key,
    foreground_labels,
    heat_scales,
    load_case_slices,
    map_file,
    render_case,
    thumbnail_box,
    thumbnail_name,
)
from nnunet_ood.reports.ranking import RankedCase, calibration_bounds, deciding_method, rank_cases, read_scores
from nnunet_ood.reports.thumbnails import LABEL_COLORS, HeatScale
from nnunet_ood.reports.writer import write_page

REVIEW_HTML = "review.html"
REVIEW_CSV = "review.csv"
REVIEW_FILES = "review_files"
MAPS_FLAG = "--save_ood_maps"


# ----------------------------------------------------------------------------------------------- the table


def csv_cell(value: Any) -> str:
    """A CSV cell: floats at full precision (``repr``), NaN as an empty cell, booleans as True/False."""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def format_review_csv(ranked: Sequence[RankedCase], methods: Sequence[str]) -> str:
    """``review.csv``: one row per case in worklist order (a method without a row for a case: empty cells)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "case", "decision", "reason", "n_flagged", "ranking_score",
                     *(f"{m}_{k}" for m in methods for k in ("score", "normalized", "ood"))])
    for r in ranked:
        values: list[Any] = []
        for m in methods:
            s = r.scores.get(m)
            values += [s.score, s.normalized, s.ood] if s is not None else ["", "", ""]
        writer.writerow([r.rank, r.case, r.decision, r.reason, r.n_flagged, csv_cell(r.ranking_score),
                         *(csv_cell(v) for v in values)])
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- files


# ----------------------------------------------------------------------------------------------- the page


def _provenance(document: Mapping[str, Any], input_folder: str | None, output_folder: str) -> str:
    items = [("prediction folder", os.path.abspath(output_folder))]
    if input_folder is not None:
        items.append(("input images", os.path.abspath(input_folder)))
    for key, label in (("model_folder", "model"), ("configuration", "configuration"), ("folds", "folds"),
                       ("checkpoint", "checkpoint"), ("calibration_source", "thresholds from"),
                       ("created", "scores created")):
        if key in document:
            value = document[key]
            items.append((label, ", ".join(map(str, value)) if isinstance(value, list) else value))
    return "<br>".join(f"{page.esc(k)}: {page.esc(v)}" for k, v in items)


def _false_alarm_text(document: Mapping[str, Any]) -> str:
    calibration = document.get("calibration") if isinstance(document.get("calibration"), dict) else {}
    rates = {c.get("false_alarm_rate") for c in calibration.values() if isinstance(c, dict)}
    rates.discard(None)
    if len(rates) == 1 and isinstance(next(iter(rates)), (int, float)):
        return f"set for a false-alarm rate of {next(iter(rates)):.1%}"
    return "set for the calibration's false-alarm rate"


def _order_sentence(method: str | None, cases: Sequence[RankedCase]) -> str:
    if method is None:
        return ("Order: number of methods that flag the case (most first), then the mean normalised score over the "
                "methods (highest first); a case without any normalised score counts as most uncertain. Overlay: "
                "the map of the method with the highest normalised score for that case (ties, e.g. several scores "
                "clipped at 1: the method whose score lies furthest beyond its calibration's range).")
    calibrated = any(math.isfinite(r.scores[method].normalized) for r in cases if method in r.scores)
    how = "normalised score (highest first; ties broken by the raw score)" if calibrated else \
        "raw score (highest first: it has no normalised score, no calibration)"
    return (f"Order: --report_method {page.esc(method)}: its {how}; cases it could not score come first. "
            f"Overlay: the {page.esc(method)} map.")


def _scores_table(r: RankedCase, methods: Sequence[str], deciding: str | None = None) -> str:
    """One column per method (the overlay's marked): raw score, normalised score, flag; flagged columns in red."""
    def cell(m: str, text: str) -> str:
        s = r.scores.get(m)
        return f'<td class="flag">{text}</td>' if s is not None and s.ood else f"<td>{text}</td>"

    heads = [page.breakable(m) + (" &#9679;" if m == r.overlay_method else "") for m in methods]
    rows = [["score", *(cell(m, page.compact(r.scores[m].score)) if m in r.scores else "-" for m in methods)],
            ["normalised", *(cell(m, page.number(r.scores[m].normalized)) if m in r.scores else "-"
                             for m in methods)],
            ["flag", *(cell(m, _flag_text(m, r.scores[m].ood, deciding)) if m in r.scores else "-"
                       for m in methods)]]
    return page.table(["", *heads], rows)


def _flag_text(method: str, flagged: bool, deciding: str | None = None) -> str:
    """``OOD``/``ok``; for a method that predicts Dice (quality) or the run's ``deciding`` method its decision,
    ``review``/``accept``."""
    from nnunet_ood.methods import REGISTRY

    if method == deciding or (method in REGISTRY and REGISTRY.get(method).predicts_dice):
        return "review" if flagged else "accept"
    return "OOD" if flagged else "ok"


def _map_missing_reason(case: CaseSlices, maps_saved: bool, scales: Mapping[str, HeatScale]) -> str:
    if not maps_saved:
        return f"no maps: predicted without {MAPS_FLAG}"
    if case.files.ood_map is None:
        return f"no {case.files.method} map file"
    if case.ood_map is None or (case.files.method or "") not in scales:
        return "map not readable or without finite values"
    return "not available"


def _predicted_dice(r: RankedCase, deciding: str) -> float:
    entry = r.scores.get(deciding)
    return math.nan if entry is None else 1.0 - entry.score


def _card(r: RankedCase, case: CaseSlices, thumbs: Mapping[str, str], methods: Sequence[str], maps_saved: bool,
          scales: Mapping[str, HeatScale], ranking_label: str, deciding: str | None = None) -> str:
    flagged = r.n_flagged > 0 if deciding is None else r.decision != "accept"
    method = r.overlay_method or "-"
    box = thumbnail_box(case)
    figures = [
        page.figure(thumbs.get(IMAGE), "input image", f"{r.case} input image",
                    "input image not found" if case.files.image is None else "input image not readable", box),
        page.figure(thumbs.get(PREDICTION), "segmentation", f"{r.case} segmentation", "segmentation not found", box),
        page.figure(thumbs.get(MAP), f"uncertainty: {method}", f"{r.case} {method} uncertainty",
                    _map_missing_reason(case, maps_saved, scales), box),
    ]
    pill = (f'<span class="pill bad">flagged by {r.n_flagged} of {len(r.scores)}</span>' if flagged
            else '<span class="pill good">no flag</span>')
    if deciding is not None:
        pill = '<span class="pill bad">review</span>' if flagged else '<span class="pill good">accept</span>'
    where = "" if case.slice_index is None else \
        (f'<div class="note">axial slice {case.slice_index} of {case.n_slices} (array axis 0; '
         + ("largest summed uncertainty of the shown map" if case.ood_map is not None else "most segmented voxels")
         + ")</div>")
    notes = "".join(f'<div class="note">{page.esc(n)}</div>' for n in case.notes)
    if deciding is None:
        info = (f"<h3>#{r.rank} {page.esc(r.case)} {pill}</h3>"
                f'<div class="note">{page.esc(ranking_label)}: <b>{page.number(r.ranking_score)}</b></div>'
                f"{where}{notes}{_scores_table(r, methods)}")
    else:
        reason = f'<div class="reason">{page.esc(r.reason)}</div>' if r.reason else ""
        info = (f"<h3>#{r.rank} {page.esc(r.case)} {pill}</h3>{reason}"
                f'<div class="note">predicted Dice ({page.esc(deciding)}): '
                f"<b>{page.number(_predicted_dice(r, deciding), 2)}</b></div>{where}{notes}"
                f"<details><summary>scores of all {len(methods)} methods</summary>"
                f"{_scores_table(r, methods, deciding)}"
                "</details>")
    return (f'<div class="card {"flagged" if flagged else "ok"}" id="case-{r.rank}">'
            f'<div class="thumbs">{"".join(figures)}</div><div class="info">{info}</div></div>')


@dataclass(frozen=True)
class DecisionContext:
    """What the page says about the deciding method's rule: its statement and the run's drift line (None: not
    recorded, or no active gate)."""

    method: str
    statement: str | None
    drift: str | None


def unusual_p_value(output_folder: str, case: str, method: str) -> float | None:
    """The gate's p-value of ``method``'s decision on ``case`` from its per-case record (None: not recorded)."""
    record = read_optional_json_object(record_path(output_folder, case))
    methods = record.get("methods")
    entry = methods.get(method) if isinstance(methods, dict) else None
    value = entry.get("unusual_p") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def decision_context(output_folder: str, document: Mapping[str, Any], deciding: str,
                     cases: Sequence[str]) -> DecisionContext:
    """The statement of ``decision_rules[deciding]`` and, when its gate is active, the drift line of the cases'
    recorded p-values (:func:`~nnunet_ood.quality.gate.drift_summary`)."""
    from nnunet_ood.quality.gate import drift_summary

    rules = document.get("decision_rules")
    rule = rules.get(deciding) if isinstance(rules, dict) and isinstance(rules.get(deciding), dict) else {}
    statement = rule.get("statement") if isinstance(rule.get("statement"), str) else None
    gate = rule.get("gate") if isinstance(rule.get("gate"), dict) else {}
    level = gate.get("level")
    drift = None
    if gate.get("active") is True and isinstance(level, (int, float)) and 0 < level < 1:
        p_values = [unusual_p_value(output_folder, c, deciding) for c in cases]
        if any(p is not None for p in p_values):
            drift = drift_summary(p_values, float(level))
    return DecisionContext(deciding, statement, drift)


def _decision_headline(ranked: Sequence[RankedCase], context: DecisionContext, document: Mapping[str, Any]) -> str:
    m = page.esc(context.method)
    n_review = sum(r.decision != "accept" for r in ranked)
    statement = page.esc(context.statement) if context.statement else \
        f"no statement of its rule in {JSON_NAME} (predicted before it was recorded)."
    drift = f'<p class="drift">Drift check: {page.esc(context.drift)}.</p>' if context.drift else ""
    return (f'<div class="headline"><p class="statement"><b>{m}</b>: {statement}</p>{drift}<ul>'
            f"<li><b>{n_review}</b> of {len(ranked)} case(s) to review, <b>{len(ranked) - n_review}</b> accepted by "
            f"{m}: the cases to review first, each with its reason; the accepted cases folded below. Same order in "
            f"{REVIEW_CSV} (columns decision, reason).</li>"
            "<li>Every method's raw score, normalised score and flag is folded in each case. A flag (OOD) of the "
            f"other methods means the case score is above the method's threshold ({_false_alarm_text(document)} on "
            "in-distribution cases) or could not be computed; &#9679; marks the method whose map is shown.</li>"
            "</ul></div>")


def _decision_body(ranked: Sequence[RankedCase], cards: Sequence[str], methods: Sequence[str],
                   context: DecisionContext, method: str | None) -> list[str]:
    """The cases to review (worklist and cards), then the accepted cases folded."""
    m = context.method

    def worklist(rows: Sequence[RankedCase], with_reason: bool) -> str:
        body = [[str(r.rank), f'<a href="#case-{r.rank}">{page.esc(r.case)}</a>',
                 page.number(_predicted_dice(r, m), 2), *([page.esc(r.reason)] if with_reason else []),
                 page.esc(", ".join(x for x in methods if x != m and x in r.scores and r.scores[x].ood) or "-")]
                for r in rows]
        heads = ["rank", "case", "predicted Dice", *(["reason"] if with_reason else []), "flagged by (other methods)"]
        return page.table(heads, body, text_columns=2, left=[3, 4] if with_reason else [3])

    review = [(r, c) for r, c in zip(ranked, cards) if r.decision != "accept"]
    accepted = [(r, c) for r, c in zip(ranked, cards) if r.decision == "accept"]
    within = f"--report_method {page.esc(method)}'s scores" if method else \
        "cases it could not score first, then the lowest predicted Dice first"
    parts = [f'<h2 id="review">Cases to review first ({len(review)})</h2>',
             f'<p class="note">Sent to review by {page.esc(m)}; order: {within}. Overlay: '
             + (f"the {page.esc(method)} map." if method else "the map of the method with the highest normalised "
                "score for that case.") + "</p>"]
    if review:
        parts += [worklist([r for r, _ in review], True), '<div class="cards">', *(c for _, c in review), "</div>"]
    else:
        parts.append('<p class="note">None: every case was accepted.</p>')
    parts.append(f'<h2 id="accepted">Accepted cases ({len(accepted)})</h2>')
    if accepted:
        parts += [f"<details><summary>{len(accepted)} case(s) accepted by {page.esc(m)}, same order (show)</summary>",
                  worklist([r for r, _ in accepted], False), '<div class="cards">', *(c for _, c in accepted),
                  "</div></details>"]
    else:
        parts.append('<p class="note">None.</p>')
    return parts


def render_review_page(output_folder: str, input_folder: str | None, methods: Sequence[str],
                       ranked: Sequence[RankedCase], slices: Sequence[CaseSlices], thumbs: Sequence[Mapping[str, str]],
                       scales: Mapping[str, HeatScale], method: str | None, maps_saved: bool,
                       document: Mapping[str, Any], labels: Mapping[int, str],
                       context: DecisionContext | None = None) -> str:
    """The complete ``review.html`` (thumbnail paths relative to the page); with a deciding method's ``context``
    the decision comes first (statement, drift line, cases to review, accepted cases folded)."""
    name = os.path.basename(os.path.abspath(output_folder))
    n_flagged = sum(r.n_flagged > 0 for r in ranked)
    ranking_label = "mean normalised score" if method is None else f"{method} normalised score"
    parts = [f"<h1>Review: {page.esc(name)}</h1>",
             f'<div class="meta">{_provenance(document, input_folder, output_folder)}<br>page written '
             f'{datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}</div>']
    if context is not None:
        parts.append(_decision_headline(ranked, context, document))
    else:
        parts += ['<div class="headline"><ul>',
                  f"<li><b>{len(ranked)}</b> case(s), <b>{n_flagged}</b> flagged by at least one of {len(methods)} "
                  f"method(s); least trustworthy first. Same order in {REVIEW_CSV}.</li>",
                  f"<li>{_order_sentence(method, ranked)}</li>",
                  f"<li>A flag (OOD) means the case score is above the method's threshold "
                  f"({_false_alarm_text(document)} on in-distribution cases, see ood_scores.json) or could not be "
                  "computed. Normalised scores are the case score on the calibration's scale, 0 (lowest training "
                  "score) to 1 (twice the highest). &#9679; marks the method whose map is shown.</li>",
                  "</ul></div>"]
    if not maps_saved:
        parts.append(f'<div class="warn">No uncertainty maps in this folder: it was predicted without '
                     f"{MAPS_FLAG}, so the thumbnails show the image and the segmentation only. Predict with "
                     f"{MAPS_FLAG} to see where each method is uncertain.</div>")
    if input_folder is None:
        parts.append('<div class="warn">The input folder is not known: thumbnails have no input image.</div>')
    parts.append(page.label_legend(dict(labels), LABEL_COLORS))
    if scales:
        parts.append('<div class="note">Uncertainty overlay: colour and opacity grow with the map value (turbo '
                     "colour map, blue = low, red = high, transparent at the bottom of the scale). One scale per "
                     "method for every case on this page (1st to 99th percentile of the shown slices): "
                     + "; ".join(f"{page.esc(m)} {page.compact(s.low)} to {page.compact(s.high)}"
                                 for m, s in scales.items()) + ".</div>")
    deciding = context.method if context is not None else None
    cards = [_card(r, s, t, methods, maps_saved, scales, ranking_label, deciding)
             for r, s, t in zip(ranked, slices, thumbs)]
    if context is not None:
        parts += _decision_body(ranked, cards, methods, context, method)
    else:
        summary_rows = [[str(r.rank), f'<a href="#case-{r.rank}">{page.esc(r.case)}</a>', str(r.n_flagged),
                         page.number(r.ranking_score),
                         page.esc(", ".join(m for m in methods if m in r.scores and r.scores[m].ood) or "-")]
                        for r in ranked]
        parts += ["<h2>Worklist</h2>",
                  page.table(["rank", "case", "flags", ranking_label, "flagged by"], summary_rows, text_columns=2,
                             row_classes=["flagged" if r.n_flagged else "" for r in ranked], left=[4]),
                  "<h2>Cases</h2>", '<div class="cards">', *cards, "</div>"]
    if not ranked:
        parts.append('<p class="note">No case in ood_scores.csv.</p>')
    return page.document(f"Review: {name}", "\n".join(parts))


# ----------------------------------------------------------------------------------------------- entry point


def write_review(input_folder: str | None, output_folder: str, method: str | None = None) -> list[str]:
    """Write ``review.csv``, ``review_files/`` and ``review.html`` into ``output_folder`` from its score table, its
    segmentations and maps, and the images of ``input_folder`` (None: no image thumbnails). Returns the paths."""
    methods, cases = read_scores(output_folder)
    dataset = read_optional_json_object(os.path.join(output_folder, "dataset.json"))
    document = read_score_document(output_folder)  # checked: a damaged document is a one-line error
    deciding = deciding_method(methods, document)
    maps = document.get("ood_maps")
    with_maps = maps["methods"] if isinstance(maps, dict) and isinstance(maps.get("methods"), list) else None
    ranked = rank_cases(methods, cases, method, calibration_bounds(document), deciding, with_maps)
    context = decision_context(output_folder, document, deciding, [r.case for r in ranked]) if deciding else None
    ending = dataset.get("file_ending") if isinstance(dataset.get("file_ending"), str) else None
    maps_saved = bool(document.get("ood_maps")) or any(
        map_file(output_folder, r.case, m, ending) is not None for r in ranked[:1] for m in methods)
    slices = []
    for r in ranked:
        segmentation = existing(os.path.join(output_folder, r.case + ending)) if ending else None
        files = CaseFiles(file_key(r.rank, r.case), channel0_file(input_folder, r.case, ending), segmentation,
                          ood_map=map_file(output_folder, r.case, r.overlay_method, ending), method=r.overlay_method)
        slices.append(load_case_slices(files, by_disagreement=False))
    scales = heat_scales(slices)
    files_out: dict[str, bytes] = {}
    thumbs = []
    for case in slices:
        names = {}
        for kind, data in render_case(case, scales, with_reference=False).items():
            files_out[thumbnail_name(case.files.key, kind)] = data
            names[kind] = f"{REVIEW_FILES}/{thumbnail_name(case.files.key, kind)}"
        thumbs.append(names)
    html_text = render_review_page(output_folder, input_folder, methods, ranked, slices, thumbs, scales, method,
                                   maps_saved, document, foreground_labels(dataset), context)
    csv_path = os.path.join(output_folder, REVIEW_CSV)
    atomic_write_text(csv_path, format_review_csv(ranked, methods))
    html_path = write_page(output_folder, REVIEW_HTML, html_text, REVIEW_FILES, files_out)
    return [html_path, csv_path]

