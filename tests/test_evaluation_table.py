"""``nnUNetv2_evaluate_ood`` on tiny hand-made prediction/label folders with hand-computed expectations."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from nnunet_ood.cli.evaluate import main
from nnunet_ood.evaluation.groups import ALL_SHIFTED, GroupSpec, build_group_specs
from nnunet_ood.evaluation.label_setup import (
    LabelSetup,
    foreground_from_dataset_labels,
    parse_label_arguments,
    resolve_label_setup,
)
from nnunet_ood.evaluation.metrics import aurc, e_aurc, esce
from nnunet_ood.evaluation.outputs import normalized_threshold
from nnunet_ood.evaluation.pipeline import evaluate
from nnunet_ood.evaluation.score_tables import recorded_fail_below

LABELS = {"background": 0, "liver": 1, "tumor": 2}
ENDING = ".nii.gz"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CALIBRATION = {"A": {"low": 0.0, "high": 10.0, "threshold": 2.4},
               "B": {"low": 0.0, "high": 1.0, "threshold": 0.45},
               "C": {"low": 5.0, "high": 5.0, "threshold": 5.0}}  # degenerate: no threshold line
NAN = float("nan")
# Raw scores per group and method; A's normalised score is score / 10, B's is the score, C is constant.
SCORES = {
    "id_test": {"A": [1.0, 2.0, 1.5, 3.0], "B": [0.2, 0.1, 0.4, 0.3], "C": [5.0] * 4},
    "id_val": {"A": [1.0, 1.2, 2.5, 2.0, 1.8], "B": [0.25, 0.15, 0.35, 0.3, 0.2], "C": [5.0] * 5},
    "scanner": {"A": [2.5, NAN, 4.0, 1.1], "B": [0.5, 0.35, 0.05, 0.6], "C": [5.0] * 4},
    "single": {"A": [5.0], "B": [0.9], "C": [5.0]},
}


def normalize(method: str, score: float) -> float:
    return {"A": score / 10.0, "B": score, "C": 0.5}[method] if not math.isnan(score) else NAN


def make_cases(group: str, n: int, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(prediction, reference) label maps; the first ID test case has no label 2 at all (Dice of label 2 is 1),
    the first scanner case predicts background only (a failure)."""
    cases = {}
    for i in range(n):
        ref = rng.integers(0, 3, size=(6, 7)).astype(np.uint8)
        pred = ref.copy()
        flip = rng.random(ref.shape) < (0.15 if group.startswith("id") else 0.45)
        pred[flip] = rng.integers(0, 3, size=int(flip.sum()))
        if group == "id_test" and i == 0:
            ref[ref == 2], pred[pred == 2] = 1, 1
        if group == "scanner" and i == 0:
            pred[:] = 0
        cases[f"{group}_{i:03d}"] = (pred, ref)
    return cases


