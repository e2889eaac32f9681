"""Issue 22's campaign by kind (docs/bad_inputs.md, "Campaign by kind"): the inputs whose fix needs no trained
model. Type confusion in the JSON the plugin reads."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable

import numpy as np
import pytest

from nnunet_ood.calibration import MethodCalibration
from nnunet_ood.errors import OODStateError
from nnunet_ood.io.scores import collect_records, has_case_record, record_path, write_case_record
from nnunet_ood.quality.risk_control import RiskThreshold

GOOD = {"low": 1.0, "high": 4.0, "threshold": 2.0, "n_train_cases": 3, "n_val_cases": 3, "aggregation": "mean",
        "false_alarm_rate": 0.05}


@pytest.mark.parametrize("key, value", [
    ("threshold", math.nan), ("threshold", math.inf), ("threshold", -math.inf),  # NaN: silently never flagged
    ("false_alarm_rate", math.nan), ("false_alarm_rate", math.inf), ("false_alarm_rate", 1e308),
    ("false_alarm_rate", 0.0),
])
def test_calibration_threshold_and_rate_must_be_usable(key, value):
    entry = json.loads(json.dumps({**GOOD, key: value}))  # NaN/Infinity literals, as a file holds them
    with pytest.raises(OODStateError, match=f"corrupted calibration in here: .*{key}.*; fix it"):
        MethodCalibration.from_json(entry, "here", "fix it")
    assert MethodCalibration.from_json(GOOD, "here").threshold == 2.0


@pytest.mark.parametrize("content", ["null", "[]", "3", '"x"', '{"run_signature": "sig", "methods": "x"}',
                                     '{"run_signature": "sig", "methods": {"mahalanobis": null}}'])
def test_case_records_of_the_wrong_shape_are_redone(tmp_path, content):
    """A per-case record that is valid JSON of the wrong shape stopped --continue_prediction and the tables with an
    AttributeError traceback; now the case counts as not done and is predicted again."""
    write_case_record(str(tmp_path), "good", {"mahalanobis": {"score": 1.0, "ood": False}}, "sig")
    write_case_record(str(tmp_path), "bad", {"mahalanobis": {"score": 1.0, "ood": False}}, "sig")
    with open(record_path(str(tmp_path), "bad"), "w") as f:
        f.write(content)
    assert has_case_record(str(tmp_path), "good", "sig") and not has_case_record(str(tmp_path), "bad", "sig")
    assert [r["case"] for r in collect_records(str(tmp_path), None, "sig")] == ["good"]


def _failure_table_csv() -> str:
    from nnunet_ood.quality.table import OOF_RISK, FailureTable

    table = FailureTable(["mahalanobis", "tta"])
    for i in range(6):
        table.add(f"case{i}", 0, "none", 0, 0.5 + i / 20, {"mahalanobis": 10.0 + i, "tta": 0.1 * i})
    return table.to_csv({OOF_RISK: [0.1 * i for i in range(6)]})


@pytest.mark.parametrize("cut", [0.5, 0.97, 0.03])
def test_a_truncated_quality_failure_table_is_refused(cut):
    """quality_calibration.csv cut short (a truncated copy) was read as a table of fewer validation cases: another
    pooled threshold and gate calibration, exit 0. Now a one-line error naming the file and the ways out."""
    from nnunet_ood.quality.table import check_table_complete

    text = _failure_table_csv()
    check_table_complete(text, "whole.csv")
    with pytest.raises(OODStateError, match="table cut.csv is truncated.*restore it, re-fit.*--ood"):
        check_table_complete(text[:max(1, int(len(text) * cut))], "cut.csv")


@pytest.mark.parametrize("damage", ["dangling", "folder"])
def test_a_score_document_that_is_no_file_is_refused_by_the_evaluation(tmp_path, damage):
    """An ood_scores.json that is a dangling link or a folder was read as no document (its calibrations and
    provenance silently left out, exit 0); a missing one still reads as an older prediction folder."""
    from nnunet_ood.errors import OODInputError
    from nnunet_ood.evaluation.score_tables import load_score_table

    (tmp_path / "ood_scores.csv").write_text("case,method,score,normalized,ood\nc1,mahalanobis,1.0,0.5,False\n")
    assert load_score_table(str(tmp_path)).cases == ["c1"]
    if damage == "dangling":
        (tmp_path / "ood_scores.json").symlink_to(tmp_path / "nowhere.json")
    else:
        (tmp_path / "ood_scores.json").mkdir()
    with pytest.raises(OODInputError, match="ood_scores.json is (a dangling symbolic link|not a file); re-run "
                                            "nnUNetv2_predict_ood"):
        load_score_table(str(tmp_path))


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_reference_label_is_named_without_tracebacks(tmp_path, capsys, damage):
    """An empty or truncated reference label printed nnU-Net's reader tracebacks (one per reader it tried) and then
    blamed --file_ending; now one line naming the file and the fix, and nothing else on stderr."""
    import gzip

    from nnunet_ood.errors import OODInputError
    from nnunet_ood.evaluation.dice import make_reader

    label = tmp_path / "case_000.nii.gz"
    label.write_bytes(b"" if damage == "empty" else gzip.compress(b"\\x5c\\x01" + b"\\0" * 400)[:60])
    with pytest.raises(OODInputError, match=r"case_000.nii.gz (is empty \(0 bytes\); replace it|.*a truncated or "
                                            r"damaged file.*replace the file)"):
        make_reader(".nii.gz", str(label))
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- ood_scores.json / .csv: type confusion
# One prediction folder written by the plugin's own writer, then damaged one entry at a time. Before the shared
# reader (nnunet_ood/io/score_reader.py) the evaluation ignored the per-case scores of ood_scores.json, read a
# document that is no object as none, dropped a calibration that is no object and took a threshold "2.4" as no
# threshold (exit 0); the review page did the same; an ood flag "yes" in ood_scores.csv read as not flagged.

SCORE_METHODS = ("A", "B")
SCORE_CALIBRATION = {"low": 0.0, "high": 10.0, "threshold": 5.0, "n_train_cases": 4, "n_val_cases": 4,
                     "aggregation": "mean", "false_alarm_rate": 0.05}


def _score_metadata() -> dict:
    """What nnUNetv2_predict_ood records besides the scores (inference/outputs.py, table_metadata)."""
    calibration = {m: dict(SCORE_CALIBRATION) for m in SCORE_METHODS}
    gate = {"level": 0.05, "scores": ["A"], "calibration_cases": 40, "source": "calibration site", "active": True}
    return {"plugin": "nnunet-ood", "plugin_version": "0.1.0", "created": "2026-01-01T00:00:00+0000",
            "model_folder": "/models/m", "folds": ["0"], "checkpoint": "checkpoint_final.pth",
            "methods": list(SCORE_METHODS), "configuration": "2d", "plans": "nnUNetPlans", "tile_step_size": 0.5,
            "use_gaussian": True, "use_mirroring": True, "calibration_source": "fit", "calibration": calibration,
            "calibration_per_fold": {"0": calibration}, "ood_maps": None,
            "decision_rules": {"B": {"rule": "ltt", "fail_below": 0.6, "max_silent_failures": 0.1, "confidence": 0.9,
                                     "threshold": 5.0, "threshold_from": "fit", "guarantee": False,
                                     "calibration_cases": 12, "gate": gate, "statement": "B decides."}},
            "run_signature": "0123456789abcdef", "input_folder": None}


def _write_score_group(root, name: str, offset: float):
    """A prediction folder (two cases, their segmentations, both score tables, dataset.json) and its labels."""
    import numpy as np
    import SimpleITK as sitk

    from nnunet_ood.io.scores import write_score_tables

    pred, labels = root / f"pred_{name}", root / f"labels_{name}"
    pred.mkdir()
    labels.mkdir()
    records = []
    for i in range(2):
        case = f"{name}_{i:03d}"
        ref = np.zeros((6, 7), np.uint8)
        ref[1:4, 2:5] = 1
        for folder, array in ((labels, ref), (pred, np.roll(ref, i, axis=0))):
            sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / f"{case}.nii.gz"))
        scores = {m: offset + i + k for k, m in enumerate(SCORE_METHODS)}
        records.append({"case": case, "methods": {m: {"score": s, "normalized": s / 10, "ood": s > 5.0}
                                                  for m, s in scores.items()}})
    write_score_tables(str(pred), records, list(SCORE_METHODS), _score_metadata(), ["B"])
    (pred / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}))
    return pred, labels


@pytest.fixture(scope="module")
def score_folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("score_documents")
    return {"id_test": _write_score_group(root, "id", 1.0), "shift": _write_score_group(root, "shift", 4.0)}


def _set(path: tuple, value):
    """A damage: ``document[path[0]][path[1]]... = value`` (an empty path replaces the whole document)."""
    def damage(document):
        if not path:
            return value
        node = document
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return document
    return damage


def _drop(path: tuple):
    def damage(document):
        node = document
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return document
    return damage


S0 = "scores[0] (case shift_000, method A)"
DOCUMENT_DAMAGES = {  # id -> (damage, what the one error line names)
    "score is a string": (_set(("scores", 0, "score"), "4.0"), f"{S0}.score is the string '4.0', expected a number"),
    "score is the string NaN": (_set(("scores", 0, "score"), "NaN"), f"{S0}.score is the string 'NaN'"),
    "score is a boolean": (_set(("scores", 0, "score"), True), f"{S0}.score is the boolean true"),
    "score is a list": (_set(("scores", 0, "score"), [4.0]), f"{S0}.score is a list of 1 item(s)"),
    "score is an object": (_set(("scores", 0, "score"), {"value": 4.0}), f"{S0}.score is an object"),
    "normalized is a string": (_set(("scores", 0, "normalized"), "0.4"), f"{S0}.normalized is the string '0.4'"),
    "ood is a string": (_set(("scores", 0, "ood"), "False"), f"{S0}.ood is the string 'False', expected true or "
                                                             "false"),
    "score missing": (_drop(("scores", 0, "score")), f"{S0}.score is missing"),
    "case is a number": (_set(("scores", 0, "case"), 3), "scores[0].case is the number 3, expected a string"),
    "case entry is a string": (_set(("scores", 1), "shift_000,B,5.0"), "scores[1] is the string 'shift_000,B,5.0', "
                                                                        "expected an object"),
    "case entry is null": (_set(("scores", 1), None), "scores[1] is null, expected an object"),
    "scores is an object": (_set(("scores",), {"shift_000": 4.0}), "scores is an object, expected a list"),
    "document is a list": (_set((), [{"scores": []}]), "the document is a list of 1 item(s), expected a JSON "
                                                        "object"),
    "document is null": (_set((), None), "the document is null, expected a JSON object"),
    "calibration is a list": (_set(("calibration",), [SCORE_CALIBRATION]), "calibration is a list of 1 item(s)"),
    "calibration entry is a string": (_set(("calibration", "A"), "fit"), "calibration.A is the string 'fit', "
                                                                         "expected an object"),
    "threshold is a string": (_set(("calibration", "A", "threshold"), "5.0"), "calibration.A.threshold is the "
                                                                              "string '5.0', expected a number or "
                                                                              "null"),
    "threshold is the string NaN": (_set(("calibration", "A", "threshold"), "NaN"), "calibration.A.threshold is "
                                                                                    "the string 'NaN'"),
    "threshold is a boolean": (_set(("calibration", "A", "threshold"), True), "calibration.A.threshold is the "
                                                                              "boolean true"),
    "low is a list": (_set(("calibration", "B", "low"), [0.0]), "calibration.B.low is a list"),
    "fold threshold is a string": (_set(("calibration_per_fold", "0", "A", "threshold"), "x"),
                                   "calibration_per_fold.0.A.threshold is the string 'x'"),
    "decision_rules is a string": (_set(("decision_rules",), "ltt"), "decision_rules is the string 'ltt', expected "
                                                                     "an object"),
    "max_silent_failures is a string": (_set(("decision_rules", "B", "max_silent_failures"), "0.1"),
                                        "decision_rules.B.max_silent_failures is the string '0.1'"),
    "gate is active 'yes'": (_set(("decision_rules", "B", "gate", "active"), "yes"),
                             "decision_rules.B.gate.active is the string 'yes', expected true or false"),
    "statement is a number": (_set(("decision_rules", "B", "statement"), 3), "decision_rules.B.statement is the "
                                                                             "number 3"),
    "folds is a string": (_set(("folds",), "0"), "folds is the string '0', expected a list"),
    "step size is a string": (_set(("tile_step_size",), "0.5"), "tile_step_size is the string '0.5', expected a "
                                                                "number"),
    "mirroring is a string": (_set(("use_mirroring",), "true"), "use_mirroring is the string 'true', expected true "
                                                                "or false"),
    "input folder is a number": (_set(("input_folder",), 3), "input_folder is the number 3, expected a string or "
                                                             "null"),
    "ood_maps is a string": (_set(("ood_maps",), "float32"), "ood_maps is the string 'float32', expected an object"),
}


def _damaged_copy(score_folders, tmp_path, damage) -> tuple[list[str], object]:
    """evaluate's arguments for a copy of the folders whose shifted group's ood_scores.json is damaged."""
    import shutil

    copies = {}
    for group, (pred, labels) in score_folders.items():
        copies[group] = (shutil.copytree(pred, tmp_path / pred.name), shutil.copytree(labels, tmp_path / labels.name))
    path = copies["shift"][0] / "ood_scores.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    argv = ["--id_test", *map(str, copies["id_test"]), "--domain", "shift", *map(str, copies["shift"]),
            "-o", str(tmp_path / "out")]
    return argv, copies["shift"][0]


def test_the_undamaged_score_folders_evaluate_and_review(score_folders, tmp_path, capsys) -> None:
    """The folders the damages start from are valid: evaluation and review run (exit 0)."""
    from nnunet_ood.cli.evaluate import main
    from nnunet_ood.reports.review import write_review

    argv, shift = _damaged_copy(score_folders, tmp_path, lambda document: document)
    main([*argv, "--no_report"])
    assert (tmp_path / "out" / "ood_evaluation.csv").is_file()
    assert [os.path.basename(p) for p in write_review(None, str(shift))] == ["review.html", "review.csv"]


@pytest.mark.parametrize("kind", list(DOCUMENT_DAMAGES))
def test_type_confusion_in_ood_scores_json_is_refused_by_the_evaluation(score_folders, tmp_path, fails_with,
                                                                        kind) -> None:
    from nnunet_ood.cli.evaluate import main

    damage, needle = DOCUMENT_DAMAGES[kind]
    argv, shift = _damaged_copy(score_folders, tmp_path, damage)
    line = fails_with(main, argv, f"{shift / 'ood_scores.json'}: ", needle,
                      f"regenerate it with nnUNetv2_predict_ood into {shift}")
    assert "Traceback" not in line
    assert not (tmp_path / "out").exists(), "nothing may be written on error"


@pytest.mark.parametrize("kind", list(DOCUMENT_DAMAGES))
def test_type_confusion_in_ood_scores_json_is_refused_by_the_review(score_folders, tmp_path, kind) -> None:
    """The review page of nnUNetv2_predict_ood --report reads the same document with the same reader."""
    from nnunet_ood.errors import OODInputError
    from nnunet_ood.reports.review import write_review

    damage, needle = DOCUMENT_DAMAGES[kind]
    _, shift = _damaged_copy(score_folders, tmp_path, damage)
    with pytest.raises(OODInputError) as info:
        write_review(None, str(shift))
    assert str(info.value).startswith(f"{shift / 'ood_scores.json'}: ") and needle in str(info.value)
    assert not (shift / "review.html").exists()


CSV_DAMAGES = {  # id -> (line 2 of ood_scores.csv becomes, what the one error line names)
    "ood flag 'yes'": ("shift_000,A,4.0,0.4,yes,,", "line 2, case shift_000, method A: ood 'yes' is not True or "
                                                    "False"),
    "ood flag '1'": ("shift_000,A,4.0,0.4,1,,", "ood '1' is not True or False"),
    "score 'four'": ("shift_000,A,four,0.4,False,,", "line 2, case shift_000, method A: score 'four' is not a "
                                                     "number"),
    "line cut short": ("shift_000,A,4.0", "line 2 has fewer cells than the columns"),
    "no case name": (",A,4.0,0.4,False,,", "line 2 has no case or method name"),
}


@pytest.mark.parametrize("kind", list(CSV_DAMAGES))
def test_type_confusion_in_ood_scores_csv_is_refused(score_folders, tmp_path, fails_with, kind) -> None:
    """An ood flag other than True/False was read as False (accepted) by the evaluation and the review."""
    from nnunet_ood.cli.evaluate import main
    from nnunet_ood.errors import OODInputError
    from nnunet_ood.reports.review import write_review

    row, needle = CSV_DAMAGES[kind]
    argv, shift = _damaged_copy(score_folders, tmp_path, lambda document: document)
    path = shift / "ood_scores.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], row, *lines[2:]]) + "\n")
    fails_with(main, argv, f"{path} is not a valid ood_scores.csv (", needle, "re-run nnUNetv2_predict_ood")
    with pytest.raises(OODInputError, match="is not a valid ood_scores.csv"):
        write_review(None, str(shift))
# ------------------------------------------------------------------ issue 22 leftovers: numeric flags have ranges
@pytest.mark.parametrize("flag, value, allowed", [
    ("--mc_dropout_passes", "1e9", "an integer in 2..100"),
    ("--mc_dropout_passes", "1000000000", "an integer in 2..100"),
    ("--sd_latent", "1000000000", "an integer in 1..4096"),
    ("--sd_batch_size", "1000000000", "an integer in 1..1024"),
    ("--calibration_parts", "1000000000", "an integer in 1..20"),
    ("--normalization_cases", "1000000000", "an integer in 0..100000"),
    ("--max_patches", "1000000000000", "an integer in 1..100000000"),
    ("--knn_k", "1000000000", "an integer in 1..1000"),
    ("--knn_bank", "1000000000000", "an integer in 1..1000000"),
    ("--sd_channels", "1000000", "an integer in 1..1024"),
    ("--sd_iterations", "1000000000", "an integer in 1..100000"),
    ("--sd_max_epochs", "1000000000", "an integer in 1..10000"),
    ("--sd_patience", "1000000000", "an integer in 1..10000"),
    ("--sd_val_batches", "1000000000", "an integer in 1..1000"),
    ("--sd_lr_patience", "1000000000", "an integer in 1..10000"),
    ("--sd_lr", "1e308", "in (0, 1]"),
    ("--sd_min_agreement", "nan", "in [0, 1]"),
    ("--mc_dropout_rate", "inf", "in (0, 1)"),
    ("--corruptions_per_case", "1000000000", "an integer in 0..12"),
    ("--corruptions_per_version", "-1", "an integer in 1..12"),
    ("--unusual_level", "1e308", "in [0, 1)"),
    ("--seed", "1.5", "an integer in 0..4294967295"),
])
def test_fit_flags_have_ranges_checked_when_parsing(fails_with, flag, value, allowed):
    """nnUNetv2_fit_ood took --mc_dropout_passes, --sd_latent, --sd_batch_size, --calibration_parts and
    --normalization_cases at 1e9 (a fit of unbounded time or memory); every numeric flag now names its range and the
    value at once (no model is looked up: -d 1 does not exist)."""
    from nnunet_ood.cli import fit

    fails_with(fit.main, ["-d", "1", "-c", "2d", flag, value], f"{flag} must be {allowed}, got", value)


@pytest.mark.parametrize("main, argv, needle", [
    ("calibrate", ["--false_alarm_rate", "1e308"], "--false_alarm_rate must be in (0, 1), got 1e308"),
    ("calibrate", ["--confidence", "nan"], "--confidence must be in (0, 1), got nan"),
    ("evaluate", ["--report_cases", "1e9"], "--report_cases must be an integer in 1..10000, got 1e9"),
    ("evaluate", ["--threshold_percentile", "1e308"], "--threshold_percentile must be in (0, 100], got 1e308"),
    ("demo", ["--n_train", "1000000000"], "--n_train must be an integer in 5..1000, got 1000000000"),
])
def test_the_other_commands_check_their_ranges_when_parsing(fails_with, tmp_path, main, argv, needle):
    import importlib

    module = importlib.import_module({"calibrate": "nnunet_ood.cli.calibrate", "evaluate": "nnunet_ood.cli.evaluate",
                                      "demo": "nnunet_ood.demo.run_demo"}[main])
    required = {"calibrate": ["-i", "x", "-d", "1", "-c", "2d"],
                "evaluate": ["--id_test", "p", "l", "--domain", "d", "p", "l", "-o", str(tmp_path / "o")],
                "demo": ["--output", str(tmp_path / "demo")]}[main]
    fails_with(module.main, [*required, *argv], needle)
    assert not any(tmp_path.iterdir())  # nothing written


#: flags checked after parsing, with the others of the prediction (nnunet_ood.cli.predict.check_arguments)
PREDICTION_FLAGS = {"-step_size", "-npp", "-nps", "-num_parts", "-part_id"}


def test_every_numeric_flag_has_a_range():
    """A plain int or float argparse type accepts 1e9, NaN and inf alike: every numeric flag of every command parses
    with a Range (or is one of the prediction's flags, checked with the others before anything is loaded)."""
    from nnunet_ood.cli import calibrate, evaluate, fit, predict
    from nnunet_ood.demo import run_demo

    for module in (fit, calibrate, evaluate, predict, run_demo):
        for action in module.build_parser()._actions:
            flag = max(action.option_strings, key=len, default=action.dest)
            assert action.type not in (int, float) or set(action.option_strings) & PREDICTION_FLAGS, \
                f"{module.__name__} {flag} has no range"


def test_ranges_bound_options_made_in_code_but_not_stored_states():
    """A trainer's FitOptions get the flags' ranges; a stored mc_dropout configuration is read as it was fitted (a
    range tightened later must not lock anyone out of a fitted model)."""
    from nnunet_ood.errors import OODInputError
    from nnunet_ood.fitting.options import FitOptions
    from nnunet_ood.methods.mc_dropout import MCDropoutConfig
    from nnunet_ood.methods.options import config_from_json
    from nnunet_ood.methods.sd import SDTrainingConfig

    FitOptions()  # the defaults lie in the ranges
    with pytest.raises(OODInputError, match="--mc_dropout_passes must be an integer in 2..100, got 1000000000"):
        FitOptions(method_configs={"mc_dropout": MCDropoutConfig(passes=10**9)})
    with pytest.raises(OODInputError, match="--sd_latent must be an integer in 1..4096"):
        FitOptions(method_configs={"sd": SDTrainingConfig(latent_dim=10**9)})
    with pytest.raises(OODInputError, match="--normalization_cases must be an integer in 0..100000, got 1000000000"):
        FitOptions(normalization_cases=10**9)
    assert config_from_json(MCDropoutConfig, {"passes": 500}).passes == 500


# ------------------------------------------------------------------ issue 22 leftovers: stored values out of range
@pytest.mark.parametrize("key, value, score_range, needle", [
    ("threshold", 1e308, (-math.inf, math.inf), "threshold = 1e+308 is beyond any score"),
    ("high", 1e308, (-math.inf, math.inf), "high = 1e+308 is beyond any score"),
    ("low", -1e308, (-math.inf, math.inf), "low = -1e+308 is beyond any score"),
    ("threshold", -0.5, (0.0, math.inf), "threshold = -0.5 is outside the method's scores [0, inf]"),
    ("low", -1.0, (0.0, math.inf), "low = -1.0 is outside the method's scores"),
    ("threshold", 3.0, (0.0, 1.0), "threshold = 3.0 is outside the method's scores [0, 1]"),
    ("n_val_cases", -3, (-math.inf, math.inf), "n_val_cases = -3 is negative"),
])
def test_stored_calibrations_out_of_range_are_refused(key, value, score_range, needle):
    """high: 1e308 and threshold: 1e308 were accepted (normalised scores ~0, nothing ever flagged); a negative
    threshold of a distance flagged every case."""
    entry = json.loads(json.dumps({**GOOD, key: value}))
    with pytest.raises(OODStateError, match=f"corrupted calibration in here: {re.escape(needle)}.*; fix it"):
        MethodCalibration.from_json(entry, "here", "fix it", score_range=score_range)


def test_methods_say_what_their_scores_can_be():
    from nnunet_ood.methods import REGISTRY

    assert REGISTRY["mahalanobis"].score_range == (0.0, math.inf)
    assert REGISTRY["energy"].score_range == (-math.inf, math.inf)  # -logsumexp: any sign
    quality = {**GOOD, "low": 0.0, "high": 1.0, "threshold": -1.0}  # -1: accept nothing
    calibration = MethodCalibration.from_json(quality, "q", score_range=REGISTRY["quality"].score_range,
                                              special_thresholds=REGISTRY["quality"].special_thresholds)
    assert calibration.threshold == -1.0


@pytest.mark.parametrize("threshold", [1e308, 1.5, -0.5])
def test_a_stored_risk_threshold_must_be_a_risk(threshold):
    """quality's threshold 1e308 accepted every case; now refused, naming the file and field (-1 is 'accept
    nothing')."""
    from nnunet_ood.quality.risk_control import ltt_threshold

    stored = ltt_threshold([0.1 * i for i in range(10)] * 3, [0.9] * 30, 0.6, 0.1).to_json()
    RiskThreshold.from_json(stored, "ok")
    shown = re.escape(repr(threshold))
    with pytest.raises(OODStateError, match=f"risk threshold in the file: threshold = {shown} is neither"):
        RiskThreshold.from_json({**stored, "threshold": threshold}, "the file")


def test_stored_quality_parameters_and_temperature_are_checked():
    """unusual_level 1e308 (every case sent to review) and a temperature of 1e308 (every probability uniform) were
    read without a word."""
    from nnunet_ood.methods import FoldModels
    from nnunet_ood.methods.logits import Temperature

    with pytest.raises(ValueError, match=r"temperature must be a number in \[0.05, 20\].*1e\+308"):
        Temperature().load_state({"config": {"temperature": 1e308}}, "folder", FoldModels(), "cpu")
    Temperature().load_state({"config": {"temperature": 1.1}}, "folder", FoldModels(), "cpu")
    from nnunet_ood.methods.quality import Quality

    config = {"inputs": [], "features": [], "label_setup": {}, "reference_volumes": {}, "risk_threshold": {},
              "unusual_level": 1e308}
    with pytest.raises(OODStateError, match=r"quality entry in folder/ood_state.json: unusual_level = 1e\+308 is not "
                                            r"in \[0, 1\)"):
        Quality().load_state({"file": "quality_model.json", "config": config}, "folder", FoldModels(), "cpu")


# ------------------------------------------------------------------ issue 22 leftovers: a table cut at a line end
def test_a_failure_table_cut_at_a_line_end_is_refused_by_its_row_count():
    """A quality_calibration.csv cut exactly after a row has a valid form: it was read as a table of fewer validation
    cases. The fit records how many rows it wrote; a table of a fit from before the count (legacy) is checked for
    its form only."""
    from nnunet_ood.quality.table import check_table_complete

    text = _failure_table_csv()
    cut = text[:text.index("\n", len(text) // 2) + 1]  # whole rows only
    check_table_complete(cut, "legacy.csv")  # no count: the form is valid
    check_table_complete(text, "whole.csv", expected_rows=6)
    with pytest.raises(OODStateError, match=r"table cut.csv is truncated or not this fit's: it has 3 rows, the fit "
                                            r"wrote 6; .*restore it, re-fit"):
        check_table_complete(cut, "cut.csv", expected_rows=6)


def test_the_row_count_is_recorded_and_read_back(tmp_path):
    """The quality entry of the manifest records the table's rows (table_rows); a fit from before it reads the count
    from its risk threshold (n_rows, one per table row); neither: legacy."""
    from nnunet_ood.quality.stored_folds import TABLE_ROWS, recorded_rows

    assert recorded_rows({TABLE_ROWS: 60}, "m") == 60
    assert recorded_rows({"risk_threshold": {"n_rows": 60}}, "m") == 60
    assert recorded_rows({"risk_threshold": {"n_rows": 0}}, "m") is None  # before the rule recorded its rows
    assert recorded_rows({"risk_threshold": "x"}, "m") is None
    with pytest.raises(OODStateError, match="quality entry in m: table_rows = -3 is not a positive integer"):
        recorded_rows({TABLE_ROWS: -3}, "m")


# ------------------------------------------------------------------ issue 22 leftovers: plans.json and dataset.json
def _plans() -> dict:
    """A 2d configuration's plans as nnU-Net writes them (the entries nnU-Net and the plugin read)."""
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {"dataset_name": "Dataset501_OODDemo", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0}},
            "configurations": {"2d": {
                "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 3,
                "patch_size": [64, 64], "spacing": [0.7, 0.8], "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling, "resampling_fn_seg_kwargs": resampling,
                "resampling_fn_probabilities_kwargs": resampling,
                "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": {
                    "n_stages": 5, "strides": [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]}}},
                "2d_bs8": {"inherits_from": "2d", "batch_size": 8}}}


