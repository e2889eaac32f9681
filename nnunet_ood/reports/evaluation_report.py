"""``report.html`` of ``nnUNetv2_evaluate_ood``: the evaluation as one page a person can read.

The headline (best method at detecting shifts and at predicting failures, and what the latter's flag does per
group: :mod:`nnunet_ood.evaluation.summary`, the same numbers as ``ood_summary.md``; for methods that predict the
Dice, what their accept/review decision did), the metric table and the table of the prediction-time decisions,
the plots already written next to it (the risk-coverage curves first), and two galleries drawn with the best
failure predictor: the silent failures (Dice below the evaluation's ``fail_below``, not flagged) and the most
uncertain cases, each with its input slice, reference, prediction and that method's uncertainty map (thumbnails
in ``report_files/``).

Input images are looked up per group: ``--images GROUP FOLDER``, else the input folder the prediction recorded in
its ``ood_scores.json`` (if it still exists), else the nnU-Net raw-data sibling of the label folder (``labelsTs_x``
-> ``imagesTs_x``, ``labelsTr`` -> ``imagesTr``). Without them the gallery shows the labels on a grey background
and says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from nnunet_ood.errors import OODInputError
from nnunet_ood.evaluation.decisions import BOUND_CONFIDENCE, accepted_failures
from nnunet_ood.evaluation.metrics import failure_rate_upper_bound
from nnunet_ood.evaluation.summary import best_methods, flag_threshold, flagged, group_rows
from nnunet_ood.evaluation.table import (
    ALL_SHIFTED,
    CORRELATION_PLOT,
    DECISION_COLUMNS,
    ID_TEST,
    ID_VAL,
    MARKDOWN_HEADERS,
    RISK_COVERAGE_PLOT,
    SCORE_PLOT,
    Evaluation,
    Group,
    GroupSpec,
    LabelSetup,
    read_dataset_json,
    safe_file_part,
)
from nnunet_ood.io.json_files import read_optional_json_object
from nnunet_ood.io.scores import JSON_NAME
from nnunet_ood.reports import page
from nnunet_ood.reports.cases import (
    IMAGE,
    MAP,
    PREDICTION,
    REFERENCE,
    CaseFiles,
    CaseSlices,
    channel0_file,
    existing,
    foreground_labels,
    heat_scales,
    load_case_slices,
    map_file,
    render_case,
    thumbnail_box,
    thumbnail_name,
)
from nnunet_ood.reports.thumbnails import LABEL_COLORS
from nnunet_ood.reports.writer import write_page

REPORT_HTML = "report.html"
REPORT_FILES = "report_files"
DEFAULT_GALLERY_CASES = 12
IMAGES_FLAG = "--images"
MAPS_FLAG = "--save_ood_maps"


# ----------------------------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class ImageSource:
    """Where a group's input images are (None: not found) and how that folder was chosen."""

    folder: str | None
    origin: str


def sibling_image_folder(label_folder: str) -> str | None:
    """nnU-Net's raw layout: the ``images*`` folder next to a ``labels*`` folder (``labelsTs_x`` -> ``imagesTs_x``),
    if it exists."""
    path = os.path.abspath(label_folder)
    name = os.path.basename(path)
    if "labels" not in name:
        return None
    candidate = os.path.join(os.path.dirname(path), name.replace("labels", "images", 1))
    return candidate if os.path.isdir(candidate) else None


def recorded_input_folder(prediction_folder: str) -> str | None:
    """The input folder ``nnUNetv2_predict_ood`` recorded in the prediction folder's ``ood_scores.json``, if it still
    exists (predictions are often moved or read on another machine)."""
    folder = read_optional_json_object(os.path.join(prediction_folder, JSON_NAME)).get("input_folder")
    return folder if isinstance(folder, str) and os.path.isdir(folder) else None


