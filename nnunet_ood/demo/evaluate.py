"""Score the demo's predictions against its ground truth and write the report (table, CSV, PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from nnunet_ood.demo.report import format_table, plot_dice_vs_uncertainty, summarize, write_case_csv
from nnunet_ood.demo.synthetic import DemoDataset
from nnunet_ood.metrics import dice_per_case
from nnunet_ood.scores_io import CSV_NAME, JSON_NAME, read_score_csv
from nnunet_ood.state import MethodCalibration

TABLE_COLUMNS = ("method", "domain", "n", "mean_dice", "mean_score", "mean_normalized", "share_ood", "auroc_vs_id",
                 "spearman")


def case_dice(data: DemoDataset, predictions: Path) -> dict[str, float]:
    """Mean foreground Dice of every predicted test case (``predictions/<domain>/<case>``) against its reference."""
    labels = [v for v in data.labels.values() if v != 0]
    dice = {}
    for case, domain in data.case_domain.items():
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / domain / f"{case}.nii.gz")))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(data.labels_ts[domain]) / f"{case}.nii.gz")))
        dice[case] = dice_per_case(pred, ref, labels)
    return dice


def evaluate_demo_predictions(data: DemoDataset, predictions: Path, out: Path) -> str:
    """Write ``demo_cases.csv``, ``demo_summary.md`` and one ``dice_vs_<method>.png``; return the table.

    ``predictions`` holds one prediction folder per test domain, as ``nnUNetv2_evaluate_ood`` wants them.
    """
    rows = [dict(r, ood=str(r["ood"])) for domain in data.domains
            for r in read_score_csv(str(predictions / domain / CSV_NAME))]
    metadata = json.loads((predictions / data.domains[0] / JSON_NAME).read_text())
    dice = case_dice(data, predictions)
    thresholds = {}
    for method, values in metadata["calibration"].items():
        calibration = MethodCalibration(**values)
        thresholds[method] = float(calibration.normalize(torch.tensor([calibration.threshold]))[0])
    summary = summarize(rows, dice, data.case_domain, thresholds)
    table = format_table(summary, TABLE_COLUMNS)
    write_case_csv(out / "demo_cases.csv", rows, dice, data.case_domain)
    (out / "demo_summary.md").write_text(
        "# nnunet-ood demo\n\nAUROC: each domain against the ID test cases; spearman: score vs (1 - Dice) "
        "over all cases.\n\n" + table + "\n")
    for method in metadata["methods"]:
        plot_dice_vs_uncertainty(out / f"dice_vs_{method}.png", rows, dice, data.case_domain, thresholds, method)
    mean_id_dice = float(np.mean([d for c, d in dice.items() if data.case_domain[c] == "id"]))
    return table + f"\n\nmean Dice on ID test cases: {mean_id_dice:.3f}; files: demo_cases.csv, demo_summary.md, " \
        + ", ".join(f"dice_vs_{m}.png" for m in metadata["methods"])
