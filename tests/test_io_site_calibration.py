"""Named site calibrations: thresholds from the cases' scores, safe JSON, refusal of other models or names."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from nnunet_ood.errors import OODInputError, OODStateError
from nnunet_ood.io.site_calibration import (
    SiteCalibration,
    available_calibrations,
    calibration_path,
    load_site_calibration,
    model_identity,
    save_site_calibration,
    score_settings,
)

MODEL = model_identity("2d", "nnUNetPlans", [0, 1], "checkpoint_final.pth", ["a" * 64, "b" * 64])
SETTINGS = score_settings(0.5, True, True)


@pytest.fixture()
def site() -> SiteCalibration:
    rng = np.random.default_rng(0)
    scores = {"mahalanobis": {f"c{i}": float(v) for i, v in enumerate(rng.gamma(3.0, 10.0, 40))},
              "pairwise_dice": {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0, 0.2, 40))}}
    scores["mahalanobis"]["c7"] = math.nan  # an unscored case
    return SiteCalibration.from_scores("scanner_b", MODEL, SETTINGS, scores, {"mahalanobis": "max_patch"}, 0.1)


def test_thresholds_and_bounds_from_the_cases(site):
    values = sorted(v for v in site.case_scores["mahalanobis"].values() if math.isfinite(v))
    c = site.calibration["mahalanobis"]
    assert c.threshold == values[math.ceil((len(values) + 1) * 0.9) - 1]
    assert (c.low, c.high) == (values[0], 2 * values[-1]) and c.aggregation == "max_patch"
    assert site.calibration["pairwise_dice"].calibrated  # fold ensembles get a threshold here
    assert site.n_cases == 40


def test_round_trip_and_lookup(tmp_path, site):
    path = save_site_calibration(str(tmp_path), site)
    assert path == calibration_path(str(tmp_path), "scanner_b")
    assert available_calibrations(str(tmp_path)) == ["scanner_b"]
    loaded = load_site_calibration(str(tmp_path), "scanner_b")
    assert loaded.calibration == site.calibration and loaded.model == site.model
    assert math.isnan(loaded.case_scores["mahalanobis"]["c7"])
    with pytest.raises(OODInputError, match=r"named other for this model \(known: scanner_b\).*--name other"):
        load_site_calibration(str(tmp_path), "other")
    with pytest.raises(OODInputError, match="--name"):
        load_site_calibration(str(tmp_path), "../escape")


def test_other_models_and_settings_are_told(site):
    site.check_model(MODEL)
    with pytest.raises(OODStateError, match="folds differs .*'0', '1'.*'0'.* nnUNetv2_calibrate_ood"):
        site.check_model(dict(MODEL, folds=["0"]))
    with pytest.raises(OODStateError, match="weights_sha256 differs;"):
        site.check_model(dict(MODEL, weights_sha256=["c" * 64, "b" * 64]))
    assert site.setting_differences(SETTINGS) == []
    assert site.setting_differences(score_settings(0.25, False, True)) == ["tile_step_size 0.5 -> 0.25",
                                                                           "use_mirroring True -> False"]


def test_malformed_files_are_refused(tmp_path, site):
    path = save_site_calibration(str(tmp_path), site)
    document = json.loads(open(path).read())
    document["calibration"]["mahalanobis"]["threshold"] = "high"
    open(path, "w").write(json.dumps(document))
    with pytest.raises(OODStateError, match="threshold"):
        load_site_calibration(str(tmp_path), "scanner_b")
    open(path, "w").write("{")
    with pytest.raises(OODStateError, match="corrupted calibration"):
        load_site_calibration(str(tmp_path), "scanner_b")


def test_a_folder_is_no_calibration(tmp_path, site):
    """A folder named like a calibration file was listed as a known calibration."""
    save_site_calibration(str(tmp_path), site)
    (tmp_path / "ood_calibrations" / "ghost.json").mkdir()
    assert available_calibrations(str(tmp_path)) == ["scanner_b"]
    with pytest.raises(OODInputError, match=r"no calibration named ghost for this model \(known: scanner_b\)"):
        load_site_calibration(str(tmp_path), "ghost")


def test_a_dangling_link_is_named_as_such(tmp_path, site):
    """A calibration file that is a dangling symbolic link said "no calibration named NAME (known: none)"."""
    path = save_site_calibration(str(tmp_path), site)
    (tmp_path / "moved.json").write_text(open(path).read())
    os.remove(path)
    os.symlink(tmp_path / "gone.json", path)
    with pytest.raises(OODStateError, match=r"corrupted calibration .*scanner_b.json \(a dangling symbolic link to "
                                            r".*gone.json\); re-run nnUNetv2_calibrate_ood"):
        load_site_calibration(str(tmp_path), "scanner_b")
    os.remove(path)
    os.symlink(tmp_path / "moved.json", path)  # a link to a valid file works
    assert load_site_calibration(str(tmp_path), "scanner_b").name == "scanner_b"


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.update(false_alarm_rate=1e308), "false_alarm_rate = 1e+308 is not in (0, 1)"),
    (lambda d: d["calibration"]["mahalanobis"].update(threshold=1e308), "threshold = 1e+308 is beyond any score"),
    (lambda d: d["calibration"]["mahalanobis"].update(threshold=-2.0), "threshold = -2.0 is outside the method's"),
    (lambda d: d["calibration"]["pairwise_dice"].update(low=3.0), "low = 3.0 is outside the method's scores [0, 1]"),
    (lambda d: d["case_scores"]["mahalanobis"].update(c0="x"), "case_scores of mahalanobis: 'x' is not a score"),
    (lambda d: d["case_scores"]["mahalanobis"].update(c0=1e308), "case_scores of mahalanobis: 1e+308 is not a score"),
])
def test_values_out_of_range_are_refused(tmp_path, site, change, needle):
    """Issue 22: a named calibration's thresholds, bounds, rate and case scores beyond what a calibration computes
    (1e308: nothing flagged; a string case score: a ValueError traceback) name the file, the field and the fix."""
    path = save_site_calibration(str(tmp_path), site)
    document = json.loads(open(path).read())
    change(document)
    open(path, "w").write(json.dumps(document))
    from nnunet_ood.inference.thresholds import calibration_limits  # what the predictor passes: the methods' ranges

    with pytest.raises(OODStateError) as info:
        load_site_calibration(str(tmp_path), "scanner_b", calibration_limits)
    message = str(info.value)
    assert needle in message and path in message and "nnUNetv2_calibrate_ood" in message, message
