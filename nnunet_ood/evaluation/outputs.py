"""The files of ``nnUNetv2_evaluate_ood``: :func:`render_outputs` builds every table and plot in memory, so that
:func:`write_outputs` only writes (each file atomically)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

from nnunet_ood.errors import OODInputError
from nnunet_ood.evaluation.formatting import (
    CASES_CSV,
    EVALUATION_CSV,
    EVALUATION_MD,
    format_cases_csv,
    format_markdown,
    format_metrics_csv,
)
from nnunet_ood.evaluation.groups import ALL_SHIFTED, ID_VAL, Evaluation
from nnunet_ood.evaluation.risk_coverage import risk_coverage_curves
from nnunet_ood.evaluation.summary import SUMMARY_MD, flag_threshold, flagged, format_summary
from nnunet_ood.io.atomic import atomic_write_bytes
from nnunet_ood.normalization import normalize, usable_bounds

SCORE_PLOT = "score_distributions.png"
CORRELATION_PLOT = "correlation_with_failure.png"
RISK_COVERAGE_PLOT = "risk_coverage.png"


def normalized_threshold(calibration: Mapping[str, Any] | None, threshold: float | None = None) -> float | None:
    """A raw threshold (default: the plugin's, from ``calibration``) on the normalised scale of ``calibration``
    (:func:`nnunet_ood.normalization.normalize`).

    None when the calibration lacks the bounds, the threshold is missing or not finite, or the bounds are not
    :func:`nnunet_ood.normalization.usable_bounds`.
    """
    if not calibration:
        return None
    try:
        low, high = float(calibration["low"]), float(calibration["high"])
        t = float(calibration["threshold"] if threshold is None else threshold)
    except (KeyError, TypeError, ValueError):
        return None
    return normalize(t, low, high) if math.isfinite(t) and usable_bounds(low, high) else None


def safe_file_part(name: str) -> str:
    """``name`` with every character other than letters, digits, ``-``, ``_`` and ``.`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def render_outputs(evaluation: Evaluation) -> dict[str, bytes]:
    """Every output file (tables and plots) as bytes, keyed by file name."""
    # matplotlib only once the plots are rendered: the command line checks its arguments without it
    from nnunet_ood.evaluation.plots import (
        correlation_png,
        dice_vs_uncertainty_png,
        group_color,
        risk_coverage_png,
        score_distributions_png,
    )

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
