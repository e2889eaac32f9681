"""Demo report functions on a tiny hand-made score table with hand-computed expectations."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from nnunet_ood.demo.report import (
    CASE_CSV_COLUMNS,
    format_table,
    plot_dice_vs_uncertainty,
    read_scores_csv,
    summarize,
    write_case_csv,
)

DOMAINS = {"id_0": "id", "id_1": "id", "s_0": "shift_mild", "s_1": "shift_mild", "f_0": "far_ood"}
DICE = {"id_0": 0.9, "id_1": 0.8, "s_0": 0.5, "s_1": 0.7, "f_0": 0.0}
THRESHOLDS = {"A": 0.25}
# (case, method, score, normalized, ood); method B listed with far_ood first to check ordering.
TABLE = [
    ("id_0", "A", "1.0", "0.1", "False"),
    ("id_1", "A", "2.0", "0.2", "False"),
    ("s_0", "A", "3.0", "0.3", "True"),
    ("s_1", "A", "2.0", "0.2", "False"),
    ("f_0", "A", "nan", "nan", "True"),
    ("f_0", "B", "7.0", "0.7", "True"),
    ("id_0", "B", "5.0", "0.5", "False"),
    ("id_1", "B", "5.0", "0.5", "False"),
    ("s_0", "B", "5.0", "0.5", "False"),
    ("s_1", "B", "6.0", "0.6", "True"),
]


@pytest.fixture()
def rows(tmp_path: Path) -> list[dict[str, str]]:
    # Round-trip through a real CSV, as the demo reads the plugin's ood_scores.csv.
    path = tmp_path / "ood_scores.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "method", "score", "normalized", "ood"])
        w.writerows(TABLE)
    return read_scores_csv(path)


def _get(summary: list[dict], method: str, domain: str) -> dict:
    (row,) = [r for r in summary if r["method"] == method and r["domain"] == domain]
    return row


def test_summarize_hand_computed(rows: list[dict[str, str]]) -> None:
    s = summarize(rows, DICE, DOMAINS, THRESHOLDS)
    assert [(r["method"], r["domain"]) for r in s] == [
        ("A", "id"), ("A", "shift_mild"), ("A", "far_ood"),
        ("B", "id"), ("B", "shift_mild"), ("B", "far_ood")]

    a_id, a_s, a_f = (_get(s, "A", d) for d in ("id", "shift_mild", "far_ood"))
    assert (a_id["n"], a_id["n_unscored"]) == (2, 0)
    assert a_id["mean_dice"] == pytest.approx(0.85)
    assert a_id["mean_score"] == pytest.approx(1.5)
    assert a_id["mean_normalized"] == pytest.approx(0.15)
    assert a_id["share_ood"] == 0.0 and math.isnan(a_id["auroc_vs_id"])
    assert a_id["threshold"] == 0.25
    assert a_s["mean_dice"] == pytest.approx(0.6) and a_s["share_ood"] == 0.5
    # neg {1, 2} vs pos {3, 2}: 3>1, 3>2, 2>1, 2=2 (1/2) -> 3.5 / 4
    assert a_s["auroc_vs_id"] == pytest.approx(0.875)
    # far_ood's only case is unscored: no mean score, but a NaN counts as maximally uncertain.
    assert (a_f["n"], a_f["n_unscored"]) == (1, 1)
    assert math.isnan(a_f["mean_score"]) and math.isnan(a_f["mean_normalized"])
    assert a_f["share_ood"] == 1.0 and a_f["auroc_vs_id"] == 1.0
    # Spearman of score (NaN -> +inf) with 1 - Dice over all five cases:
    # score ranks [1, 2.5, 4, 2.5, 5], risk ranks [1, 2, 4, 3, 5] -> 9.5 / sqrt(9.5 * 10)
    expected_rho = 9.5 / np.sqrt(9.5 * 10.0)
    assert all(r["spearman"] == pytest.approx(expected_rho) for r in s if r["method"] == "A")

    b_s, b_f = _get(s, "B", "shift_mild"), _get(s, "B", "far_ood")
    # neg {5, 5} vs pos {5, 6}: two ties (1/2 each) + two wins -> 3 / 4
    assert b_s["auroc_vs_id"] == pytest.approx(0.75)
    assert b_f["auroc_vs_id"] == 1.0
    assert math.isnan(b_s["threshold"])


def test_summarize_missing_dice_and_bad_rows(rows: list[dict[str, str]]) -> None:
    dice = {k: v for k, v in DICE.items() if k != "id_1"}
    s = summarize(rows, dice, DOMAINS)
    a_id = _get(s, "A", "id")
    assert a_id["n"] == 2 and a_id["mean_dice"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="no domain"):
        summarize(rows, DICE, {k: v for k, v in DOMAINS.items() if k != "s_1"})
    with pytest.raises(ValueError, match="duplicate"):
        summarize(rows + rows[:1], DICE, DOMAINS)


def test_format_table(rows: list[dict[str, str]]) -> None:
    text = format_table(summarize(rows, DICE, DOMAINS, THRESHOLDS))
    lines = text.splitlines()
    assert len(lines) == 2 + 6
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert "auroc_vs_id" in lines[0] and "0.875" in text and "shift_mild" in text
    assert "nan" not in text  # NaN renders as "-"
    assert format_table([]) == "(no rows)"


def test_write_case_csv(rows: list[dict[str, str]], tmp_path: Path) -> None:
    out = tmp_path / "sub" / "cases.csv"
    write_case_csv(out, rows, DICE, DOMAINS)
    with open(out, newline="") as f:
        back = list(csv.DictReader(f))
    assert tuple(back[0]) == CASE_CSV_COLUMNS
    assert len(back) == len(TABLE)
    assert [(r["method"], r["case"]) for r in back[:5]] == [
        ("A", "id_0"), ("A", "id_1"), ("A", "s_0"), ("A", "s_1"), ("A", "f_0")]
    s0 = back[2]
    assert (s0["domain"], float(s0["dice"]), float(s0["score"]), float(s0["normalized"]), s0["ood"]) == (
        "shift_mild", 0.5, 3.0, 0.3, "True")
    assert math.isnan(float(back[4]["score"]))
    assert [p.name for p in out.parent.iterdir()] == ["cases.csv"]  # no temp file left


def test_plot_writes_png(rows: list[dict[str, str]], tmp_path: Path) -> None:
    out = tmp_path / "plots" / "dice_vs_A.png"
    plot_dice_vs_uncertainty(out, rows, DICE, DOMAINS, THRESHOLDS, "A")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in out.parent.iterdir()] == ["dice_vs_A.png"]  # no temp file left
    plot_dice_vs_uncertainty(out.parent / "b.png", rows, DICE, DOMAINS, None, "B")  # no threshold
    assert (out.parent / "b.png").exists()
    with pytest.raises(ValueError):
        plot_dice_vs_uncertainty(out.parent / "c.png", rows, DICE, DOMAINS, THRESHOLDS, "missing")