def resolve_image_sources(specs: Sequence[GroupSpec], images: Sequence[Sequence[str]] | None) -> dict[str, ImageSource]:
    """Each group's input-image folder: from ``--images GROUP FOLDER`` (checked: known group, given once, a folder),
    else the prediction's recorded input folder (:func:`recorded_input_folder`), else the sibling of its label
    folder (:func:`sibling_image_folder`)."""
    names = [s.name for s in specs]
    given: dict[str, str] = {}
    for group, folder in images or ():
        if group not in names:
            raise OODInputError(f"{IMAGES_FLAG} names group {group!r}, which is not evaluated; use one of "
                                f"{', '.join(names)}")
        if group in given:
            raise OODInputError(f"{IMAGES_FLAG} is given twice for {group}; give one image folder per group")
        if not os.path.isdir(folder):
            raise OODInputError(f"{IMAGES_FLAG} folder {folder} of {group} does not exist or is not a folder")
        given[group] = folder
    sources = {}
    for spec in specs:
        if spec.name in given:
            sources[spec.name] = ImageSource(given[spec.name], f"{IMAGES_FLAG}")
            continue
        recorded = recorded_input_folder(spec.prediction_folder)
        if recorded is not None:
            sources[spec.name] = ImageSource(recorded, "the prediction's input folder (ood_scores.json)")
            continue
        sibling = sibling_image_folder(spec.label_folder)
        sources[spec.name] = ImageSource(sibling, "next to the label folder") if sibling is not None else \
            ImageSource(None, f"not found (no images* folder next to the labels; pass {IMAGES_FLAG} {spec.name} "
                              "FOLDER)")
    return sources


# ----------------------------------------------------------------------------------------------- galleries


@dataclass(frozen=True)
class GalleryCase:
    """A case of a gallery: its group and its index in the group's arrays."""

    group: Group
    index: int

    @property
    def case(self) -> str:
        return self.group.cases[self.index]


def gallery_method(evaluation: Evaluation) -> tuple[str | None, str]:
    """The method the galleries use and why: the best failure predictor (lowest pooled AURC), else the best shift
    detector (highest pooled AUROC), else the first method."""
    best = best_methods(evaluation)
    if best["failure"]:
        return best["failure"], "best at predicting failures (lowest AURC, all shifted domains)"
    if best["shift"]:
        return best["shift"], "best at detecting shifts (AURC undefined for every method)"
    if evaluation.methods:
        return evaluation.methods[0], "first method (AUROC and AURC undefined for every method)"
    return None, "no method"


def _shown_groups(evaluation: Evaluation) -> list[Group]:
    return [g for g in evaluation.groups if g.spec.role != ID_VAL]  # as ood_summary.md: the cases compared


def silent_failures(evaluation: Evaluation, method: str) -> list[GalleryCase]:
    """Failed (Dice below the evaluation's ``fail_below``) and not flagged by ``method`` (the summary's threshold),
    lowest Dice first; empty when the method has no threshold."""
    threshold = flag_threshold(evaluation, method)
    if math.isnan(threshold):
        return []
    found = []
    for group in _shown_groups(evaluation):
        missed = (group.dice < evaluation.fail_below) & ~flagged(group.score[method], threshold)
        found += [GalleryCase(group, int(i)) for i in np.flatnonzero(missed)]
    return sorted(found, key=lambda c: (c.group.dice[c.index], c.group.spec.name, c.case))


def most_uncertain(evaluation: Evaluation, method: str, count: int) -> list[GalleryCase]:
    """The ``count`` cases with the highest raw score of ``method`` (unscored, NaN, first)."""
    every = [GalleryCase(g, i) for g in _shown_groups(evaluation) for i in range(len(g.cases))]

    def key(c: GalleryCase) -> tuple:
        score = float(c.group.score[method][c.index])
        return (0, 0.0, c.group.spec.name, c.case) if math.isnan(score) else (1, -score, c.group.spec.name, c.case)

    return sorted(every, key=key)[:count]


# ----------------------------------------------------------------------------------------------- page parts


