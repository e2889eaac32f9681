"""Demo report: per-domain summary table, tidy per-case CSV and a Dice-vs-uncertainty plot.

Inputs, shared by every function here:

* ``rows``: rows of the plugin's ``ood_scores.csv`` (columns ``case,method,score,normalized,
  ood``), as read by :func:`read_scores_csv` (all strings; ``ood`` is "True"/"False") or
  already typed.
* ``dice``: case -> foreground Dice of the nnU-Net segmentation (cases may be missing).
* ``domains``: case -> domain name (every scored case must have one).
* ``thresholds``: method -> threshold on the normalised score above which a case is OOD.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nnunet_ood.atomic import atomic_write_bytes
from nnunet_ood.metrics import auroc, spearman

ID_DOMAIN = "id"
DOMAIN_ORDER: tuple[str, ...] = ("id", "shift_mild", "shift_strong", "far_ood")
DOMAIN_COLORS: dict[str, str] = {"id": "tab:blue", "shift_mild": "tab:orange",
                                 "shift_strong": "tab:red", "far_ood": "tab:purple"}
CASE_CSV_COLUMNS: tuple[str, ...] = ("case", "domain", "method", "dice", "score", "normalized", "ood")
SUMMARY_COLUMNS: tuple[str, ...] = ("method", "domain", "n", "n_unscored", "mean_dice", "mean_score",
                                    "mean_normalized", "share_ood", "threshold", "auroc_vs_id",
                                    "spearman")


@dataclass(frozen=True)
class _Score:
    case: str
    method: str
    score: float
    normalized: float
    ood: bool


def read_scores_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of an ``ood_scores.csv`` as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _to_bool(v: Any) -> bool:
    if isinstance(v, str):
        if v.strip().lower() in ("true", "1"):
            return True
        if v.strip().lower() in ("false", "0", ""):
            return False
        raise ValueError(f"cannot read {v!r} as a boolean OOD flag")
    return bool(v)


def _to_float(v: Any) -> float:
    # float() reads "nan", "inf" and "" would be a malformed row, so let it raise.
    return float(v)


def _parse(rows: Iterable[Mapping[str, Any]], domains: Mapping[str, str]) -> list[_Score]:
    """Type the CSV rows; reject duplicate (case, method) pairs and cases without a domain."""
    out, seen, missing = [], set(), []
    for r in rows:
        s = _Score(str(r["case"]), str(r["method"]), _to_float(r["score"]),
                   _to_float(r["normalized"]), _to_bool(r["ood"]))
        if (s.case, s.method) in seen:
            raise ValueError(f"duplicate score row for case {s.case!r}, method {s.method!r}")
        seen.add((s.case, s.method))
        if s.case not in domains:
            missing.append(s.case)
        out.append(s)
    if missing:
        raise ValueError(f"{len(missing)} scored case(s) have no domain, e.g. {sorted(missing)[:5]}")
    return out


def _ordered(values: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    """Distinct values: those in ``preferred`` first in that order, the rest by first sight."""
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def _nanmean(x: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN (without a warning) when there are none."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def summarize(rows: Iterable[Mapping[str, Any]], dice: Mapping[str, float], domains: Mapping[str, str],
              thresholds: Mapping[str, float] | None = None,
              id_domain: str = ID_DOMAIN) -> list[dict[str, Any]]:
    """One summary row per (method, domain), with the keys of :data:`SUMMARY_COLUMNS`.

    * ``n``: scored cases; ``n_unscored``: of those, cases whose score is NaN.
    * ``mean_dice``: over cases with a known Dice; ``mean_score``/``mean_normalized``: over
      non-NaN scores; ``share_ood``: share of cases the plugin flagged (its ``ood`` column).
    * ``threshold``: the method's normalised threshold (NaN if not given).
    * ``auroc_vs_id``: AUROC of the raw score, this domain positive vs ``id_domain`` negative
      (NaN for ``id_domain`` itself); NaN scores count as maximally uncertain.
    * ``spearman``: rank correlation of the raw score with 1 - Dice over all domains'
      cases with a known Dice (same value in each of a method's rows); NaN scores are ranked
      as +inf, consistently with the AUROC.
    """
    scores = _parse(rows, domains)
    thresholds = thresholds or {}
    out: list[dict[str, Any]] = []
    for method in _ordered(s.method for s in scores):
        ms = [s for s in scores if s.method == method]
        dom = np.array([domains[s.case] for s in ms])
        sc = np.array([s.score for s in ms], dtype=np.float64)
        nz = np.array([s.normalized for s in ms], dtype=np.float64)
        flag = np.array([s.ood for s in ms], dtype=bool)
        dc = np.array([dice.get(s.case, np.nan) for s in ms], dtype=np.float64)
        rho = spearman(np.where(np.isnan(sc), np.inf, sc), 1.0 - dc)
        id_scores = sc[dom == id_domain]
        for domain in _ordered(dom.tolist(), DOMAIN_ORDER):
            m = dom == domain
            out.append({
                "method": method,
                "domain": domain,
                "n": int(m.sum()),
                "n_unscored": int(np.isnan(sc[m]).sum()),
                "mean_dice": _nanmean(dc[m]),
                "mean_score": _nanmean(sc[m]),
                "mean_normalized": _nanmean(nz[m]),
                "share_ood": float(flag[m].mean()),
                "threshold": float(thresholds.get(method, np.nan)),
                "auroc_vs_id": float("nan") if domain == id_domain else auroc(id_scores, sc[m]),
                "spearman": rho,
            })
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "-"
        # Raw scores can be large (Mahalanobis) or tiny (SD); keep them readable.
        return f"{v:.3f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render summary rows as an aligned Markdown table (readable as plain text too).

    NaN shows as "-". ``columns`` defaults to :data:`SUMMARY_COLUMNS` present in the rows.
    """
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = [c for c in SUMMARY_COLUMNS if c in rows[0]] or list(rows[0])
    cells = [[_fmt(r.get(c, float("nan"))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float, np.number)) and not isinstance(r.get(c), bool)
                   for r in rows) for c in columns]

    def line(vals: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(vals, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                         for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(list(columns)), sep, *(line(r) for r in cells)])


