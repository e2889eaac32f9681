"""``report.html`` of ``nnUNetv2_evaluate_ood``: the evaluation as one page a person can read.

The headline, the metric and decision tables and the plots (:mod:`nnunet_ood.reports.evaluation_sections`), then
the galleries of silent failures and most uncertain cases (:mod:`nnunet_ood.reports.galleries`), whose input
images each group finds as :mod:`nnunet_ood.reports.image_sources` says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

from nnunet_ood.errors import OODInputError
from nnunet_ood.evaluation.groups import Evaluation
from nnunet_ood.evaluation.label_setup import LabelSetup, read_dataset_json
from nnunet_ood.reports import page
from nnunet_ood.reports.cases import foreground_labels
from nnunet_ood.reports.evaluation_sections import result_sections
from nnunet_ood.reports.galleries import build_gallery, gallery_sections
from nnunet_ood.reports.image_sources import ImageSource
from nnunet_ood.reports.writer import write_page

REPORT_HTML = "report.html"
REPORT_FILES = "report_files"
DEFAULT_GALLERY_CASES = 12


def build_evaluation_report(evaluation: Evaluation, setup: LabelSetup, sources: Mapping[str, ImageSource],
                            plot_names: Sequence[str], max_cases: int = DEFAULT_GALLERY_CASES) \
        -> tuple[str, dict[str, bytes]]:
    """The page (HTML text) and its thumbnails (file name in ``report_files/`` -> PNG bytes)."""
    gallery = build_gallery(evaluation, setup, sources, max_cases, REPORT_FILES)
    dataset = read_dataset_json(evaluation.groups[0].spec.prediction_folder) or {}
    parts = ["<h1>OOD evaluation report</h1>",
             f'<div class="meta">{_sources_text(evaluation, sources)}<br>page written '
             f'{datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}</div>',
             '<p class="note"><a href="#headline">headline</a> &middot; <a href="#metrics">metrics</a> &middot; '
             '<a href="#decisions">decisions</a> &middot; '
             '<a href="#plots">plots</a> &middot; <a href="#silent">silent failures</a> &middot; '
             '<a href="#uncertain">most uncertain cases</a></p>']
    parts += [f'<div class="warn">{page.esc(w)}</div>' for w in evaluation.warnings]
    parts += result_sections(evaluation, gallery.method, plot_names)
    parts += gallery_sections(gallery, evaluation, sources, foreground_labels(dataset), max_cases)
    return page.document("OOD evaluation report", "\n".join(parts)), gallery.files


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

