"""The parts of ``report.html`` above the galleries: the headline (best method at detecting shifts and at
predicting failures, and what the latter's flag does per group: :mod:`nnunet_ood.evaluation.summary`, the same
numbers as ``ood_summary.md``; for methods that predict the Dice, what their accept/review decision did), the
metric table, the table of the prediction-time decisions and the plots written next to the page (the
risk-coverage curves first)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from nnunet_ood.evaluation.decisions import BOUND_CONFIDENCE, accepted_failures
from nnunet_ood.evaluation.formatting import MARKDOWN_HEADERS
from nnunet_ood.evaluation.groups import ALL_SHIFTED, ID_TEST, ID_VAL, Evaluation
from nnunet_ood.evaluation.metric_rows import DECISION_COLUMNS
from nnunet_ood.evaluation.metrics import failure_rate_upper_bound
from nnunet_ood.evaluation.outputs import CORRELATION_PLOT, RISK_COVERAGE_PLOT, SCORE_PLOT, safe_file_part
from nnunet_ood.evaluation.summary import best_methods, group_rows
from nnunet_ood.reports import page


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


def result_sections(evaluation: Evaluation, method: str | None, plot_names: Sequence[str]) -> list[str]:
    """The headline, the metric tables, the decisions, the notes and the plots (``method``: the galleries' method,
    whose plot comes first)."""
    best = best_methods(evaluation)
    return ['<h2 id="headline">Headline</h2>', _headline(evaluation, method),
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
