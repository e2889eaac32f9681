"""Bad input ends with a one-line error naming the fix, exit status 2, and nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunet_ood.cli import fit
from nnunet_ood.cli import predict as predict_entry
from nnunet_ood.io.scores import read_score_csv

OOD_TRAINER = "nnUNetTrainerOOD_smoke"


@pytest.fixture()
def scratch_model(tiny_project, tmp_path) -> Path:
    """A copy of the OOD-trained model under another trainer name that the tests may break."""
    src = tiny_project.model(OOD_TRAINER)
    dst = tiny_project.model("nnUNetTrainerOOD_5epochs")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    yield dst
    shutil.rmtree(dst, ignore_errors=True)


def test_missing_state_names_the_fit_command(tiny_project, test_images, tmp_path, fails_with, predict_argv,
                                            scratch_model):
    shutil.rmtree(scratch_model / "fold_0" / "ood")
    out = tmp_path / "out"
    fails_with(predict_entry.main, predict_argv(test_images, out, "nnUNetTrainerOOD_5epochs"),
               "no fitted OOD state", "nnUNetv2_fit_ood")
    assert not out.exists()


def test_state_of_another_fold_or_model_is_refused(tiny_project, test_images, tmp_path, fails_with, predict_argv,
                                                  scratch_model):
    # another fold: fold_1 gets fold_0's weights and OOD state
    shutil.copytree(scratch_model / "fold_0", scratch_model / "fold_1")
    argv = predict_argv(test_images, tmp_path / "o1", "nnUNetTrainerOOD_5epochs", "-f", "1")
    fails_with(predict_entry.main, argv, "fitted for another model", "fold")
    # another model: the stock trainer's weights with this state
    stock = tiny_project.model("nnUNetTrainer_1epoch") / "fold_0" / "checkpoint_final.pth"
    shutil.copy(stock, scratch_model / "fold_0" / "checkpoint_final.pth")
    argv = predict_argv(test_images, tmp_path / "o2", "nnUNetTrainerOOD_5epochs")
    fails_with(predict_entry.main, argv, "network weights differs", "nnUNetv2_fit_ood")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "manifest"])
def test_corrupted_state_is_refused(tiny_project, test_images, tmp_path, fails_with, predict_argv, scratch_model,
                                   damage):
    ood = scratch_model / "fold_0" / "ood"
    if damage == "truncate":
        path = ood / "mahalanobis.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        (ood / "mahalanobis.safetensors").write_bytes(b"\x00" * 64)
    else:
        (ood / "ood_state.json").write_text('{"format_version": 1, "methods": ')
    out = tmp_path / "out"
    fails_with(predict_entry.main, predict_argv(test_images, out, "nnUNetTrainerOOD_5epochs"),
               "nnUNetv2_fit_ood")
    assert not out.exists()


def test_empty_input_folder(tiny_project, tmp_path, fails_with, predict_argv):
    (tmp_path / "empty").mkdir()
    fails_with(predict_entry.main, predict_argv(tmp_path / "empty", tmp_path / "out"), "no input images")
    assert not (tmp_path / "out").exists()


def test_wrong_number_of_channels(tiny_project, test_images, tmp_path, fails_with, predict_argv):
    first = sorted(test_images.iterdir())[0]
    shutil.copy(first, test_images / first.name.replace("_0000", "_0001"))
    fails_with(predict_entry.main, predict_argv(test_images, tmp_path / "out"), "input channel")
    assert not (tmp_path / "out").exists()


def test_unknown_fold_and_method(tiny_project, tmp_path, fails_with, predict_argv):
    fails_with(fit.main, ["-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "zero", "-tr", OOD_TRAINER,
                            "-device", "cpu"], "-f")
    fails_with(fit.main, ["-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "0", "-tr", OOD_TRAINER,
                            "-device", "cpu", "--ood", "nonsense"], "nonsense")
    fails_with(fit.main, ["-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "0", "-tr", OOD_TRAINER,
                            "-device", "cpu", "--calibration_parts", "0"], "--calibration_parts")
    fails_with(fit.main, ["-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "0", "-tr", "NoSuchTrainer",
                            "-device", "cpu"], "no trained model")


def test_nan_image_is_predicted_scored_nan_and_flagged(tiny_project, tmp_path, scratch_model, predict_argv):
    # SimpleITK's NIfTI reader turns NaN/Inf into 0, so nnU-Net never sees them; nibabel keeps them.
    # nnU-Net's NibabelIO reads 3D files only: the 2D cases are stored with a singleton third axis.
    plans_json = scratch_model / "plans.json"
    plans = json.loads(plans_json.read_text())
    plans["image_reader_writer"] = "NibabelIO"
    plans_json.write_text(json.dumps(plans))
    inp = tmp_path / "input"
    inp.mkdir()
    sources = sorted(Path(tiny_project.dataset.images_ts["id"]).iterdir())[:3]
    names = ["broken_000_0000.nii.gz", *(f.name for f in sources[1:])]
    for i, (f, name) in enumerate(zip(sources, names)):
        image = nib.load(str(f))
        arr = np.asarray(image.dataobj, dtype=np.float32).reshape(*image.shape[:2], 1)
        if i == 0:
            arr[3, 5, 0] = np.nan
            arr[10, 7, 0] = np.inf
        nib.save(nib.Nifti1Image(arr, image.affine), str(inp / name))
    out = tmp_path / "out"
    predict_entry.main(predict_argv(inp, out, "nnUNetTrainerOOD_5epochs"))
    assert (out / "broken_000.nii.gz").is_file()
    rows = {r["case"]: r for r in read_score_csv(str(out / "ood_scores.csv"))}
    assert np.isnan(rows["broken_000"]["score"]) and rows["broken_000"]["ood"] is True
    assert len(rows) == 3 and all(np.isfinite(r["score"]) for c, r in rows.items() if c != "broken_000")