def decision_rows(evaluation: Evaluation, method: str) -> list[dict]:
    """Per group (the ID test cases, each domain, all shifted domains pooled) what ``method``'s prediction-time
    decision did: cases, accepted, failures among the accepted (Dice below ``fail_below``), their rate and its exact
    one-sided 95% upper bound (Clopper–Pearson). Groups where the method made no decision are left out."""
    rows, shifted = [], []
    for group in (g for g in evaluation.groups if g.spec.role != ID_VAL):
        accepted = group.accepted(method)
        if accepted is None:
            continue
        rows.append((group.spec.name, accepted, group.dice))
        if group.spec.role != ID_TEST:
            shifted.append((accepted, group.dice))
    if len(shifted) > 1:
        rows.append((ALL_SHIFTED, np.concatenate([a for a, _ in shifted]), np.concatenate([d for _, d in shifted])))
    out = []
    for name, accepted, dice in rows:
        failures, n_accepted = accepted_failures(accepted, dice, evaluation.fail_below)
        out.append({"group": name, "cases": int(accepted.size), "accepted": n_accepted,
                    "coverage": n_accepted / accepted.size if accepted.size else math.nan, "failures": failures,
                    "rate": failures / n_accepted if n_accepted else math.nan,
                    "upper": failure_rate_upper_bound(failures, n_accepted, BOUND_CONFIDENCE)})
    return out


def _decision_headline(evaluation: Evaluation) -> str:
    """Per method that predicts the Dice, first on the page: coverage and the failures among accepted cases with
    their exact 95% upper bound, per group."""
    out = []
    for method in evaluation.dice_methods:
        rows = decision_rows(evaluation, method)
        if not rows:
            continue
        body = [[page.esc(r["group"]), str(r["cases"]), f"{r['accepted']} ({_percent(r['coverage'])})",
                 f"{r['failures']} ({_percent(r['rate'])})", _percent(r["upper"])] for r in rows]
        statement = evaluation.statements.get(method)
        if statement:  # the same sentence as the prediction's ood_scores.json, closing lines and review page
            out.append(f'<p class="statement"><b>What the decision of {page.esc(method)} guarantees</b> (as the '
                       f"prediction of the ID test cases recorded it): {page.esc(statement)}</p>")
        out.append(f'<p id="decision-{page.esc(method)}"><b>Auto-accepted by {page.esc(method)}</b>: per group, the '
                   f"share of cases accepted (coverage) and the accepted cases that failed (Dice &lt; "
                   f"{evaluation.fail_below:g}), with the exact one-sided 95% upper bound of that failure rate "
                   "(Clopper–Pearson: the true rate among cases like these is below it with 95% confidence).</p>"
                   + page.table(["group", "cases", "accepted (coverage)", "failed among accepted",
                                 "95% upper bound"], body))
    return "".join(out)


def _headline(evaluation: Evaluation, method: str | None) -> str:
    best = best_methods(evaluation)
    pooled = {r["method"]: r for r in evaluation.rows if r["domain"] == ALL_SHIFTED}
    items = []
    if best["shift"]:
        items.append(f"Best at detecting shifted cases: <b>{page.esc(best['shift'])}</b> (AUROC "
                     f"{page.number(pooled[best['shift']]['auroc'])}, all shifted domains against the ID test "
                     "cases).")
    else:
        items.append("Best at detecting shifted cases: undefined (no AUROC could be computed).")
    if best["failure"]:
        row = pooled[best["failure"]]
        items.append(f"Best at predicting failures: <b>{page.esc(best['failure'])}</b> (AURC "
                     f"{page.number(row['aurc'])}, Spearman with 1 - Dice {page.number(row['spearman'])}); the table "
                     "below shows what its flag does.")
    else:
        items.append("Best at predicting failures: undefined (no AURC could be computed).")
    items.append(f"A failure is a segmentation with Dice &lt; {evaluation.fail_below:g}; missed = failed and not "
                 "flagged (a silent failure).")
    items += _decision_items(evaluation)
    rows = []
    for r in group_rows(evaluation, best["failure"]):
        share = "-" if math.isnan(r["flagged"]) else f"{r['flagged']:.0%}"
        rows.append([page.esc(r["group"]), str(r["cases"]), page.number(r["mean_dice"]), str(r["failures"]), share,
                     page.number(r["caught"]), page.number(r["missed"])])
    header = ["group", "cases", "mean Dice", "failures", f"flagged by {page.esc(best['failure'] or '-')}",
              "failures caught", "failures missed"]
    return ('<div class="headline">' + _decision_headline(evaluation) + "<ul>" +
            "".join(f"<li>{i}</li>" for i in items) + "</ul>" +
            page.table(header, rows) + "</div>")


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1%}"