def write_case_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], dice: Mapping[str, float],
                   domains: Mapping[str, str]) -> None:
    """Write a tidy CSV, one line per (case, method), columns :data:`CASE_CSV_COLUMNS`.

    Lines are ordered by method (first appearance), domain (demo order), then case. A missing
    Dice is written as "nan".
    """
    scores = _parse(rows, domains)
    methods = _ordered(s.method for s in scores)
    dom_order = _ordered((domains[s.case] for s in scores), DOMAIN_ORDER)
    scores.sort(key=lambda s: (methods.index(s.method), dom_order.index(domains[s.case]), s.case))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CASE_CSV_COLUMNS)
    for s in scores:
        w.writerow([s.case, domains[s.case], s.method, repr(float(dice.get(s.case, np.nan))),
                    repr(s.score), repr(s.normalized), str(s.ood)])
    atomic_write_bytes(path, buf.getvalue().encode())


def _domain_color(domain: str, order: Sequence[str]) -> str:
    if domain in DOMAIN_COLORS:
        return DOMAIN_COLORS[domain]
    spare = ["tab:green", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
    return spare[[d for d in order if d not in DOMAIN_COLORS].index(domain) % len(spare)]


def plot_dice_vs_uncertainty(path_png: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
                             dice: Mapping[str, float], domains: Mapping[str, str],
                             thresholds: Mapping[str, float] | None, method: str) -> None:
    """Scatter Dice (y) against normalised uncertainty (x) for one method, coloured by domain.

    A dashed vertical line marks the method's normalised threshold (if given). Cases whose
    score is NaN (could not be scored) are drawn as crosses just right of x = 1; cases without
    a Dice are left out. Rendered with the Agg canvas (no pyplot state) and written atomically.
    """
    scores = [s for s in _parse(rows, domains) if s.method == method]
    if not scores:
        raise ValueError(f"no scores for method {method!r}")
    order = _ordered((domains[s.case] for s in scores), DOMAIN_ORDER)
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for domain in order:
        ss = [s for s in scores if domains[s.case] == domain and not np.isnan(dice.get(s.case, np.nan))]
        x = np.array([s.normalized for s in ss], dtype=np.float64)
        y = np.array([dice[s.case] for s in ss], dtype=np.float64)
        color = _domain_color(domain, order)
        ok = ~np.isnan(x)
        ax.scatter(x[ok], y[ok], s=28, alpha=0.8, color=color, label=f"{domain} (n={len(ss)})")
        if (~ok).any():
            ax.scatter(np.full((~ok).sum(), 1.05), y[~ok], s=40, marker="x", color=color)
    t = (thresholds or {}).get(method)
    if t is not None and not np.isnan(t):
        ax.axvline(t, color="black", linestyle="--", linewidth=1, label=f"OOD threshold ({t:.2f})")
    sc = np.array([s.score for s in scores], dtype=np.float64)
    dc = np.array([dice.get(s.case, np.nan) for s in scores], dtype=np.float64)
    rho = spearman(np.where(np.isnan(sc), np.inf, sc), 1.0 - dc)
    ax.set_xlim(-0.03, 1.09)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("normalised uncertainty (x = 1.05: could not be scored)")
    ax.set_ylabel("Dice")
    ax.set_title(f"{method}: Dice vs uncertainty (Spearman with 1-Dice: {_fmt(rho)})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path_png, buf.getvalue())