def write_label_map(path: Path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def write_group(root: Path, group: str, cases: dict[str, tuple[np.ndarray, np.ndarray]],
                scores: dict[str, list[float]], labels: dict | None = None) -> tuple[Path, Path]:
    """A prediction folder (segmentations, ood_scores.csv/.json, dataset.json) and a label folder."""
    pred_dir, label_dir = root / f"pred_{group}", root / f"labels_{group}"
    pred_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    lines = ["case,method,score,normalized,ood"]
    for i, (case, (pred, ref)) in enumerate(cases.items()):
        write_label_map(pred_dir / f"{case}{ENDING}", pred)
        write_label_map(label_dir / f"{case}{ENDING}", ref)
        for method, values in scores.items():
            s = values[i]
            ood = math.isnan(s) or s > CALIBRATION[method]["threshold"]
            lines.append(f"{case},{method},{s!r},{normalize(method, s)!r},{ood}")
    (pred_dir / "ood_scores.csv").write_text("\n".join(lines) + "\n")
    (pred_dir / "ood_scores.json").write_text(json.dumps({"methods": list(scores), "calibration": CALIBRATION}))
    (pred_dir / "dataset.json").write_text(json.dumps({"labels": labels or LABELS, "file_ending": ENDING}))
    return pred_dir, label_dir


def numpy_dice(pred: np.ndarray, ref: np.ndarray, regions: list[tuple[int, ...]]) -> float:
    """Mean Dice over regions (a label is a one-label region), 1 where a region is empty in both."""
    values = []
    for region in regions:
        p, r = np.isin(pred, region), np.isin(ref, region)
        total = p.sum() + r.sum()
        values.append(1.0 if total == 0 else 2.0 * (p & r).sum() / total)
    return float(np.mean(values))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """Folders of four groups: ID test, ID val, a 4-case domain 'scanner' and a 1-case domain 'single'."""
    root = tmp_path_factory.mktemp("evaluation")
    rng = np.random.default_rng(0)
    sizes = {"id_test": 4, "id_val": 5, "scanner": 4, "single": 1}
    data = {"root": root, "cases": {}, "folders": {}}
    for group, n in sizes.items():
        data["cases"][group] = make_cases(group, n, rng)
        data["folders"][group] = write_group(root, group, data["cases"][group], SCORES[group])
    return data


def group_args(project: dict, root: Path | None = None) -> list[str]:
    def folders(group: str) -> list[str]:
        pred, labels = project["folders"][group]
        if root is not None:
            pred, labels = root / pred.name, root / labels.name
        return [str(pred), str(labels)]

    return ["--id_test", *folders("id_test"), "--id_val", *folders("id_val"),
            "--domain", "scanner", *folders("scanner"), "--domain", "single", *folders("single")]


def expected_dice(project: dict, group: str, regions: list[tuple[int, ...]] = ((1,), (2,))) -> np.ndarray:
    return np.array([numpy_dice(p, r, list(regions)) for p, r in project["cases"][group].values()])


@pytest.fixture(scope="module")
def run_output(project, tmp_path_factory) -> dict:
    """One successful run of the command line; its stdout, stderr and output folder."""
    out = tmp_path_factory.mktemp("out") / "evaluation"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        main([*group_args(project), "-o", str(out)])
    return {"out": out, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def csv_row(rows: list[dict[str, str]], method: str, domain: str) -> dict[str, str]:
    (row,) = [r for r in rows if r["method"] == method and r["domain"] == domain]
    return row


def markdown_row(text: str, method: str, domain: str) -> dict[str, str]:
    header = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| {method} | {domain} |")]
    return dict(zip(header, [c.strip() for c in line.strip("|").split("|")]))


def as_float(cell: str) -> float:
    return NAN if cell == "" else float(cell)


# ------------------------------------------------------------------------------------------- (a) Dice


def test_case_dice_matches_numpy(project, run_output) -> None:
    rows = read_csv(run_output["out"] / "ood_cases.csv")
    assert list(rows[0]) == ["group", "case", "dice", "A_score", "A_normalized", "B_score", "B_normalized",
                             "C_score", "C_normalized"]
    for group in ("id_test", "id_val", "scanner", "single"):
        got = np.array([float(r["dice"]) for r in rows if r["group"] == group])
        np.testing.assert_allclose(got, expected_dice(project, group), rtol=0, atol=1e-12)
    first_id = next(r for r in rows if r["group"] == "id_test")
    assert 0 < float(first_id["dice"]) < 1  # label 2 empty in both counts as 1, label 1 is imperfect
    assert float(next(r for r in rows if r["group"] == "scanner")["dice"]) == 0.0
    unscored = [r for r in rows if r["group"] == "scanner" and r["A_score"] == ""]
    assert len(unscored) == 1 and unscored[0]["A_normalized"] == ""


def test_region_based_dataset_json_and_labels_override(project, tmp_path) -> None:
    regions = {"background": 0, "whole": [1, 2], "tumor": [2]}
    assert foreground_from_dataset_labels(regions) == [(1, 2), (2,)]
    assert foreground_from_dataset_labels(LABELS) == [1, 2]
    assert parse_label_arguments(["1", "1,2"]) == [1, (1, 2)]
    specs = []
    for group, role in (("id_test", "id_test"), ("scanner", "domain")):
        pred, labels = write_group(tmp_path, group, project["cases"][group], SCORES[group], labels=regions)
        specs.append(GroupSpec(group, role, str(pred), str(labels)))
    result = evaluate(specs, LabelSetup(foreground_from_dataset_labels(regions), ENDING))
    np.testing.assert_allclose(result.groups[1].dice, expected_dice(project, "scanner", [(1, 2), (2,)]), atol=1e-12)
    result = evaluate(specs, LabelSetup(parse_label_arguments(["1"]), ENDING))
    np.testing.assert_allclose(result.groups[0].dice, expected_dice(project, "id_test", [(1,)]), atol=1e-12)


# ------------------------------------------------------------------------------------------- (b) metrics


def expected_arrays(project: dict, method: str, domains: list[str]) -> dict[str, np.ndarray]:
    id_score = np.array(SCORES["id_test"][method])
    sh_score = np.concatenate([SCORES[d][method] for d in domains])
    id_dice = expected_dice(project, "id_test")
    sh_dice = np.concatenate([expected_dice(project, d) for d in domains])
    return {"id_score": id_score, "sh_score": sh_score, "id_dice": id_dice, "sh_dice": sh_dice,
            "val_score": np.array(SCORES["id_val"][method])}


@pytest.mark.parametrize("method,domain", [("A", "scanner"), ("B", "scanner"), ("A", ALL_SHIFTED),
                                           ("B", ALL_SHIFTED)])
def test_metric_rows_match_hand_computation(project, run_output, method, domain) -> None:
    domains = ["scanner", "single"] if domain == ALL_SHIFTED else [domain]
    e = expected_arrays(project, method, domains)
    row = {k: as_float(v) if k not in ("method", "domain") else v
           for k, v in csv_row(read_csv(run_output["out"] / "ood_evaluation.csv"), method, domain).items()}

    # AUROC: all cases, an unscored (NaN) case ranks as the most uncertain
    both = np.concatenate([e["id_score"], e["sh_score"]])
    filled = np.where(np.isnan(both), np.nanmax(both) + 1.0, both)
    truth = np.r_[np.zeros(e["id_score"].size), np.ones(e["sh_score"].size)]
    assert row["auroc"] == pytest.approx(roc_auc_score(truth, filled))

    # every other metric: scored cases only
    keep = ~np.isnan(e["sh_score"])
    sh_score, sh_dice = e["sh_score"][keep], e["sh_dice"][keep]
    assert row["n_id"] == 4 and row["n_domain"] == e["sh_score"].size and row["n_unscored"] == (~keep).sum()
    t = np.percentile(e["val_score"], 95)
    # threshold metrics use every case: an unscored (NaN) case is rejected (never "<= t")
    tpr, fpr = np.mean(e["id_score"] <= t), np.mean(e["sh_score"] <= t)
    assert row["threshold"] == pytest.approx(t)
    assert (row["tpr"], row["fpr"]) == (pytest.approx(tpr), pytest.approx(fpr))
    assert row["detection_error"] == pytest.approx(0.5 * (1 - tpr) + 0.5 * fpr)

    score = np.concatenate([e["id_score"], sh_score])
    dice = np.concatenate([e["id_dice"], sh_dice])
    norm = np.array([normalize(method, s) for s in score])
    assert row["spearman"] == pytest.approx(spearmanr(score, 1 - dice).statistic)
    assert row["esce"] == pytest.approx(esce(norm, dice))
    assert row["aurc"] == pytest.approx(aurc(score, 1 - dice))
    assert row["e_aurc"] == pytest.approx(e_aurc(score, 1 - dice))
    assert row["mean_dice"] == pytest.approx(e["sh_dice"].mean())

    md = markdown_row((run_output["out"] / "ood_evaluation.md").read_text(), method, domain)
    assert md["AUROC"] == f"{row['auroc']:.3f}" and md["Spearman"] == f"{row['spearman']:.3f}"
    assert md["n_unscored"] == str(int(row["n_unscored"]))


def test_aurc_against_definition_without_ties(project, run_output) -> None:
    e = expected_arrays(project, "B", ["scanner"])
    score, risk = np.concatenate([e["id_score"], e["sh_score"]]), 1 - np.concatenate([e["id_dice"], e["sh_dice"]])
    sorted_risk = risk[np.argsort(score)]
    by_definition = np.mean([sorted_risk[:k].mean() for k in range(1, risk.size + 1)])
    row = csv_row(read_csv(run_output["out"] / "ood_evaluation.csv"), "B", "scanner")
    assert float(row["aurc"]) == pytest.approx(by_definition)


def test_constant_scores_keep_auroc_half_and_spearman_undefined(run_output) -> None:
    row = csv_row(read_csv(run_output["out"] / "ood_evaluation.csv"), "C", "scanner")
    assert float(row["auroc"]) == 0.5 and row["spearman"] == ""
    text = (run_output["out"] / "ood_evaluation.md").read_text()
    assert markdown_row(text, "C", "scanner")["Spearman"] == "-"
    assert "C: all scores of the ID test and shifted cases are equal" in text


# ------------------------------------------------------------------------------------------- (e) one case


def test_domain_with_one_case_is_undefined_not_invented(project, run_output) -> None:
    row = csv_row(read_csv(run_output["out"] / "ood_evaluation.csv"), "A", "single")
    for metric in ("auroc", "fpr", "tpr", "detection_error", "esce", "spearman", "aurc", "e_aurc"):
        assert row[metric] == "", metric
    assert row["n_domain"] == "1"
    assert float(row["mean_dice"]) == pytest.approx(expected_dice(project, "single")[0])
    text = (run_output["out"] / "ood_evaluation.md").read_text()
    md = markdown_row(text, "A", "single")
    assert [md[c] for c in ("AUROC", "FPR", "TPR", "det. error", "ESCE", "Spearman", "AURC", "e-AURC")] == ["-"] * 8
    assert "single has only 1 case(s)" in text


def test_without_id_val_threshold_metrics_are_undefined(project) -> None:
    specs = [GroupSpec("id_test", "id_test", *map(str, project["folders"]["id_test"])),
             GroupSpec("scanner", "domain", *map(str, project["folders"]["scanner"]))]
    result = evaluate(specs, LabelSetup([1, 2], ENDING))
    for row in result.rows:
        assert all(math.isnan(row[k]) for k in ("threshold", "fpr", "tpr", "detection_error"))
        assert math.isnan(row["auroc"]) == (row["domain"] == "id_test")  # the ID row has no positives
    assert any("No --id_val" in n for n in result.notes)


# ------------------------------------------------------------------------------------------- (d) outputs


def test_outputs_and_plots_are_written(run_output) -> None:
    out = run_output["out"]
    for name in ("dice_vs_uncertainty_A.png", "dice_vs_uncertainty_B.png", "dice_vs_uncertainty_C.png",
                 "score_distributions.png", "correlation_with_failure.png", "risk_coverage.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, name
    rows = read_csv(out / "ood_evaluation.csv")
    assert [(r["method"], r["domain"]) for r in rows] == [
        (m, d) for m in "ABC" for d in ("id_test", "scanner", "single", ALL_SHIFTED)]
    assert "| method | domain |" in run_output["stdout"] and "Notes:" in run_output["stdout"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert run_output["stderr"] == ""


def test_plots_use_the_tables_threshold(project, tmp_path, monkeypatch) -> None:
    """The threshold line and the silent-failure count of the plots are the table's (ID validation percentile)."""
    import nnunet_ood.evaluation.plots as plots
    from nnunet_ood.evaluation.groups import build_group_specs
    from nnunet_ood.evaluation.label_setup import resolve_label_setup
    from nnunet_ood.evaluation.outputs import render_outputs

    captured = {}
    original = plots.dice_vs_uncertainty_png

    def capture(method, groups, threshold, *args, **kwargs):
        captured[method] = (threshold, groups)
        return original(method, groups, threshold, *args, **kwargs)

    monkeypatch.setattr(plots, "dice_vs_uncertainty_png", capture)
    specs = build_group_specs(*(project["folders"][g] for g in ("id_test", "id_val")),
                              [("scanner", *map(str, project["folders"]["scanner"])),
                               ("single", *map(str, project["folders"]["single"]))])
    evaluation = evaluate(specs, resolve_label_setup(specs, None, None))
    render_outputs(evaluation)
    t = float(np.percentile(SCORES["id_val"]["A"], 95))  # the table's threshold, not the plugin's 2.4
    threshold, groups = captured["A"]
    assert threshold == pytest.approx(t / 10.0)  # A's normalised score is score / 10
    scanner = next(g for g in groups if g[0] == "scanner")
    expected = np.array([math.isnan(s) or s > t for s in SCORES["scanner"]["A"]])
    np.testing.assert_array_equal(scanner[3], expected)


def test_normalized_threshold_from_calibration() -> None:
    assert normalized_threshold(CALIBRATION["A"]) == pytest.approx(0.24)
    assert normalized_threshold({"low": 0.0, "high": 1.0, "threshold": 3.0}) == 1.0
    # degenerate bounds (high == low) normalise as a step: a threshold at the bound sits at 0
    assert normalized_threshold(CALIBRATION["C"]) == 0.0
    assert normalized_threshold({"threshold": 1.0}) is None


# ------------------------------------------------------------------------------------------- (c) bad input


@pytest.fixture()
def broken(project, tmp_path) -> Path:
    """A private copy of the project's folders that a test may break."""
    for pred, labels in project["folders"].values():
        shutil.copytree(pred, tmp_path / pred.name)
        shutil.copytree(labels, tmp_path / labels.name)
    return tmp_path


def evaluation_fails(fails_with, argv: list[str], out: Path, *needles: str) -> str:
    message = fails_with(main, argv, *needles)
    assert not out.exists() or not any(out.iterdir()), "nothing may be written on error"
    return message


def test_case_without_segmentation(project, broken, fails_with) -> None:
    (broken / "pred_scanner" / f"scanner_001{ENDING}").unlink()
    out = broken / "out"
    evaluation_fails(fails_with, [*group_args(project, broken), "-o", str(out)], out, "scanner_001", "pred_scanner",
               "nnUNetv2_predict_ood")


def test_case_without_reference(project, broken, fails_with) -> None:
    (broken / "labels_id_val" / f"id_val_002{ENDING}").unlink()
    out = broken / "out"
    evaluation_fails(fails_with, [*group_args(project, broken), "-o", str(out)], out, "id_val_002", "labels_id_val")


def test_reference_folder_with_none_of_the_cases(project, broken, fails_with) -> None:
    argv = group_args(project, broken)
    argv[argv.index(str(broken / "labels_scanner"))] = str(broken / "labels_id_test")
    out = broken / "out"
    evaluation_fails(fails_with, [*argv, "-o", str(out)], out, "contains none", "scanner_000", "labels_id_test")


def test_missing_score_csv(project, broken, fails_with) -> None:
    (broken / "pred_single" / "ood_scores.csv").unlink()
    out = broken / "out"
    evaluation_fails(fails_with, [*group_args(project, broken), "-o", str(out)], out, "ood_scores.csv", "pred_single",
               "nnUNetv2_predict_ood")


def test_requested_method_missing_in_a_folder(project, broken, fails_with) -> None:
    csv_path = broken / "pred_scanner" / "ood_scores.csv"
    csv_path.write_text("".join(ln for ln in csv_path.read_text().splitlines(True) if ",B," not in ln))
    out = broken / "out"
    evaluation_fails(fails_with, [*group_args(project, broken), "-o", str(out), "--methods", "A", "B"], out,
                     "B", "pred_scanner", "--methods")


def test_method_missing_in_a_folder_is_dropped_with_a_warning(project, broken, capsys) -> None:
    csv_path = broken / "pred_scanner" / "ood_scores.csv"
    csv_path.write_text("".join(ln for ln in csv_path.read_text().splitlines(True) if ",B," not in ln))
    out = broken / "out"
    main([*group_args(project, broken), "-o", str(out), "--methods", "A"])  # requested subset: fine, no warning
    assert "warning" not in capsys.readouterr().err
    main([*group_args(project, broken), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "B" in err[0], err
    assert {r["method"] for r in read_csv(out / "ood_evaluation.csv")} == {"A", "C"}


def test_folders_of_different_models_give_a_warning(project, broken, capsys) -> None:
    for group, model in (("id_test", "/m/A"), ("id_val", "/m/A"), ("scanner", "/m/B"), ("single", "/m/A")):
        path = broken / f"pred_{group}" / "ood_scores.json"
        document = json.loads(path.read_text())
        document.update(model_folder=model, folds=["0"], checkpoint="checkpoint_final.pth")
        path.write_text(json.dumps(document))
    out = broken / "out"
    main([*group_args(project, broken), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "different model folders" in err[0], err
    assert "scanner: /m/B" in err[0] and "not comparable" in err[0]


def test_same_prediction_folder_twice(project, broken, fails_with) -> None:
    argv = group_args(project, broken)
    argv[argv.index(str(broken / "pred_single"))] = str(broken / "pred_scanner")
    out = broken / "out"
    evaluation_fails(fails_with, [*argv, "-o", str(out)], out, "pred_scanner", "own folder")


def test_no_dataset_json_needs_labels_and_file_ending(project, broken, fails_with) -> None:
    for group in project["folders"]:
        (broken / f"pred_{group}" / "dataset.json").unlink()
    out = broken / "out"
    evaluation_fails(fails_with, [*group_args(project, broken), "-o", str(out)], out, "dataset.json", "--labels")
    main([*group_args(project, broken), "-o", str(out), "--labels", "1", "2", "--file_ending", ENDING,
          "--methods", "B"])
    assert (out / "ood_evaluation.csv").is_file()


def test_uncalibrated_method_keeps_rank_metrics_and_leaves_esce_undefined(project, run_output, tmp_path) -> None:
    # fold-ensemble scores have no calibration: normalized is NaN but the raw scores rank cases
    for group in ("id_test", "id_val", "scanner", "single"):
        for folder in project["folders"][group]:
            shutil.copytree(folder, tmp_path / folder.name)
        csv_path = tmp_path / project["folders"][group][0].name / "ood_scores.csv"
        lines = csv_path.read_text().splitlines()
        rewritten = [lines[0]] + [",".join(p[:3] + ["nan"] + p[4:]) if p[1] == "B" else line
                                  for line, p in ((line, line.split(",")) for line in lines[1:])]
        csv_path.write_text("\n".join(rewritten) + "\n")
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        main([*group_args(project, tmp_path), "-o", str(out)])
    before = csv_row(read_csv(run_output["out"] / "ood_evaluation.csv"), "B", "scanner")
    after = csv_row(read_csv(out / "ood_evaluation.csv"), "B", "scanner")
    assert after["esce"] == "" and before["esce"] != ""
    for metric in ("auroc", "spearman", "aurc", "e_aurc", "fpr", "tpr"):
        assert as_float(after[metric]) == pytest.approx(as_float(before[metric]))


# ------------------------------------------------------------------------------------------- (f) decisions

# "quality" is the registry's method that predicts the Dice (score = predicted risk 1 - Dice); "A" is an ordinary
# calibrated method; "E" has no calibration (a fold ensemble): its ood flags are False everywhere and no decision.
Q_SIZES = {"id_test": 6, "id_val": 5, "shiftA": 5, "shiftB": 4}
Q_CALIBRATION = {"quality": {"low": 0.0, "high": 1.0, "threshold": 0.3},
                 "A": {"low": 0.0, "high": 10.0, "threshold": 5.0},
                 "E": {"low": None, "high": None, "threshold": None}}
Q_RECORDED_FAIL_BELOW = 0.7  # what the quality method was fitted for, as its score document records it
Q_RISK = 0.25  # quality's max_silent_failures in decision_rules: the alpha of coverage at risk (not the default 0.1)


@pytest.fixture(scope="module")
def quality_project(tmp_path_factory) -> dict:
    """Folders with a decision column. Shifted cases 0 and 2 lose a band of their prediction (failures);
    quality misses the failure shiftB_000 (a silent failure by construction); shiftA_001's quality score is NaN
    but written as not flagged (a NaN must count as review whatever the flag says)."""
    root = tmp_path_factory.mktemp("quality")
    rng = np.random.default_rng(3)
    data: dict = {"root": root, "dice": {}, "scores": {}, "flags": {}, "folders": {}}
    for group, n in Q_SIZES.items():
        cases = make_cases(group, n, rng)
        if group.startswith("shift"):
            for i in (0, 2):
                list(cases.values())[i][0][:, :4] = 0
        dice = [numpy_dice(p, r, [(1,), (2,)]) for p, r in cases.values()]
        pred_dir, label_dir = root / f"pred_{group}", root / f"labels_{group}"
        pred_dir.mkdir()
        label_dir.mkdir()
        scores: dict[str, list[float]] = {"quality": [], "A": [], "E": []}
        flags: dict[str, list[bool]] = {"quality": [], "A": [], "E": []}
        lines = ["case,method,score,normalized,ood,decision"]
        for i, (case, (pred, ref)) in enumerate(cases.items()):
            write_label_map(pred_dir / f"{case}{ENDING}", pred)
            write_label_map(label_dir / f"{case}{ENDING}", ref)
            risk = float(np.clip(1.0 - dice[i] + rng.normal(0.0, 0.12), 0.0, 1.0))
            if group == "shiftA" and i == 1:
                risk = NAN
            if group == "shiftB" and i == 0:
                risk = 0.05
            values = {"quality": (risk, risk, not risk <= 0.3 and not (group == "shiftA" and i == 1)),
                      "A": (a := float(rng.uniform(0, 10)), a / 10.0, a > 5.0),
                      "E": (float(rng.uniform(0, 1)), NAN, False)}
            for method, (score, normalized, ood) in values.items():
                decision = ("review" if ood else "accept") if method == "quality" else ""
                lines.append(f"{case},{method},{score!r},{normalized!r},{ood},{decision}")
                scores[method].append(score)
                flags[method].append(ood)
        (pred_dir / "ood_scores.csv").write_text("\n".join(lines) + "\n")
        document = {"calibration": Q_CALIBRATION,
                    "method_config": {"quality": {"fail_below": Q_RECORDED_FAIL_BELOW, "max_silent_failures": 0.1}},
                    "decision_rules": {"quality": {"rule": "ltt", "fail_below": Q_RECORDED_FAIL_BELOW,
                                                   "max_silent_failures": Q_RISK, "threshold": 0.3,
                                                   "statement": f"Statement of {group}: at most 25% & no more."}}}
        (pred_dir / "ood_scores.json").write_text(json.dumps(document))
        (pred_dir / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ENDING}))
        data["dice"][group], data["scores"][group], data["flags"][group] = np.array(dice), scores, flags
        data["folders"][group] = (pred_dir, label_dir)
    return data


def quality_args(project: dict) -> list[str]:
    f = project["folders"]
    return ["--id_test", *map(str, f["id_test"]), "--id_val", *map(str, f["id_val"]),
            "--domain", "shiftA", *map(str, f["shiftA"]), "--domain", "shiftB", *map(str, f["shiftB"])]


@pytest.fixture(scope="module")
def quality_runs(quality_project, tmp_path_factory) -> dict[float, Path]:
    """Output folders of the command line with the default --fail_below and with --fail_below 0.8."""
    runs = {}
    for fail_below in (0.6, 0.8):
        out = tmp_path_factory.mktemp("quality_out") / "evaluation"
        extra = [] if fail_below == 0.6 else ["--fail_below", "0.8"]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main([*quality_args(quality_project), "-o", str(out), *extra])
        runs[fail_below] = out
    return runs


def brute_decisions(project: dict, method: str, groups: list[str], fail_below: float) -> dict[str, float]:
    """Coverage and silent rates by counting: accepted = not flagged and a finite score."""
    n = accepted = silent = 0
    for group in groups:
        for score, flag, dice in zip(project["scores"][group][method], project["flags"][group][method],
                                     project["dice"][group]):
            n += 1
            ok = (not flag) and not math.isnan(score)
            accepted += ok
            silent += ok and dice < fail_below
    return {"coverage": accepted / n, "silent_rate": silent / n,
            "silent_rate_accepted": silent / accepted if accepted else NAN}


ROW_GROUPS = {"id_test": ["id_test"], "shiftA": ["shiftA"], "shiftB": ["shiftB"], ALL_SHIFTED: ["shiftA", "shiftB"]}


@pytest.mark.parametrize("fail_below", [0.6, 0.8])
@pytest.mark.parametrize("domain", list(ROW_GROUPS))
def test_decision_columns_match_counts(quality_project, quality_runs, fail_below, domain) -> None:
    rows = read_csv(quality_runs[fail_below] / "ood_evaluation.csv")
    for method in ("quality", "A"):
        row = csv_row(rows, method, domain)
        expected = brute_decisions(quality_project, method, ROW_GROUPS[domain], fail_below)
        for column, value in expected.items():
            assert as_float(row[column]) == pytest.approx(value, nan_ok=True), (method, column)
    # no calibrated threshold: its flags are no decision
    assert all(csv_row(rows, "E", domain)[c] == "" for c in ("coverage", "silent_rate", "silent_rate_accepted"))


def brute_coverage_at_risk(score: np.ndarray, failed: np.ndarray, alpha: float) -> float:
    """Every threshold (each distinct finite score, accept score <= t): the largest coverage with at most alpha of
    the accepted failing; 0 when none qualifies."""
    best = 0.0
    for t in np.unique(score[~np.isnan(score)]):
        accepted = score <= t
        if failed[accepted].mean() <= alpha:
            best = max(best, accepted.mean())
    return float(best)


@pytest.mark.parametrize("domain", list(ROW_GROUPS))
def test_upper_bound_and_coverage_at_risk_columns(quality_project, quality_runs, domain) -> None:
    from scipy.stats import binomtest

    for fail_below, out in quality_runs.items():
        rows = read_csv(out / "ood_evaluation.csv")
        dice = np.concatenate([quality_project["dice"][g] for g in ROW_GROUPS[domain]])
        for method in ("quality", "A", "E"):
            score = np.concatenate([quality_project["scores"][g][method] for g in ROW_GROUPS[domain]])
            flags = np.concatenate([quality_project["flags"][g][method] for g in ROW_GROUPS[domain]])
            row = csv_row(rows, method, domain)
            expected = brute_coverage_at_risk(score, dice < fail_below, Q_RISK)
            assert float(row["coverage_at_risk"]) == pytest.approx(expected), (method, domain, fail_below)
            if method == "E":  # no decision: no bound, but a ranking measure all the same
                assert row["silent_rate_accepted_upper"] == ""
                continue
            accepted = ~flags & ~np.isnan(score)
            k, n = int(np.sum(accepted & (dice < fail_below))), int(accepted.sum())
            upper = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").high  # one-sided 95%
            assert float(row["silent_rate_accepted_upper"]) == pytest.approx(upper), (method, domain)
            assert float(row["silent_rate_accepted_upper"]) >= float(row["silent_rate_accepted"])
    text = (quality_runs[0.6] / "ood_evaluation.md").read_text()
    assert "| coverage at risk α |" in text and "| silent (accepted) 95% upper |" in text
    assert f"α = {Q_RISK:g} of the accepted failing" in text and "max_silent_failures of quality" in text


def test_summary_accept_or_review_has_the_bound_and_coverage_at_risk(quality_runs) -> None:
    out = quality_runs[0.6]
    rows = {r["method"]: r for r in read_csv(out / "ood_evaluation.csv") if r["domain"] == ALL_SHIFTED}
    summary = (out / "ood_summary.md").read_text()
    header = next(ln for ln in summary.splitlines() if ln.startswith("| method | AURC"))
    assert header.split("|")[-3:-1] == [" failed among accepted, all shifted (95% upper) ",
                                       f" coverage at risk {Q_RISK:g}, all shifted "]
    for method in ("quality", "A"):
        name = f"**{method}**" if method == "quality" else method
        (line,) = [ln for ln in summary.splitlines() if ln.startswith(f"| {name} |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        r = rows[method]
        assert cells[-2] == f"{float(r['silent_rate_accepted']):.0%} (<= {float(r['silent_rate_accepted_upper']):.0%})"
        assert cells[-1] == f"{float(r['coverage_at_risk']):.0%}"


def test_risk_level_from_decision_rules() -> None:
    from nnunet_ood.evaluation.decisions import DEFAULT_RISK, risk_level

    assert risk_level([{}, {"quality": {"max_silent_failures": 0.05}}], ["quality"])[0] == 0.05
    alpha, note = risk_level([{"quality": {"max_silent_failures": 0.2}}, {"quality": {"max_silent_failures": 0.05}}],
                             ["quality"])
    assert alpha == 0.2 and "different values (0.2, 0.05)" in note
    assert risk_level([{"quality": {"max_silent_failures": 0.2}}], [])[0] == DEFAULT_RISK  # not a deciding method
    assert risk_level([{"quality": "broken"}, {}], ["quality"]) == (DEFAULT_RISK, risk_level([], ["quality"])[1])


@pytest.mark.parametrize("domain", list(ROW_GROUPS))
def test_predicted_dice_errors_match_numpy(quality_project, quality_runs, domain) -> None:
    rows = read_csv(quality_runs[0.6] / "ood_evaluation.csv")
    score = np.concatenate([quality_project["scores"][g]["quality"] for g in ROW_GROUPS[domain]])
    dice = np.concatenate([quality_project["dice"][g] for g in ROW_GROUPS[domain]])
    keep = ~np.isnan(score)
    predicted, true = 1.0 - score[keep], dice[keep]
    row = csv_row(rows, "quality", domain)
    assert float(row["dice_mae"]) == pytest.approx(np.mean(np.abs(predicted - true)))
    assert float(row["dice_pearson"]) == pytest.approx(np.corrcoef(predicted, true)[0, 1])
    for method in ("A", "E"):  # their scores are no predicted risk
        assert csv_row(rows, method, domain)["dice_mae"] == "" and csv_row(rows, method, domain)["dice_pearson"] == ""


def test_nan_score_counts_as_review(quality_project, quality_runs) -> None:
    # shiftA_001: NaN score written with ood False; it is in the denominator but never accepted
    row = csv_row(read_csv(quality_runs[0.6] / "ood_evaluation.csv"), "quality", "shiftA")
    flags = quality_project["flags"]["shiftA"]["quality"]
    assert math.isnan(quality_project["scores"]["shiftA"]["quality"][1]) and not flags[1]
    written_accepts = sum(not f for f in flags)
    assert float(row["coverage"]) == pytest.approx((written_accepts - 1) / Q_SIZES["shiftA"])


def test_fail_below_changes_every_failure_count(quality_project, quality_runs) -> None:
    low = csv_row(read_csv(quality_runs[0.6] / "ood_evaluation.csv"), "quality", ALL_SHIFTED)
    high = csv_row(read_csv(quality_runs[0.8] / "ood_evaluation.csv"), "quality", ALL_SHIFTED)
    assert 0 < float(low["silent_rate"]) < float(high["silent_rate"])  # some accepted Dice below 0.6, more below 0.8
    assert high["coverage"] == low["coverage"] and high["aurc"] == low["aurc"]  # the decision is the prediction's
    for fail_below, out in quality_runs.items():  # the summary's failure counts follow the flag too
        summary = (out / "ood_summary.md").read_text()
        assert f"Dice < {fail_below:g}" in summary
        for group in ("id_test", "shiftA", "shiftB"):
            failures = int(np.sum(quality_project["dice"][group] < fail_below))
            (line,) = [ln for ln in summary.splitlines() if ln.startswith(f"| {group} |")]
            assert line.split("|")[4].strip() == str(failures)


def test_recorded_fail_below_mismatch_is_a_note(quality_project, quality_runs) -> None:
    for out in quality_runs.values():  # 0.6 and 0.8 both differ from the recorded 0.7
        text = (out / "ood_evaluation.md").read_text()
        (note,) = [ln for ln in text.splitlines() if "was fitted to keep failures" in ln]  # one note, not per folder
        assert note.startswith("- quality was fitted to keep failures at Dice < 0.7 rare")
        assert "--fail_below 0.7" in note
    f = quality_project["folders"]
    specs = build_group_specs(f["id_test"], f["id_val"], [("shiftA", *f["shiftA"]), ("shiftB", *f["shiftB"])])
    matching = evaluate(specs, resolve_label_setup(specs, None, None), fail_below=Q_RECORDED_FAIL_BELOW)
    assert not [n for n in matching.notes if "was fitted to keep failures" in n]

    assert recorded_fail_below({"quality": {"fail_below": 0.65}}, "quality") == [0.65]
    assert recorded_fail_below({"quality": {"risk_threshold": {"fail_below": 0.65}}, "fail_below": 0.5},
                               "quality") == [0.65]
    per_fold = {"calibration_per_fold": {"0": {"quality": {"fail_below": 0.5}}, "1": {"quality": {"fail_below": 0.6}}}}
    assert recorded_fail_below(per_fold, "quality") == [0.5, 0.6]
    assert recorded_fail_below({"scores": [{"quality": {"fail_below": 0.5}}], "A": {"fail_below": 0.5}},
                               "quality") == []


def test_decision_column_is_optional(quality_project, tmp_path) -> None:
    from nnunet_ood.evaluation.score_tables import load_score_table

    folder = quality_project["folders"]["shiftA"][0]
    with_decision = load_score_table(str(folder))
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    lines = (old / "ood_scores.csv").read_text().splitlines()
    (old / "ood_scores.csv").write_text("\n".join(ln.rsplit(",", 1)[0] for ln in lines) + "\n")
    assert (old / "ood_scores.csv").read_text().splitlines()[0] == "case,method,score,normalized,ood"
    without = load_score_table(str(old))
    assert without.flagged == with_decision.flagged
    assert without.flagged["quality"]["shiftA_000"] == quality_project["flags"]["shiftA"]["quality"][0]
    np.testing.assert_array_equal([without.score["A"][c] for c in without.cases],
                                  quality_project["scores"]["shiftA"]["A"])


def test_id_test_rows(project, run_output) -> None:
    """The ID row: what the ID test cases alone define, the rest undefined."""
    row = {k: as_float(v) if k not in ("method", "domain") else v
           for k, v in csv_row(read_csv(run_output["out"] / "ood_evaluation.csv"), "B", "id_test").items()}
    score, dice = np.array(SCORES["id_test"]["B"]), expected_dice(project, "id_test")
    t = np.percentile(SCORES["id_val"]["B"], 95)
    assert row["n_id"] == 4 and row["n_unscored"] == 0 and math.isnan(row["n_domain"])
    assert row["threshold"] == pytest.approx(t) and row["tpr"] == pytest.approx(np.mean(score <= t))
    assert all(math.isnan(row[k]) for k in ("auroc", "fpr", "detection_error"))
    sorted_risk = (1 - dice)[np.argsort(score)]
    assert row["aurc"] == pytest.approx(np.mean([sorted_risk[:k].mean() for k in range(1, 5)]))
    assert row["spearman"] == pytest.approx(spearmanr(score, 1 - dice).statistic)
    assert row["mean_dice"] == pytest.approx(dice.mean())
    accepted = [s <= CALIBRATION["B"]["threshold"] for s in SCORES["id_test"]["B"]]  # the written flags
    assert row["coverage"] == pytest.approx(sum(accepted) / 4)
    assert row["silent_rate"] == pytest.approx(sum(a and d < 0.6 for a, d in zip(accepted, dice)) / 4)


def curve_by_counting(score: np.ndarray, risk: np.ndarray) -> tuple[list[float], list[float]]:
    """For k = 1..n accept the k least uncertain cases widened to their whole tie group; one point per acceptance."""
    points: dict[int, float] = {}
    for k in range(1, score.size + 1):
        accepted = score <= np.sort(score)[k - 1]
        points[int(accepted.sum())] = float(risk[accepted].mean())
    return [c / score.size for c in sorted(points)], [points[c] for c in sorted(points)]


def test_risk_coverage_curves_and_plot(quality_project, quality_runs) -> None:
    from nnunet_ood.evaluation.risk_coverage import risk_coverage_curves

    f = quality_project["folders"]
    specs = build_group_specs(f["id_test"], f["id_val"], [("shiftA", *f["shiftA"]), ("shiftB", *f["shiftB"])])
    evaluation = evaluate(specs, resolve_label_setup(specs, None, None))
    assert evaluation.dice_methods == ["quality"]
    curves, oracle = risk_coverage_curves(evaluation)
    assert [(c.method, c.highlighted) for c in curves] == [("quality", True), ("A", False), ("E", False)]
    pooled_rows = {r["method"]: r for r in evaluation.rows if r["domain"] == ALL_SHIFTED}
    groups = ["id_test", "shiftA", "shiftB"]
    dice = np.concatenate([quality_project["dice"][g] for g in groups])
    for curve in curves:
        score = np.concatenate([quality_project["scores"][g][curve.method] for g in groups])
        flags = np.concatenate([quality_project["flags"][g][curve.method] for g in groups])
        keep = ~np.isnan(score)
        assert curve.n_unscored == int((~keep).sum())
        s, risk, flag = score[keep], 1 - dice[keep], flags[keep]
        coverage, selective_risk = curve_by_counting(s, risk)
        np.testing.assert_allclose(curve.coverage, coverage)
        np.testing.assert_allclose(curve.risk, selective_risk)
        area = sum((c - c0) * r for c0, c, r in zip([0.0, *coverage], coverage, selective_risk))
        assert curve.aurc == pytest.approx(area) and pooled_rows[curve.method]["aurc"] == pytest.approx(area)
        if curve.method == "E":
            assert curve.point is None
        else:
            taken = ~flag
            assert curve.point == (pytest.approx(taken.mean()), pytest.approx(risk[taken].mean()))
    np.testing.assert_allclose(oracle[1], [np.sort(1 - dice)[:k].mean() for k in range(1, dice.size + 1)])
    assert curves[0].coverage.size < dice.size - curves[0].n_unscored  # quality's risks clipped at 0 tie
    data = (quality_runs[0.6] / "risk_coverage.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000


@pytest.mark.parametrize("value", ["0", "1.5", "nan"])
def test_fail_below_outside_a_dice_fails_in_one_line(project, tmp_path, fails_with, value) -> None:
    out = tmp_path / "out"
    evaluation_fails(fails_with, [*group_args(project), "-o", str(out), "--fail_below", value], out, "--fail_below")


# ------------------------------------------------------------------------------------------- label values


def test_labels_the_dataset_does_not_have_are_refused(project, broken, fails_with) -> None:
    """--labels 7 on a dataset of labels 1 and 2 gave every case Dice 1.0."""
    out = broken / "out"
    message = evaluation_fails(fails_with, [*group_args(project, broken), "-o", str(out), "--labels", "7"], out,
                               "--labels", "7", "1, 2", "dataset.json")
    assert "pred_id_test" in message
    evaluation_fails(fails_with, [*group_args(project, broken), "-o", str(out), "--labels", "1,7"], out, "7")


def test_reference_with_a_value_outside_the_dataset_is_refused(project, broken, fails_with) -> None:
    """A reference storing class 1 under value 7 gave a Dice of about 0.5 silently."""
    path = broken / "labels_scanner" / f"scanner_002{ENDING}"
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    reference[reference == 1] = 7
    write_label_map(path, reference)
    out = broken / "out"
    evaluation_fails(fails_with, [*group_args(project, broken), "-o", str(out)], out, str(path), "7", "0, 1, 2")
    # the same with --labels: the reference is still checked against the dataset's values
    evaluation_fails(fails_with, [*group_args(project, broken), "-o", str(out), "--labels", "2"], out, str(path))


def test_without_dataset_json_labels_must_occur_in_the_references(project, broken, fails_with) -> None:
    for group in project["folders"]:
        (broken / f"pred_{group}" / "dataset.json").unlink()
    out = broken / "out"
    evaluation_fails(fails_with, [*group_args(project, broken), "-o", str(out), "--labels", "7", "--file_ending",
                                  ENDING], out, "--labels", "7", "0, 1, 2")


def test_folders_predicted_with_other_settings_give_a_warning(project, broken, capsys) -> None:
    """Different step sizes or calibrations were ignored silently."""
    for group in project["folders"]:
        path = broken / f"pred_{group}" / "ood_scores.json"
        document = json.loads(path.read_text())
        document.update(tile_step_size=0.75 if group == "scanner" else 0.5, use_mirroring=True,
                        calibration_source="site" if group == "single" else "fit")
        path.write_text(json.dumps(document))
    main([*group_args(project, broken), "-o", str(broken / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("warning: ") for e in err), err
    assert "step sizes" in err[0] and "scanner: 0.75" in err[0] and "id_test: 0.5" in err[0]
    assert "calibrations" in err[1] and "single: site" in err[1] and "not comparable" in err[1]


def test_segmentations_missing_from_the_table_give_a_warning(project, broken, capsys) -> None:
    """A case with a segmentation but no row in ood_scores.csv was left out silently."""
    folder = broken / "pred_scanner"
    csv_path = folder / "ood_scores.csv"
    csv_path.write_text("".join(ln for ln in csv_path.read_text().splitlines(True) if "scanner_003" not in ln))
    shutil.copy(folder / f"scanner_000{ENDING}", folder / f"scanner_000_ood_A{ENDING}")  # a map file: no case
    main([*group_args(project, broken), "-o", str(broken / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: 1 segmentation(s)"), err
    assert str(folder) in err[0] and "scanner_003" in err[0] and "--continue_prediction" in err[0]
    assert {r["case"] for r in read_csv(broken / "out" / "ood_cases.csv") if r["group"] == "scanner"} == \
        {"scanner_000", "scanner_001", "scanner_002"}


def test_a_dropped_method_is_told_once(project, broken, capsys) -> None:
    """The command printed the fact twice: as a warning and again among the notes under the printed table."""
    csv_path = broken / "pred_scanner" / "ood_scores.csv"
    csv_path.write_text("".join(ln for ln in csv_path.read_text().splitlines(True) if ",B," not in ln))
    out = broken / "out"
    main([*group_args(project, broken), "-o", str(out), "--no_report"])
    captured = capsys.readouterr()
    told = [ln for ln in (captured.out + captured.err).splitlines() if "B" in ln and ("dropped" in ln or "left out" in
                                                                                    ln)]
    assert len(told) == 1 and told[0].startswith("warning: "), told
    assert "Method(s) B are not in every prediction folder" in (out / "ood_evaluation.md").read_text()


def test_report_leads_with_the_id_test_folders_statement(quality_runs) -> None:
    """report.html's headline carries the sentence the ID test folder's prediction recorded (escaped), not
    another folder's."""
    text = (quality_runs[0.6] / "report.html").read_text()
    assert "Statement of id_test: at most 25% &amp; no more." in text
    assert "Statement of shiftA" not in text and "Statement of id_val" not in text
    assert text.index("Statement of id_test") < text.index("Auto-accepted by")