def _decision_items(evaluation: Evaluation) -> list[str]:
    """One headline item per method that predicts the Dice: what its prediction-time decision did on the ID test
    cases and on all shifted cases (the rows' coverage and silent rates)."""
    items = []
    for method in evaluation.dice_methods:
        rows = {r["domain"]: r for r in evaluation.rows if r["method"] == method}
        parts = []
        for domain, name in ((ID_TEST, "the ID test cases"), (ALL_SHIFTED, "all shifted cases")):
            r = rows.get(domain)
            if r is None or math.isnan(r["coverage"]):
                continue
            parts.append(f"on {name} it accepts {_percent(r['coverage'])}, silent failures "
                         f"{_percent(r['silent_rate'])} of all cases ({_percent(r['silent_rate_accepted'])} of the "
                         f"accepted), predicted Dice off by {page.number(r['dice_mae'])} on average")
        if parts:
            items.append(f"Accept/review decision of <b>{page.esc(method)}</b> (flag of the prediction): "
                         + "; ".join(parts) + ".")
    return items


def _decision_table(evaluation: Evaluation) -> str:
    """The prediction-time decisions: coverage, silent rates and the predicted-Dice errors of the ID test cases and
    of all shifted cases, methods that predict the Dice first (bold); methods without any of these values are
    named below the table instead."""
    methods = [m for m in evaluation.dice_methods if m in evaluation.methods] + \
        [m for m in evaluation.methods if m not in evaluation.dice_methods]
    by_key = {(r["method"], r["domain"]): r for r in evaluation.rows}
    body, undecided = [], []
    for method in methods:
        shown = [by_key[(method, d)] for d in (ID_TEST, ALL_SHIFTED) if (method, d) in by_key]
        if all(math.isnan(r[c]) for r in shown for c in DECISION_COLUMNS):
            undecided.append(method)
            continue
        for r in shown:
            name = page.esc(method)
            cases = r["n_id"] if r["domain"] == ID_TEST else r["n_domain"]
            body.append([f"<b>{name}</b>" if method in evaluation.dice_methods else name, page.esc(r["domain"]),
                         page.number(cases), *(page.number(r[c]) for c in DECISION_COLUMNS)])
    out = page.table(["method", "cases", "n", *(MARKDOWN_HEADERS[c] for c in DECISION_COLUMNS)], body,
                     text_columns=2) if body else ""
    if undecided:
        out += (f'<p class="note">No accept/review decision (no calibrated threshold) and no predicted Dice: '
                f"{page.esc(', '.join(undecided))}.</p>")
    return out


def _metric_table(rows: Sequence[Mapping], best: Mapping[str, str | None], pooled_only: bool) -> str:
    # the pooled table keeps to the detection and ranking metrics; the decisions have their own table
    columns = [c for c in MARKDOWN_HEADERS if not (pooled_only and (c == "domain" or c in DECISION_COLUMNS))]
    shown = [r for r in rows if r["domain"] == ALL_SHIFTED] if pooled_only else list(rows)
    body, classes = [], []
    for r in shown:
        cells = []
        for c in columns:
            text = page.esc(r[c]) if c in ("method", "domain") else page.number(r[c])
            if r["domain"] == ALL_SHIFTED and ((c == "auroc" and r["method"] == best["shift"]) or
                                               (c == "aurc" and r["method"] == best["failure"])):
                text = f"<b>{text}</b>"
            cells.append(text)
        body.append(cells)
        classes.append("pooled" if r["domain"] == ALL_SHIFTED and not pooled_only else "")
    return page.table([MARKDOWN_HEADERS[c] for c in columns], body, text_columns=1 if pooled_only else 2,
                      row_classes=classes)


