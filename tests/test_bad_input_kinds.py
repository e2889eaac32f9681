"""Issue 22's campaign by kind (docs/bad_inputs.md, "Campaign by kind"): the inputs whose fix needs no trained
model. Type confusion in the JSON the plugin reads."""

from __future__ import annotations

import json
import math

import pytest

from nnunet_ood.calibration import MethodCalibration
from nnunet_ood.errors import OODStateError
from nnunet_ood.io.scores import collect_records, has_case_record, record_path, write_case_record

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
