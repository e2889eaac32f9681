"""End to end on the tiny project: the failure table, the quality method and the accept/review decision.

References: nnU-Net's own validation Dice (``fold_0/validation/summary.json``), the validation pass's scores
(provenance), a brute-force conformal risk control written here, Dice and segmentation properties computed
with numpy from the exported segmentation files.
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_pipeline import OOD_TRAINER, predict_ood
from test_quality_properties import labels_manager, numpy_dice, one_hot_logits

from nnunet_ood.cli import calibrate as calibrate_entry
from nnunet_ood.io.score_reader import read_score_rows
from nnunet_ood.quality.model import QualityModel
from nnunet_ood.quality.properties import segmentation_properties


def ood_dir(tiny_project) -> Path:
    return tiny_project.model(OOD_TRAINER) / "fold_0" / "ood"


def manifest(tiny_project) -> dict:
    return json.loads((ood_dir(tiny_project) / "ood_state.json").read_text())


def failure_rows(tiny_project) -> list[dict]:
    with open(ood_dir(tiny_project) / "quality_calibration.csv") as f:
        return list(csv.DictReader(f))


def brute_force_threshold(risk, dice, fail_below: float, alpha: float, groups) -> float:
    """The largest candidate t with (sum of per-case losses + 1) / (n + 1) <= alpha, by looping; -1 if none."""
    units = sorted(set(groups))
    best = -1.0
    for t in sorted({r for r in risk if math.isfinite(r)}):
        losses = []
        for g in units:
            rows = [i for i, h in enumerate(groups) if h == g]
            losses.append(np.mean([math.isfinite(risk[i]) and risk[i] <= t and dice[i] < fail_below for i in rows]))
        if (sum(losses) + 1) / (len(units) + 1) <= alpha:
            best = max(best, t)
    return best


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_failure_table_rows_match_validation(tiny_project):
    m = manifest(tiny_project)
    rows = failure_rows(tiny_project)
    val_scores = m["provenance"]["val_case_scores"]
    val_cases = sorted(val_scores["mahalanobis"])
    clean = [r for r in rows if r["version"] == "0"]
    assert sorted(r["case"] for r in clean) == val_cases
    config = m["methods"]["quality"]["config"]
    assert len(rows) == len(val_cases) * (1 + config["corruptions_per_case"])
    assert config["table_rows"] == len(rows)  # what makes a table cut at a line end detectable
    for r in clean:  # the clean rows carry the validation pass's scores
        for method in config["inputs"]:
            assert float(r[method]) == pytest.approx(val_scores[method][r["case"]], rel=1e-6)
    # and nnU-Net's own validation Dice (its mirrored prediction, exported and compared in the original space)
    summary = json.loads((ood_dir(tiny_project).parent / "validation" / "summary.json").read_text())
    nnunet_dice = {}
    for entry in summary["metric_per_case"]:
        case = Path(entry["reference_file"]).name.removesuffix(".nii.gz")
        dices = [entry["metrics"][k]["Dice"] for k in ("1", "2")]
        nnunet_dice[case] = np.mean([1.0 if math.isnan(d) else d for d in dices])
    for r in clean:
        assert float(r["dice"]) == pytest.approx(nnunet_dice[r["case"]], abs=1e-6)
    corrupted = [r for r in rows if r["version"] != "0"]
    assert {r["case"] for r in corrupted} == set(val_cases)
    assert all(r["corruption"] != "none" and int(r["severity"]) in (1, 2, 3) for r in corrupted)
    for case in val_cases:  # chained corruptions, never one twice in a case
        chains = [r["corruption"].split("+") for r in corrupted if r["case"] == case]
        assert all(len(c) == config["corruptions_per_version"] for c in chains)
        used = [name for c in chains for name in c]
        assert len(used) == len(set(used))
    assert (ood_dir(tiny_project) / "quality_calibration.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_threshold_is_learn_then_test(tiny_project):
    from test_risk_control import brute_force_ltt

    m = manifest(tiny_project)
    config = m["methods"]["quality"]["config"]
    assert (config["risk_control"], config["confidence"]) == ("ltt", 0.9)  # the default rule
    rows = failure_rows(tiny_project)
    risk = [float(r["oof_risk"]) if r["oof_risk"] else math.nan for r in rows]
    dice = [float(r["dice"]) for r in rows]
    expected, _ = brute_force_ltt(risk, dice, config["fail_below"], config["max_silent_failures"], 0.9)
    assert m["methods"]["quality"]["calibration"]["threshold"] == pytest.approx(expected)
    assert config["risk_threshold"]["rule"] == "ltt" and config["risk_threshold"]["threshold"] == expected
    # the model file is plain JSON and reads back
    model = QualityModel.load(str(ood_dir(tiny_project) / "quality_model.json"))
    assert list(model.feature_names) == config["features"]


def test_prediction_decides_accept_or_review(tiny_project, test_images, tmp_path, capsys):
    out = tmp_path / "out"
    predict_ood(out, test_images)
    printed = capsys.readouterr().out
    rows = read_score_rows(str(out))
    quality = {r["case"]: r for r in rows if r["method"] == "quality"}
    cases = {r["case"] for r in rows}
    assert set(quality) == cases
    threshold = manifest(tiny_project)["methods"]["quality"]["calibration"]["threshold"]
    rules = json.loads((out / "ood_scores.json").read_text())["decision_rules"]
    n_val = sum(r["version"] == "0" for r in failure_rows(tiny_project))
    assert rules["quality"]["gate"]["calibration_cases"] == n_val  # the gate: the fold's clean validation cases
    gate_on = rules["quality"]["gate"]["active"]
    for r in quality.values():
        assert 0 <= r["score"] <= 1
        if not gate_on:  # (the tiny fold has too few validation cases for the gate at 0.05)
            assert r["decision"] == ("accept" if r["score"] <= threshold else "review")
        assert r["ood"] == (r["decision"] == "review")
        if r["decision"] == "review" and r["score"] > threshold >= 0:
            assert r["reason"].startswith(f"predicted Dice {1 - r['score']:.2f} < {1 - threshold:.2f}")
        assert (r["reason"] == "") == (r["decision"] == "accept")
    assert all(r["decision"] == "" and r["reason"] == "" for r in rows if r["method"] != "quality")
    config = manifest(tiny_project)["methods"]["quality"]["config"]
    q = rules["quality"]
    assert (q["fail_below"], q["max_silent_failures"], q["rule"], q["threshold_from"], q["guarantee"]) == \
        (config["fail_below"], config["max_silent_failures"], "ltt", "fit", False)
    accepted = sum(r["decision"] == "accept" for r in quality.values())
    assert f"quality: {accepted} of {len(cases)} cases accepted, {len(cases) - accepted} sent to review" in printed
    assert f"quality: {q['statement']}" in printed  # the closing line says what the decision guarantees

    # the review page of this prediction leads with the same statement; review.csv: reviews first, with reasons
    from nnunet_ood.reports.review import write_review

    write_review(str(test_images), str(out))
    with open(out / "review.csv", newline="") as f:
        review = list(csv.DictReader(f))
    assert sorted(r["case"] for r in review) == sorted(cases)
    assert [(r["decision"], r["reason"]) for r in review] == \
        [(quality[r["case"]]["decision"], quality[r["case"]]["reason"]) for r in review]
    decisions = [r["decision"] for r in review]
    assert decisions == sorted(decisions, key=lambda d: d != "review")  # every review before every accept
    text = (out / "review.html").read_text()
    assert html.escape(q["statement"], quote=True) in text
    assert text.index(html.escape(q["statement"], quote=True)) < text.index('class="card ')

    # the score is the stored model applied to the other scores and the exported segmentation's properties
    m = manifest(tiny_project)["methods"]["quality"]["config"]
    model = QualityModel.load(str(ood_dir(tiny_project) / "quality_model.json"))
    by_method = {(r["case"], r["method"]): r["score"] for r in rows}
    for case in sorted(cases)[:4]:
        seg = read_array(out / f"{case}.nii.gz")
        props = segmentation_properties(one_hot_logits(seg, 3), labels_manager(), m["reference_volumes"])
        values = {**{k: by_method[case, k] for k in m["inputs"]}, **props}
        x = np.array([[values[f] for f in m["features"]]])
        assert quality[case]["score"] == pytest.approx(float(model.predict_risk(x)[0]), abs=1e-6)

    # asking for quality alone computes what it reads, and gives the same scores
    alone = tmp_path / "alone"
    predict_ood(alone, test_images, "--ood", "quality")
    again = {r["case"]: r["score"] for r in read_score_rows(str(alone)) if r["method"] == "quality"}
    assert again == pytest.approx({c: r["score"] for c, r in quality.items()})


def test_site_calibration_with_labels_reselects_the_threshold(tiny_project, test_images, tmp_path, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    for domain in tiny_project.dataset.domains:
        for f in Path(tiny_project.dataset.labels_ts[domain]).iterdir():
            (labels / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "calibration_predictions"
    calibrate_entry.main(["-i", str(test_images), "-o", str(out), "-l", str(labels), "-d", "501", "-c", "2d",
                          "-f", "0", "-tr", OOD_TRAINER, "-device", "cpu", "--name", "labelled",
                          "--max_silent_failures", "0.2", "--fail_below", "0.8", "--risk_control", "crc",
                          "--disable_progress_bar"])
    rows = read_score_rows(str(out))
    risk = {r["case"]: r["score"] for r in rows if r["method"] == "quality"}
    cases = sorted(risk)
    dice = []
    for case in cases:
        seg, ref = read_array(out / f"{case}.nii.gz"), read_array(labels / f"{case}.nii.gz")
        dice.append(np.mean([numpy_dice(seg == c, ref == c) for c in (1, 2)]))
    expected = brute_force_threshold([risk[c] for c in cases], dice, 0.8, 0.2, cases)
    document = json.loads((tiny_project.model(OOD_TRAINER) / "ood_calibrations" / "labelled.json").read_text())
    assert document["calibration"]["quality"]["threshold"] == pytest.approx(expected)
    assert document["labelled"]["quality"]["dice"] == pytest.approx(dict(zip(cases, dice)))
    assert document["labelled"]["quality"]["risk_control"] == "crc"
    printed = capsys.readouterr().out
    assert "quality: Set on 12 labelled cases from your site (conformal risk control)" in printed
    # predicting with it decides with that threshold; the gate uses the calibration's cases
    pred = tmp_path / "pred"
    predict_ood(pred, test_images, "--calibration", "labelled")
    for r in read_score_rows(str(pred)):
        if r["method"] == "quality":
            assert r["decision"] == ("accept" if r["score"] <= expected else "review")
    rules = json.loads((pred / "ood_scores.json").read_text())["decision_rules"]["quality"]
    assert (rules["fail_below"], rules["max_silent_failures"], rules["rule"], rules["threshold_from"],
            rules["guarantee"]) == (0.8, 0.2, "crc", "calibration labelled", True)
    assert rules["gate"]["source"] == "calibration labelled" and rules["gate"]["calibration_cases"] == len(cases)
    # the default rule, Learn then Test, on the same labelled cases
    calibrate_entry.main(["-i", str(test_images), "-o", str(tmp_path / "ltt"), "-l", str(labels), "-d", "501",
                          "-c", "2d", "-f", "0", "-tr", OOD_TRAINER, "-device", "cpu", "--name", "ltt",
                          "--max_silent_failures", "0.2", "--fail_below", "0.8", "--confidence", "0.8",
                          "--risk_control", "ltt", "--disable_progress_bar"])
    from test_risk_control import brute_force_ltt

    document = json.loads((tiny_project.model(OOD_TRAINER) / "ood_calibrations" / "ltt.json").read_text())
    expected_ltt, _ = brute_force_ltt([risk[c] for c in cases], dice, 0.8, 0.2, 0.8)
    assert document["calibration"]["quality"]["threshold"] == pytest.approx(expected_ltt)
    assert document["labelled"]["quality"]["risk_threshold"]["rule"] == "ltt"
    assert "quality: Set on 12 labelled cases from your site" in capsys.readouterr().out


def test_site_calibration_without_labels_keeps_the_fit_threshold(tiny_project, test_images, tmp_path, capsys):
    calibrate_entry.main(["-i", str(test_images), "-d", "501", "-c", "2d", "-f", "0", "-tr", OOD_TRAINER,
                          "-device", "cpu", "--name", "unlabelled", "--disable_progress_bar"])
    assert "quality: keeps the fit's accept/review threshold" in capsys.readouterr().out
    document = json.loads((tiny_project.model(OOD_TRAINER) / "ood_calibrations" / "unlabelled.json").read_text())
    assert "quality" not in document["calibration"] and "mahalanobis" in document["calibration"]


def test_label_folder_must_cover_every_case(tiny_project, test_images, tmp_path, fails_with):
    labels = tmp_path / "labels"
    labels.mkdir()
    fails_with(calibrate_entry.main, ["-i", str(test_images), "-l", str(labels), "-d", "501", "-c", "2d", "-f", "0",
                                      "-tr", OOD_TRAINER, "-device", "cpu", "--name", "x"],
               "has no reference segmentation for")
    fails_with(calibrate_entry.main, ["-i", str(test_images), "-d", "501", "-c", "2d", "-f", "0", "-tr", OOD_TRAINER,
                                      "-device", "cpu", "--name", "x", "--fail_below", "0.7"], "-l LABELS_FOLDER")
    for flags, message in ((["--confidence", "0.9"], "--confidence re-select"),
                           (["--risk_control", "crc"], "-l LABELS"),
                           (["-l", str(labels), "--confidence", "2"], "--confidence must be in")):
        fails_with(calibrate_entry.main, ["-i", str(test_images), "-d", "501", "-c", "2d", "-f", "0", "-tr",
                                          OOD_TRAINER, "-device", "cpu", "--name", "x", *flags], message)


def test_quality_model_needs_no_torch_state(tiny_project):
    """Nothing of the quality method is a tensor file or a pickle: only JSON, CSV and the plot."""
    files = {p.name for p in ood_dir(tiny_project).iterdir() if p.name.startswith("quality")}
    assert files == {"quality_model.json", "quality_calibration.csv", "quality_calibration.png"}
    assert isinstance(json.loads((ood_dir(tiny_project) / "quality_model.json").read_text()), dict)