def _plots(plot_names: Sequence[str], featured: Sequence[str]) -> str:
    """The plots written next to the page: the featured methods' Dice-vs-uncertainty plots, the score distributions
    and correlations; the other methods' plots folded."""
    names = set(plot_names)
    dice = {n for n in names if n.startswith("dice_vs_uncertainty_")}
    first = [f"dice_vs_uncertainty_{safe_file_part(m)}.png" for m in dict.fromkeys(featured) if m]
    first = [n for n in first if n in dice]
    shown = [n for n in (RISK_COVERAGE_PLOT,) if n in names] + first + \
        [n for n in (SCORE_PLOT, CORRELATION_PLOT) if n in names]
    rest = sorted(dice - set(first))
    out = '<div class="plots">' + "".join(page.linked_image(n, n, "wide" if n == CORRELATION_PLOT else None)
                                          for n in shown) + "</div>"
    if rest:
        out += (f"<details><summary>Dice vs uncertainty of the other {len(rest)} method(s)</summary>"
                '<div class="plots">' + "".join(page.linked_image(n, n) for n in rest) + "</div></details>")
    return out


def _case_card(item: GalleryCase, method: str, case: CaseSlices, thumbs: Mapping[str, str], threshold: float,
               methods: Sequence[str], maps_missing: bool, image_source: ImageSource, fail_below: float) -> str:
    g, i = item.group, item.index
    score, normalized = float(g.score[method][i]), float(g.normalized[method][i])
    is_flagged = None if math.isnan(threshold) else bool(flagged(np.array([score]), threshold)[0])
    image_missing = ("input images not found for this group" if image_source.folder is None
                     else "input image not found" if case.files.image is None else "input image not readable")
    map_missing = (f"no maps: predicted without {MAPS_FLAG}" if maps_missing else
                   f"no {method} map file" if case.files.ood_map is None else "map not readable")
    box = thumbnail_box(case)
    figures = [page.figure(thumbs.get(IMAGE), "input image", f"{item.case} input", image_missing, box),
               page.figure(thumbs.get(REFERENCE), "ground truth", f"{item.case} ground truth", "label not readable",
                           box),
               page.figure(thumbs.get(PREDICTION), "prediction", f"{item.case} prediction",
                           "segmentation not readable", box),
               page.figure(thumbs.get(MAP), f"uncertainty: {method}", f"{item.case} {method} map", map_missing, box)]
    dice = float(g.dice[i])
    pill = ('<span class="pill bad">failed</span>' if dice < fail_below else '<span class="pill good">ok</span>')
    flag = "-" if is_flagged is None else ("flagged" if is_flagged else "not flagged")
    where = "" if case.slice_index is None else \
        (f'<div class="note">axial slice {case.slice_index} of {case.n_slices} (array axis 0; largest disagreement '
         "between prediction and ground truth)</div>")
    notes = "".join(f'<div class="note">{page.esc(n)}</div>' for n in case.notes)
    others = page.table(["method", "score", "normalised"],
                        [[page.esc(m), page.compact(float(g.score[m][i])), page.number(float(g.normalized[m][i]))]
                         for m in methods])
    info = (f"<h3>{page.esc(item.case)} {pill}</h3>"
            f'<div class="note">group <b>{page.esc(g.spec.name)}</b> &middot; Dice <b>{page.number(dice)}</b> &middot; '
            f"{page.esc(method)}: score {page.compact(score)}, normalised {page.number(normalized)}, "
            f"<b>{flag}</b></div>{where}{notes}"
            f"<details><summary>scores of every method</summary>{others}</details>")
    css = "flagged" if dice < fail_below else "ok"
    return f'<div class="card {css}"><div class="thumbs">{"".join(figures)}</div><div class="info">{info}</div></div>'


# ----------------------------------------------------------------------------------------------- the report


def _case_files(item: GalleryCase, method: str, setup: LabelSetup, source: ImageSource, key: str) -> CaseFiles:
    spec, case = item.group.spec, item.case
    return CaseFiles(key, channel0_file(source.folder, case, setup.file_ending),
                     existing(os.path.join(spec.prediction_folder, case + setup.file_ending)),
                     existing(os.path.join(spec.label_folder, case + setup.file_ending)),
                     map_file(spec.prediction_folder, case, method, setup.file_ending), method)


