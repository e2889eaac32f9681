"""Plots of ``nnUNetv2_evaluate_ood``, rendered with the Agg canvas (no pyplot state) to PNG bytes.

The caller writes the bytes atomically, so a plot is never half-written and nothing is written before every
plot rendered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from nnunet_ood.figures import figure_png

if TYPE_CHECKING:
    from nnunet_ood.evaluation.risk_coverage import RiskCoverage

UNSCORED_X = 1.05  # where cases without a score are drawn on the normalised-uncertainty axis
_COLORS = ("tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:green", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan")


def group_color(index: int) -> str:
    """Colour of the ``index``-th group or domain (cycled)."""
    return _COLORS[index % len(_COLORS)]


def _color(name: str, index: int, colors: Mapping[str, str] | None) -> str:
    return (colors or {}).get(name) or group_color(index)


def dice_vs_uncertainty_png(method: str, groups: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]],
                            threshold: float | None, failure_dice: float = 0.6,
                            colors: Mapping[str, str] | None = None) -> bytes:
    """Dice (y) against normalised uncertainty (x) of one method, one colour per group.

    ``groups``: (name, normalised scores, Dice, flagged) per group, ``flagged`` the cases the threshold rejects
    (computed on the raw scores, as the table and the summary do). ``threshold``: that threshold on the
    normalised scale (None: no line and no shaded region). Failures (Dice below ``failure_dice``) that are not
    flagged are silent failures; their region is shaded and counted. Unscored cases are crosses at x = 1.05.
    ``colors``: group name -> colour (default: by position).
    """
    fig = Figure(figsize=(8.8, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    silent = 0
    for i, (name, normalized, dice, flags) in enumerate(groups):
        x, y = np.asarray(normalized, dtype=np.float64), np.asarray(dice, dtype=np.float64)
        scored, color = np.isfinite(x), _color(name, i, colors)
        ax.scatter(x[scored], y[scored], s=28, alpha=0.8, color=color, label=f"{name} (n={x.size})")
        if (~scored).any():
            ax.scatter(np.full(int((~scored).sum()), UNSCORED_X), y[~scored], s=40, marker="x", color=color)
        if threshold is not None and flags is not None:
            silent += int(np.sum(~np.asarray(flags) & (y < failure_dice)))
    ax.axhline(failure_dice, color="gray", linestyle=":", linewidth=1)
    if threshold is not None:
        ax.fill_between([-0.03, threshold], -0.03, failure_dice, color="red", alpha=0.12, linewidth=0,
                        label=f"silent failures (Dice < {failure_dice:g}, accepted; n={silent})")
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold ({threshold:.2f})")
    ax.set_xlim(-0.03, 1.09)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(f"normalised uncertainty (x = {UNSCORED_X}: could not be scored)")
    ax.set_ylabel("Dice")
    ax.set_title(f"{method}: Dice vs uncertainty")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)  # outside: keeps the points visible
    fig.tight_layout()
    return figure_png(fig)


def score_distributions_png(distributions: Mapping[str, Sequence[tuple[str, np.ndarray]]],
                            colors: Mapping[str, str] | None = None) -> bytes:
    """One subplot per method: box plot and points of the normalised scores of every group.

    ``distributions``: method -> [(group name, normalised scores)]. Unscored (NaN) cases are left out and counted
    in the tick label. ``colors``: group name -> colour (default: by position).
    """
    methods = list(distributions)
    ncols = min(3, max(1, len(methods)))
    nrows = max(1, math.ceil(len(methods) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.8 * nrows))
    rng = np.random.default_rng(0)  # fixed jitter: the same input gives the same picture
    for k, method in enumerate(methods):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ticks = []
        for i, (name, values) in enumerate(distributions[method]):
            v = np.asarray(values, dtype=np.float64)
            finite = v[np.isfinite(v)]
            unscored = v.size - finite.size
            ticks.append(name + (f"\n({unscored} unscored)" if unscored else ""))
            if finite.size:
                ax.boxplot([finite], positions=[i], widths=0.5, showfliers=False)
                ax.scatter(i + rng.uniform(-0.15, 0.15, finite.size), finite, s=12, alpha=0.7,
                           color=_color(name, i, colors))
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(ticks, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("normalised score")
        ax.set_title(method)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


def correlation_png(methods: Sequence[str], domains: Sequence[str],
                    rho: Mapping[tuple[str, str], float], colors: Mapping[str, str] | None = None) -> bytes:
    """Grouped bars of Spearman(score, 1 - Dice) per method, one bar per domain row; undefined values read n/a.

    ``rho``: (method, domain) -> Spearman; ``colors``: domain -> colour (default: by position).
    """
    fig = Figure(figsize=(max(6.4, 1.2 * len(methods) * max(1, len(domains)) * 0.6 + 2), 4.8))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(domains))
    for j, domain in enumerate(domains):
        xs = np.arange(len(methods)) + (j - (len(domains) - 1) / 2) * width
        values = np.array([rho.get((m, domain), float("nan")) for m in methods], dtype=np.float64)
        ax.bar(xs, np.nan_to_num(values), width=width, color=_color(domain, j + 1, colors), label=domain)
        for x, v in zip(xs, values):
            if np.isnan(v):
                ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(methods)))
    ax.set_xticklabels(list(methods))
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("Spearman(score, 1 - Dice)")
    ax.set_title("Correlation with segmentation failure (the cases of each table row)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def risk_coverage_png(curves: Sequence[RiskCoverage], oracle: tuple[np.ndarray, np.ndarray] | None,
                      colors: Mapping[str, str] | None = None) -> bytes:
    """Selective risk (mean 1 - Dice of the accepted cases) against coverage, all methods in one figure.

    Each curve is drawn as the step function whose area is its AURC (ties accepted together); methods that
    predict the Dice (``highlighted``) thick and on top, the others thin; the oracle dashed. A dot marks where a
    method's prediction-time decision operates. ``curves`` come in legend order; ``colors``: method -> colour.
    """
    fig = Figure(figsize=(9.6, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    top = 0.0
    for i, c in enumerate(curves):
        color = _color(c.method, i, colors)
        width, z = (3.2, 5) if c.highlighted else (1.3, 3)
        unscored = f", {c.n_unscored} unscored left out" if c.n_unscored else ""
        # r_j holds on (n_{j-1}/n, n_j/n]: "steps-pre" from coverage 0 draws exactly that step function
        x, y = np.r_[0.0, c.coverage], np.r_[c.risk[0], c.risk]
        ax.plot(x, y, drawstyle="steps-pre", color=color, linewidth=width, zorder=z, alpha=1.0 if c.highlighted
                else 0.85, label=f"{c.method} (AURC {c.aurc:.3f}{unscored})")
        top = max(top, float(np.max(c.risk)))
        if c.point is not None and math.isfinite(c.point[1]):
            ax.scatter([c.point[0]], [c.point[1]], s=110 if c.highlighted else 50, color=color, edgecolor="black",
                       linewidth=1.0, zorder=8 if c.highlighted else 7)
    if oracle is not None:
        coverage, risk = oracle
        area = float(np.sum(np.diff(np.r_[0.0, coverage]) * risk))
        ax.plot(np.r_[0.0, coverage], np.r_[risk[0], risk], drawstyle="steps-pre", color="black", linestyle="--",
                linewidth=1.2, zorder=6, label=f"oracle (AURC {area:.3f})")  # on top: visible on a perfect curve
        top = max(top, float(np.max(risk)))
    if any(c.point is not None for c in curves):  # one legend entry explains every dot
        ax.scatter([], [], s=50, color="lightgray", edgecolor="black", label="prediction-time decision (ood flag)")
    ax.set_xlim(0.0, 1.02)
    ax.set_ylim(0.0, min(1.02, max(0.05, 1.1 * top)))
    ax.set_xlabel("coverage (share of cases accepted, least uncertain first)")
    ax.set_ylabel("risk of the accepted cases (mean 1 - Dice)")
    ax.set_title("Risk vs coverage, ID test + shifted cases (area = AURC)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.tight_layout()
    return figure_png(fig)
