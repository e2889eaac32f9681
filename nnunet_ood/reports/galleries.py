"""The galleries of ``report.html``, drawn with one method (:func:`gallery_method`): the silent failures (Dice
below the evaluation's ``fail_below``, not flagged) and the most uncertain cases, each with its input slice,
reference, prediction and that method's uncertainty map (thumbnails in the page's files folder)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nnunet_ood.evaluation.groups import ID_VAL, Evaluation, Group
from nnunet_ood.evaluation.label_setup import LabelSetup
from nnunet_ood.evaluation.outputs import safe_file_part
from nnunet_ood.evaluation.summary import best_methods, flag_threshold, flagged
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
    heat_scales,
    load_case_slices,
    map_file,
    render_case,
    thumbnail_box,
    thumbnail_name,
)
from nnunet_ood.reports.image_sources import IMAGES_FLAG, ImageSource
from nnunet_ood.reports.thumbnails import LABEL_COLORS, HeatScale

MAPS_FLAG = "--save_ood_maps"


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


def _case_files(item: GalleryCase, method: str, setup: LabelSetup, source: ImageSource, key: str) -> CaseFiles:
    spec, case = item.group.spec, item.case
    return CaseFiles(key, channel0_file(source.folder, case, setup.file_ending),
                     existing(os.path.join(spec.prediction_folder, case + setup.file_ending)),
                     existing(os.path.join(spec.label_folder, case + setup.file_ending)),
                     map_file(spec.prediction_folder, case, method, setup.file_ending), method)


@dataclass
class Gallery:
    """The cases of both galleries, with their slices and thumbnails (``files``: file name -> PNG bytes;
    ``thumbs``: per case, thumbnail kind -> path relative to the page)."""

    method: str | None
    why: str  # why this method draws the galleries
    threshold: float  # the method's flag threshold (NaN: none, silent failures cannot be told apart)
    silent: list[GalleryCase]
    uncertain: list[GalleryCase]
    slices: dict[tuple[str, int], CaseSlices]
    thumbs: dict[tuple[str, int], dict[str, str]]
    scales: dict[str, HeatScale]
    files: dict[str, bytes]

    @property
    def maps_missing(self) -> bool:
        """No shown case has a map file: the folders were predicted without maps."""
        return bool(self.slices) and all(c.files.ood_map is None for c in self.slices.values())


def build_gallery(evaluation: Evaluation, setup: LabelSetup, sources: Mapping[str, ImageSource], max_cases: int,
                  files_folder: str) -> Gallery:
    """At most ``max_cases`` silent failures and the ``max_cases`` most uncertain cases, each case's slices read
    once and drawn on one heat scale per method (thumbnails under ``files_folder``)."""
    method, why = gallery_method(evaluation)
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
            thumbs[key][kind] = f"{files_folder}/{thumbnail_name(case.files.key, kind)}"
    return Gallery(method, why, threshold, silent, uncertain, slices, thumbs, scales, files_out)


def _cards(gallery: Gallery, items: Sequence[GalleryCase], evaluation: Evaluation,
           sources: Mapping[str, ImageSource]) -> str:
    keyed = [((c.group.spec.name, c.index), c) for c in items]
    return '<div class="cards">' + "".join(
        _case_card(c, gallery.method, gallery.slices[k], gallery.thumbs[k], gallery.threshold, evaluation.methods,
                   gallery.maps_missing, sources[k[0]], evaluation.fail_below) for k, c in keyed) + "</div>"


def gallery_sections(gallery: Gallery, evaluation: Evaluation, sources: Mapping[str, ImageSource],
                     labels: Mapping[int, str], max_cases: int) -> list[str]:
    """The two galleries of the page with their introduction, legend and warnings (no maps, no images)."""
    method, silent, uncertain = gallery.method, gallery.silent, gallery.uncertain
    scale_text = "; one scale for every case on this page: " + "; ".join(
        f"{page.esc(m)} {page.compact(s.low)} to {page.compact(s.high)}" for m, s in gallery.scales.items()) \
        if gallery.scales else ""
    gallery_intro = (f'<p class="note">Gallery method: <b>{page.esc(method or "-")}</b>, {page.esc(gallery.why)}. '
                     "Each case: the input image (channel 0), the ground truth and the prediction as overlays, and "
                     "the method's uncertainty map as a heat overlay (turbo colour map, blue = low, red = high, "
                     f"transparent at the bottom of the scale{scale_text}).</p>")
    parts = ['<h2 id="silent">Silent failures</h2>', gallery_intro, page.label_legend(dict(labels), LABEL_COLORS)]
    if gallery.maps_missing:
        parts.append(f'<div class="warn">No uncertainty maps in the prediction folders: predict with {MAPS_FLAG} '
                     "to see them here.</div>")
    missing_images = [name for name, s in sources.items() if s.folder is None and
                      any(k[0] == name for k in gallery.slices)]
    if missing_images:
        parts.append(f'<div class="warn">Input images not found for {page.esc(", ".join(missing_images))}: the '
                     f"thumbnails show the labels without the image. Pass {IMAGES_FLAG} GROUP FOLDER.</div>")
    if method is None or math.isnan(gallery.threshold):
        parts.append('<p class="note">No threshold for the gallery method: silent failures cannot be told '
                     "apart.</p>")
    elif not silent:
        parts.append(f'<p class="note">None: every failure (Dice &lt; {evaluation.fail_below:g}) is flagged by '
                     f"{page.esc(method)}.</p>")
    else:
        shown = f"the {max_cases} with the lowest Dice of {len(silent)}" if len(silent) > max_cases else \
            f"all {len(silent)}"
        parts.append(f'<p class="note">Failed (Dice &lt; {evaluation.fail_below:g}) and not flagged by '
                     f"{page.esc(method)}: {shown}, lowest Dice first.</p>"
                     + _cards(gallery, silent[:max_cases], evaluation, sources))
    parts += ['<h2 id="uncertain">Most uncertain cases</h2>',
              f'<p class="note">The {len(uncertain)} case(s) with the highest {page.esc(method or "-")} score (ID '
              "test and shifted domains), highest first.</p>", _cards(gallery, uncertain, evaluation, sources)]
    return parts