def build_evaluation_report(evaluation: Evaluation, setup: LabelSetup, sources: Mapping[str, ImageSource],
                            plot_names: Sequence[str], max_cases: int = DEFAULT_GALLERY_CASES) \
        -> tuple[str, dict[str, bytes]]:
    """The page (HTML text) and its thumbnails (file name in ``report_files/`` -> PNG bytes)."""
    method, why = gallery_method(evaluation)
    best = best_methods(evaluation)
    silent = silent_failures(evaluation, method) if method else []
    uncertain = most_uncertain(evaluation, method, max_cases) if method else []
    threshold = flag_threshold(evaluation, method) if method else math.nan
    unique: dict[tuple[str, int], GalleryCase] = {}
    for item in silent[:max_cases] + uncertain:
        unique.setdefault((item.group.spec.name, item.index), item)
    slices: dict[tuple[str, int], CaseSlices] = {}
    for k, (key, item) in enumerate(unique.items()):
        files = _case_files(item, method, setup, sources[key[0]], f"{k:04d}_{safe_file_part(item.case)}")
        slices[key] = load_case_slices(files, by_disagreement=True)
    scales = heat_scales(list(slices.values()))
    files_out: dict[str, bytes] = {}
    thumbs: dict[tuple[str, int], dict[str, str]] = {}
    for key, case in slices.items():
        thumbs[key] = {}
        for kind, data in render_case(case, scales, with_reference=True).items():
            files_out[thumbnail_name(case.files.key, kind)] = data
            thumbs[key][kind] = f"{REPORT_FILES}/{thumbnail_name(case.files.key, kind)}"
    maps_missing = bool(slices) and all(c.files.ood_map is None for c in slices.values())
    dataset = read_dataset_json(evaluation.groups[0].spec.prediction_folder) or {}

    def cards(items: Sequence[GalleryCase]) -> str:
        keyed = [((c.group.spec.name, c.index), c) for c in items]
        return '<div class="cards">' + "".join(
            _case_card(c, method, slices[k], thumbs[k], threshold, evaluation.methods, maps_missing,
                       sources[k[0]], evaluation.fail_below) for k, c in keyed) + "</div>"

    parts = ["<h1>OOD evaluation report</h1>",
             f'<div class="meta">{_sources_text(evaluation, sources)}<br>page written '
             f'{datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}</div>',
             '<p class="note"><a href="#headline">headline</a> &middot; <a href="#metrics">metrics</a> &middot; '
             '<a href="#decisions">decisions</a> &middot; '
             '<a href="#plots">plots</a> &middot; <a href="#silent">silent failures</a> &middot; '
             '<a href="#uncertain">most uncertain cases</a></p>']
    parts += [f'<div class="warn">{page.esc(w)}</div>' for w in evaluation.warnings]
    parts += ['<h2 id="headline">Headline</h2>', _headline(evaluation, method),
              '<h2 id="metrics">Metrics</h2>',
              '<p class="note">All shifted domains pooled against the ID test cases; '
              "bold: the best AUROC and the best AURC. Per-domain rows below.</p>",
              _metric_table(evaluation.rows, best, pooled_only=True),
              "<details><summary>every domain</summary>" + _metric_table(evaluation.rows, best, pooled_only=False) +
              "</details>",
              '<h3 id="decisions">Accept/review decisions at prediction time</h3>',
              '<p class="note">What each method\'s own flag in ood_scores.csv did (accepted = not flagged; a case '
              "that could not be scored is never accepted): coverage = share accepted; silent = accepted and failed "
              f"(Dice &lt; {evaluation.fail_below:g}) among all cases; silent (accepted) = the same among the "
              "accepted cases, with its exact one-sided 95% upper bound (Clopper–Pearson). Dice MAE and Dice r: "
              "error and Pearson correlation of the predicted Dice (1 - score) of methods that predict it (bold). "
              "Rows: the ID test cases and all shifted cases; every domain is in the table above.</p>",
              _decision_table(evaluation),
              "<details><summary>notes on the metrics</summary><ul>" +
              "".join(f"<li>{page.esc(n)}</li>" for n in evaluation.notes) + "</ul></details>",
              '<h2 id="plots">Plots</h2>', _plots(plot_names, [method, best["shift"]])]
    scale_text = "; one scale for every case on this page: " + "; ".join(
        f"{page.esc(m)} {page.compact(s.low)} to {page.compact(s.high)}" for m, s in scales.items()) if scales else ""
    gallery_intro = (f'<p class="note">Gallery method: <b>{page.esc(method or "-")}</b>, {page.esc(why)}. Each case: '
                     "the input image (channel 0), the ground truth and the prediction as overlays, and the method's "
                     "uncertainty map as a heat overlay (turbo colour map, blue = low, red = high, transparent at "
                     f"the bottom of the scale{scale_text}).</p>")
    parts += ['<h2 id="silent">Silent failures</h2>', gallery_intro, page.label_legend(foreground_labels(dataset),
                                                                                     LABEL_COLORS)]
    if maps_missing:
        parts.append(f'<div class="warn">No uncertainty maps in the prediction folders: predict with {MAPS_FLAG} '
                     "to see them here.</div>")
    missing_images = [name for name, s in sources.items() if s.folder is None and
                      any(k[0] == name for k in unique)]
    if missing_images:
        parts.append(f'<div class="warn">Input images not found for {page.esc(", ".join(missing_images))}: the '
                     f"thumbnails show the labels without the image. Pass {IMAGES_FLAG} GROUP FOLDER.</div>")
    if method is None or math.isnan(threshold):
        parts.append('<p class="note">No threshold for the gallery method: silent failures cannot be told '
                     "apart.</p>")
    elif not silent:
        parts.append(f'<p class="note">None: every failure (Dice &lt; {evaluation.fail_below:g}) is flagged by '
                     f"{page.esc(method)}.</p>")
    else:
        shown = f"the {max_cases} with the lowest Dice of {len(silent)}" if len(silent) > max_cases else \
            f"all {len(silent)}"
        parts.append(f'<p class="note">Failed (Dice &lt; {evaluation.fail_below:g}) and not flagged by '
                     f"{page.esc(method)}: {shown}, lowest Dice first.</p>" + cards(silent[:max_cases]))
    parts += ['<h2 id="uncertain">Most uncertain cases</h2>',
              f'<p class="note">The {len(uncertain)} case(s) with the highest {page.esc(method or "-")} score (ID '
              "test and shifted domains), highest first.</p>", cards(uncertain)]
    return page.document("OOD evaluation report", "\n".join(parts)), files_out