DATASET = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
           "file_ending": ".nii.gz"}


def _without(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key)


def _in_2d(change: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda plans: change(plans["configurations"]["2d"])


@pytest.mark.parametrize("name, damage, needle", [
    ("plans.json", "{\"configurations\": {\"2d\"", "cannot read .*plans.json \\(Expecting"),
    ("plans.json", lambda p: p["configurations"].pop("2d"), "no configuration '2d'"),
    ("plans.json", _without("configurations"), "'configurations' is missing"),
    ("plans.json", _in_2d(lambda c: c.update(patch_size="64x64")), "patch_size = '64x64' is not a list"),
    ("plans.json", _in_2d(lambda c: c.update(patch_size=[64.5, 64])), "patch_size = \\[64.5, 64\\] is not"),
    ("plans.json", _in_2d(_without("spacing")), "configuration '2d' has no 'spacing'"),
    ("plans.json", _in_2d(lambda c: c.update(spacing=[0.7])), "spacing = \\[0.7\\] is not a list of 2 positive"),
    ("plans.json", _in_2d(_without("architecture")), "has no 'architecture'"),
    ("plans.json", _without("image_reader_writer"), "'image_reader_writer' is missing"),
    ("plans.json", _without("transpose_forward"), "'transpose_forward' is missing or not a permutation"),
    ("plans.json", _in_2d(lambda c: c.update(inherits_from="3d")), "'2d' inherits from '3d', which is missing"),
    ("dataset.json", "[1, 2", "cannot read .*dataset.json"),
    ("dataset.json", _without("labels"), "'labels' is missing"),
    ("dataset.json", lambda d: d["labels"].update(organ="one"), "label 'organ' = 'one' is not a label value"),
    ("dataset.json", _without("channel_names"), "'channel_names' is missing"),
    ("dataset.json", _without("file_ending"), "'file_ending' is missing"),
    ("dataset.json", lambda d: d.update(file_ending=3), "'file_ending' is missing or not a file ending"),
])
def test_damaged_plans_and_dataset_json_are_named_in_one_line(tmp_path, name, damage, needle):
    """nnU-Net read them key by key: a JSONDecodeError, KeyError, TypeError or RuntimeError traceback in the input
    checks or the model loading (a missing 'spacing' after the output folder was written). Now one line naming the
    file, the entry and the fix, before anything is loaded or written."""
    from nnunet_ood.errors import OODInputError
    from nnunet_ood.io.model_files import read_model_files

    files = {"plans.json": _plans(), "dataset.json": json.loads(json.dumps(DATASET))}
    read_model_files(str(_write_model(tmp_path, files)), "2d")
    if isinstance(damage, str):
        (tmp_path / name).write_text(damage)
    else:
        damage(files[name])
        _write_model(tmp_path, files)
    with pytest.raises(OODInputError, match=f"{needle}.*restore it") as info:
        read_model_files(str(tmp_path), "2d")
    assert name in str(info.value) and "\n" not in str(info.value)


def _write_model(folder, files: dict) -> object:
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


def test_every_configuration_is_checked_when_the_configuration_is_not_known(tmp_path):
    """The Python API learns the configuration from the checkpoint, after nnU-Net has read the plans: every
    configuration is checked then (one inheriting from another included)."""
    from nnunet_ood.errors import OODInputError
    from nnunet_ood.io.model_files import read_model_files

    plans = _plans()
    plans["configurations"]["3d_fullres"] = {**plans["configurations"]["2d"], "patch_size": None}
    _write_model(tmp_path, {"plans.json": plans, "dataset.json": DATASET})
    read_model_files(str(tmp_path), "2d")  # the CLI names its configuration
    with pytest.raises(OODInputError, match="configuration '3d_fullres': patch_size = None"):
        read_model_files(str(tmp_path))


# ------------------------------------------------------------------ issue 22 leftovers: a 1 x 1 image
@pytest.mark.parametrize("size, refused", [((1, 1), True), ((15, 15), True), ((15, 64), False), ((16, 16), False),
                                           ((64, 64), False)])
def test_an_image_inside_one_bottleneck_voxel_is_refused(tmp_path, size, refused):
    """A 1 x 1 image was predicted (padded to the patch), flagged by the feature methods and accepted by quality;
    an image that at the model's spacing fits inside one bottleneck voxel (here 16 x 16) is refused now. Larger
    images, also smaller than the 64 x 64 patch, are padded and predicted as nnU-Net always did."""
    import SimpleITK as sitk

    from nnunet_ood.errors import OODInputError
    from nnunet_ood.io.inputs import bottleneck_voxels, check_images_for_model

    plans = _plans()
    assert bottleneck_voxels(plans, "2d") == [16, 16] == bottleneck_voxels(plans, "2d_bs8")
    image = sitk.GetImageFromArray(np.ones(size, np.float32))
    image.SetSpacing((0.8, 0.7))  # x, y: the model's spacing
    sitk.WriteImage(image, str(tmp_path / "tiny_0000.nii.gz"))
    cases = {"tiny": [str(tmp_path / "tiny_0000.nii.gz")]}
    if not refused:
        check_images_for_model(cases, plans, "2d", 1)
        return
    shown = f"{size[1]} x {size[0]} voxels"  # SimpleITK's x, y
    with pytest.raises(OODInputError, match=f"tiny_0000.nii.gz of case tiny is {shown}, .* less than one bottleneck "
                                            r"voxel of the network \(16 x 16\)"):
        check_images_for_model(cases, plans, "2d", 1)
