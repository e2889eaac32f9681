"""The evaluation summary: best methods and what the best failure predictor's flag does, against hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from nnunet_ood.evaluation.groups import ALL_SHIFTED, DOMAIN, ID_TEST, ID_VAL, Evaluation, Group, GroupSpec
from nnunet_ood.evaluation.metric_rows import compute_metric_rows
from nnunet_ood.evaluation.summary import best_methods, flag_threshold, format_summary, group_rows

# A separates the domains from ID perfectly but ranks failures badly; B ranks failures well.
DICE = {"id_test": [0.95, 0.9, 0.92, 0.97], "id_val": [0.93, 0.96, 0.9, 0.94, 0.95],
        "scanner": [0.85, 0.3, 0.5, 0.8], "artefact": [0.2, 0.9, 0.55]}
SCORES = {
    "A": {"id_test": [1.0, 1.2, 1.1, 0.9], "id_val": [1.0, 1.1, 0.95, 1.05, 1.2],
          "scanner": [5.0, 2.0, 3.0, 6.0], "artefact": [2.5, 9.0, math.nan]},
    "B": {"id_test": [0.1, 0.3, 0.2, 0.05], "id_val": [0.2, 0.1, 0.3, 0.15, 0.25],
          "scanner": [0.2, 0.9, 0.6, 0.25], "artefact": [0.95, 0.1, 0.7]},
}
ROLES = {"id_test": ID_TEST, "id_val": ID_VAL, "scanner": DOMAIN, "artefact": DOMAIN}


def make_evaluation(with_val: bool = True) -> Evaluation:
    groups = []
    for name, role in ROLES.items():
        if role == ID_VAL and not with_val:
            continue
        n = len(DICE[name])
        scores = {m: np.array(SCORES[m][name]) for m in SCORES}
        groups.append(Group(GroupSpec(name, role, "", ""), [f"{name}_{i}" for i in range(n)],
                            np.array(DICE[name]), scores, {m: np.full(n, np.nan) for m in SCORES}))
    rows = compute_metric_rows(groups, list(SCORES), 95.0)
    calibration = {"A": {"low": 0.0, "high": 4.0, "threshold": 1.5}, "B": {"low": 0.0, "high": 1.0, "threshold": 0.5}}
    return Evaluation(groups, list(SCORES), rows, [], [], calibration, 95.0)


def test_best_methods_by_pooled_auroc_and_aurc():
    evaluation = make_evaluation()
    id_scores = {m: SCORES[m]["id_test"] for m in SCORES}
    shifted = {m: SCORES[m]["scanner"] + SCORES[m]["artefact"] for m in SCORES}
    labels = [0] * 4 + [1] * 7
    auroc = {m: roc_auc_score(labels, np.nan_to_num(id_scores[m] + shifted[m], nan=1e9)) for m in SCORES}
    assert auroc["A"] > auroc["B"]
    risk = 1 - np.array(DICE["id_test"] + DICE["scanner"] + DICE["artefact"])

    def aurc(method: str) -> float:
        """Mean over coverages k of the mean risk of the k least uncertain scored cases (no ties here)."""
        scores = np.array(id_scores[method] + shifted[method])
        scored = ~np.isnan(scores)  # the AURC uses scored cases only
        order = np.argsort(scores[scored])
        r = risk[scored][order]
        return float(np.mean([r[:k].mean() for k in range(1, r.size + 1)]))

    assert aurc("B") < aurc("A")
    assert best_methods(evaluation) == {"shift": "A", "failure": "B"}


def test_group_rows_count_flags_caught_and_missed_failures():
    evaluation = make_evaluation()
    threshold = float(np.percentile(SCORES["B"]["id_val"], 95))
    assert flag_threshold(evaluation, "B") == pytest.approx(threshold)
    rows = {r["group"]: r for r in group_rows(evaluation, "B")}
    assert set(rows) == {"id_test", "scanner", "artefact"}  # ID validation cases only set the threshold
    for group in rows:
        dice, scores = np.array(DICE[group]), np.array(SCORES["B"][group])
        flags = np.isnan(scores) | (scores > threshold)
        failed = dice < 0.6
        assert rows[group]["cases"] == len(dice) and rows[group]["mean_dice"] == pytest.approx(dice.mean())
        assert rows[group]["failures"] == failed.sum() and rows[group]["flagged"] == pytest.approx(flags.mean())
        assert rows[group]["caught"] == (flags & failed).sum() and rows[group]["missed"] == (~flags & failed).sum()
    # A NaN score counts as flagged
    assert group_rows(evaluation, "A")[2]["flagged"] == pytest.approx(3 / 3)


def test_without_validation_cases_the_plugins_threshold_is_used():
    evaluation = make_evaluation(with_val=False)
    assert flag_threshold(evaluation, "B") == 0.5
    rows = {r["group"]: r for r in group_rows(evaluation, "B")}
    assert rows["scanner"]["flagged"] == pytest.approx(2 / 4)
    text = format_summary(evaluation)
    assert "Best at detecting shifted cases: **A**" in text and "Best at ranking failures: **B**" in text
    assert "| scanner | 4 | 0.613 | 2 | 50% | 2 | 0 |" in text
    assert ALL_SHIFTED not in {r["group"] for r in group_rows(evaluation, None)}