def _sources_text(evaluation: Evaluation, sources: Mapping[str, ImageSource]) -> str:
    rows = []
    for g in evaluation.groups:
        s = sources.get(g.spec.name, ImageSource(None, "not given"))
        images = f"{s.folder} ({s.origin})" if s.folder else s.origin
        rows.append(f"{page.esc(g.spec.name)}: {len(g.cases)} cases; predictions {page.esc(g.spec.prediction_folder)}"
                    f"; labels {page.esc(g.spec.label_folder)}; images {page.esc(images)}")
    return "<br>".join(rows)


def write_evaluation_report(folder: str, evaluation: Evaluation, setup: LabelSetup,
                            sources: Mapping[str, ImageSource], plot_names: Sequence[str],
                            max_cases: int = DEFAULT_GALLERY_CASES) -> str:
    """Write ``report_files/`` and then ``report.html`` into ``folder`` (next to the plots it shows); returns the
    page's path."""
    html_text, files = build_evaluation_report(evaluation, setup, sources, plot_names, max_cases)
    return write_page(folder, REPORT_HTML, html_text, REPORT_FILES, files)


def check_gallery_size(count: int) -> None:
    """``--report_cases`` must be positive."""
    if count < 1:
        raise OODInputError(f"--report_cases must be at least 1, got {count}")

