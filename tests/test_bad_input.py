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
from nnunet_ood.io.score_reader import read_score_rows

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


@pytest.mark.parametrize("where", ["state", "calibration"])
def test_normalisation_bounds_low_above_high_blame_their_file(tiny_project, test_images, tmp_path, fails_with,
                                                              predict_argv, scratch_model, where):
    """low > high stopped the run blaming the first image ("fix or remove id_000"), leaving a lock and empty
    tables."""
    from nnunet_ood.calibration import MethodCalibration
    from nnunet_ood.io.site_calibration import (
        SiteCalibration,
        model_identity,
        save_site_calibration,
        score_settings,
    )

    extra: tuple[str, ...] = ()
    if where == "state":
        path = scratch_model / "fold_0" / "ood" / "ood_state.json"
        document = json.loads(path.read_text())
        document["methods"]["mahalanobis"]["calibration"].update(low=10.0, high=1.0)
        path.write_text(json.dumps(document))
    else:
        fingerprint = json.loads((scratch_model / "fold_0" / "ood" / "ood_state.json").read_text())["fingerprint"]
        model = model_identity("2d", fingerprint["plans_name"], ["0"], "checkpoint_final.pth",
                               [fingerprint["weights_sha256"]])
        site = SiteCalibration("swapped", model, score_settings(0.5, True, True), 0.05,
                               {"mahalanobis": MethodCalibration(10.0, 1.0, 5.0)}, {"mahalanobis": {"x": 5.0}})
        path = Path(save_site_calibration(str(scratch_model), site))
        extra = ("--calibration", "swapped")
    out = tmp_path / "out"
    message = fails_with(predict_entry.main, predict_argv(test_images, out, "nnUNetTrainerOOD_5epochs", *extra),
                         str(path), "low=10", "high=1", "nnUNetv2_fit_ood" if where == "state" else "--name swapped")
    assert "id_000" not in message
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
    for flag, value in (("--max_patches", "0"), ("--normalization_cases", "-1")):
        fails_with(fit.main, ["-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "0", "-tr", OOD_TRAINER,
                              "-device", "cpu", flag, value], flag)
    for flag, value in (("--sd_loss", "l1"), ("--sd_augmentation", "heavy")):  # argparse's choices: its own line
        with pytest.raises(SystemExit) as info:
            fit.main(["-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "0", "-tr", OOD_TRAINER, flag, value])
        assert info.value.code == 2


def test_mc_dropout_stages_are_checked_whether_or_not_mc_dropout_is_fitted(tiny_project, fails_with, scratch_model):
    """--mc_dropout_stages 99 was ignored unless mc_dropout was fitted (the tiny model's decoder has 2 stages)."""
    manifest = scratch_model / "fold_0" / "ood" / "ood_state.json"
    before = manifest.read_bytes()
    for methods in (["mahalanobis"], ["mc_dropout"]):
        fails_with(fit.main, ["-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "0", "-tr",
                              "nnUNetTrainerOOD_5epochs", "-device", "cpu", "--ood", *methods,
                              "--mc_dropout_stages", "99"], "--mc_dropout_stages [99] out of range", "2 stages")
    fails_with(fit.main, ["-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerOOD_5epochs",
                          "-device", "cpu", "--mc_dropout_stages", "-1"], "--mc_dropout_stages", ">= 0")
    assert manifest.read_bytes() == before  # nothing re-fitted


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_outside_numpys_range_is_an_argument_error(tiny_project, fails_with, seed):
    """--seed -1 gave numpy's ValueError traceback after the model was loaded."""
    from nnunet_ood.errors import OODInputError
    from nnunet_ood.fitting.options import FitOptions

    fails_with(fit.main, ["-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "0", "-tr", OOD_TRAINER,
                          "-device", "cpu", "--seed", seed], "--seed", seed)
    with pytest.raises(OODInputError, match="--seed"):  # the trainer's options too
        FitOptions(seed=int(seed))


def test_calibration_arguments(tiny_project, test_images, tmp_path, fails_with):
    """nnUNetv2_calibrate_ood: a bad rate, a name that is a path, -num_parts; nothing written anywhere."""
    from nnunet_ood.cli import calibrate

    common = ["-i", str(test_images), "-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "0", "-tr", OOD_TRAINER,
              "-device", "cpu", "-o", str(tmp_path / "cal")]
    fails_with(calibrate.main, [*common, "--name", "a", "--false_alarm_rate", "1.5"], "--false_alarm_rate", "(0, 1)")
    fails_with(calibrate.main, [*common, "--name", "../../evil"], "--name")
    fails_with(calibrate.main, [*common, "--name", "a", "-num_parts", "2", "-part_id", "0"], "-num_parts")
    assert not (tmp_path / "cal").exists()
    assert not (tiny_project.model(OOD_TRAINER) / "ood_calibrations" / "a.json").exists()


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
    rows = {r["case"]: r for r in read_score_rows(str(out))}
    assert np.isnan(rows["broken_000"]["score"]) and rows["broken_000"]["ood"] is True
    assert len(rows) == 3 and all(np.isfinite(r["score"]) for c, r in rows.items() if c != "broken_000")


# ----------------------------------------------------------------------------------------------- methods alone

def test_every_fitted_method_alone_and_in_every_pair_gives_the_same_scores(preprocessed_case):
    """Each method's score is the same whatever else is computed (``--ood latent_mahalanobis`` alone crashed)."""
    import itertools

    from nnunet_ood.fold_state import read_manifest
    from nnunet_ood.methods import DEFAULT_FIT_METHODS, REGISTRY, MethodKind

    predictor, data = preprocessed_case(None, "shift_mild")
    entries = read_manifest(f"{predictor.model_folder}/fold_0")["methods"]
    predictor.predict_logits_from_preprocessed_data(data)
    reference = {m: s["score"] for m, s in predictor.ood_results[-1].scores.items()}
    assert list(reference) == list(DEFAULT_FIT_METHODS)
    for combination in [*([m] for m in reference), *itertools.combinations(reference, 2)]:
        predictor.requested_ood_methods = list(combination)
        predictor.load_ood_state()
        predictor.predict_logits_from_preprocessed_data(data)
        result = predictor.ood_results[-1]
        # a derived method (quality) brings the methods it reads; it has no map
        expected = [m for m in reference if m in REGISTRY.with_inputs(list(combination), entries)]
        assert list(result.scores) == expected
        assert list(result.maps) == [m for m in expected if REGISTRY.get(m).kind is not MethodKind.DERIVED]
        for method in combination:
            assert result.scores[method]["score"] == pytest.approx(reference[method], rel=1e-6), combination


def test_latent_mahalanobis_alone_from_the_command_line(tiny_project, test_images, tmp_path, predict_argv):
    out = tmp_path / "out"
    predict_entry.main(predict_argv(test_images, out, OOD_TRAINER, "--ood", "latent_mahalanobis", "-npp", "0",
                                    "-nps", "0"))
    rows = read_score_rows(str(out))
    assert {r["method"] for r in rows} == {"latent_mahalanobis"} and len(rows) == len(list(test_images.iterdir()))


# ----------------------------------------------------------------------------------------------- inputs, outputs

def _one_case_folder(tiny_project, folder: Path, names: list[str]) -> Path:
    """An input folder with copies of the first ID test image under the given case names."""
    folder.mkdir()
    source = sorted(Path(tiny_project.dataset.images_ts["id"]).iterdir())[0]
    for name in names:
        shutil.copy(source, folder / f"{name}_0000.nii.gz")
    return folder


def test_map_file_that_would_overwrite_another_case_is_refused(tiny_project, tmp_path, fails_with, predict_argv):
    inp = _one_case_folder(tiny_project, tmp_path / "input", ["foo", "foo_ood_mahalanobis"])
    out = tmp_path / "out"
    fails_with(predict_entry.main, predict_argv(inp, out, OOD_TRAINER, "--save_ood_maps"),
               "case foo", "foo_ood_mahalanobis", "--save_ood_maps")
    assert not out.exists()
    predict_entry.main(predict_argv(inp, out, OOD_TRAINER))  # without maps the names are fine
    assert {r["case"] for r in read_score_rows(str(out))} == {"foo", "foo_ood_mahalanobis"}


def test_api_refuses_map_collisions_too(tiny_project, tmp_path):
    import torch

    from nnunet_ood.errors import OODInputError
    from nnunet_ood.inference.predictor import nnUNetOODPredictor

    inp = _one_case_folder(tiny_project, tmp_path / "input", ["bar", "bar_ood_knn"])
    predictor = nnUNetOODPredictor(device=torch.device("cpu"), allow_tqdm=False, save_ood_maps=True)
    predictor.initialize_from_trained_model_folder(str(tiny_project.model(OOD_TRAINER)), [0])
    with pytest.raises(OODInputError, match="would overwrite the outputs of case bar_ood_knn"):
        predictor.predict_from_files_sequential(str(inp), str(tmp_path / "out"))


def _write_image(path: Path, array: np.ndarray, spacing=None, sform=None) -> None:
    import SimpleITK as sitk

    if sform is not None:  # nibabel writes any affine, also ones ITK refuses to read
        image = nib.Nifti1Image(array.T[..., None].astype(np.float32), sform)
        image.set_qform(None)
        image.set_sform(sform, code=1)
        nib.save(image, str(path))
        return
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("kind, needles", [
    ("text", ("cannot read input file", "bad_000_0000.nii.gz", "as an image")),
    ("empty", ("bad_000_0000.nii.gz", "is empty")),
    ("spacing", ("case bad_000", "resample to", "fix the image header's spacing")),
    ("shear", ("case bad_000", "orthonormal")),
    ("channels4d", ("bad_000_0000.nii.gz", "4D image of size (32, 32, 1, 2)", "one image per channel")),
    ("rgb", ("bad_000_0000.nii.gz", "3 values per voxel", "grey-value")),
    ("one_voxel", ("bad_000_0000.nii.gz", "is 1 x 1 voxels", "less than one bottleneck voxel", "4 x 4")),
])
def test_inputs_nnunet_cannot_read_are_refused_up_front(tiny_project, tmp_path, fails_with, predict_argv, kind,
                                                        needles):
    inp = _one_case_folder(tiny_project, tmp_path / "input", ["good_000"])
    bad = inp / "bad_000_0000.nii.gz"
    if kind == "text":
        bad.write_text("this is not an image\n")
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "spacing":
        _write_image(bad, np.ones((32, 32)), spacing=(100.0, 0.001))
    elif kind in ("channels4d", "rgb"):  # IndexError inside nnU-Net ("Background workers died"), a lock, empty tables
        _write_unreadable(bad, kind)
    elif kind == "one_voxel":  # predicted as padding: flagged by the feature methods, accepted by quality
        _write_image(bad, np.ones((1, 1)), spacing=(1.0, 1.0))
    else:
        _write_image(bad, np.ones((32, 32)), sform=np.array([[1, 0.6, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                                             [0, 0, 0, 1.0]]))
    out = tmp_path / "out"
    fails_with(predict_entry.main, predict_argv(inp, out), *needles)
    assert not out.exists()


def _write_unreadable(path: Path, kind: str) -> None:
    """An image nnU-Net's readers cannot take as one channel: a 4D file with two channels, or an RGB image."""
    if kind == "channels4d":
        nib.save(nib.Nifti1Image(np.ones((32, 32, 1, 2), np.float32), np.eye(4)), str(path))
    else:
        rgb = np.zeros((32, 32, 1), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))


@pytest.mark.parametrize("kind, needle", [("channels4d", "4D image of size \\(32, 32, 1, 2\\)"),
                                          ("rgb", "3 values per voxel")])
def test_the_python_api_checks_its_input_images_too(tiny_project, tmp_path, kind, needle):
    """predict_from_files(_sequential) of nnUNetOODPredictor skipped the command line's input checks: a 4D or RGB
    file failed inside nnU-Net (an IndexError, or "Background workers died" with workers), after the output
    folder was made. Now the same one-line error, for a folder and for nnU-Net's list of lists, before anything is
    written."""
    import torch

    from nnunet_ood.errors import OODInputError
    from nnunet_ood.inference.predictor import nnUNetOODPredictor

    inp = _one_case_folder(tiny_project, tmp_path / "input", ["good_000"])
    bad = inp / "bad_000_0000.nii.gz"
    _write_unreadable(bad, kind)
    predictor = nnUNetOODPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(tiny_project.model(OOD_TRAINER)), [0])
    out = tmp_path / "out"
    with pytest.raises(OODInputError, match=f"bad_000_0000.nii.gz of case bad_000 .*{needle}"):
        predictor.predict_from_files_sequential(str(inp), str(out))
    with pytest.raises(OODInputError, match=needle):
        predictor.predict_from_files([[str(inp / "good_000_0000.nii.gz")], [str(bad)]], str(out),
                                     num_processes_preprocessing=1, num_processes_segmentation_export=1)
    assert not out.exists()


@pytest.mark.parametrize("name, damage, needle", [
    ("plans.json", lambda p: p["configurations"].update(other=p["configurations"].pop("2d")), "no configuration '2d'"),
    ("plans.json", lambda p: p["configurations"]["2d"].update(patch_size="16x16"), "patch_size = '16x16'"),
    ("plans.json", lambda p: p["configurations"]["2d"].pop("spacing"), "has no 'spacing'"),
    ("plans.json", None, "cannot read"),
    ("dataset.json", lambda d: d.pop("labels"), "'labels' is missing"),
    ("dataset.json", lambda d: d.pop("file_ending"), "'file_ending' is missing"),
    ("dataset.json", lambda d: d.pop("channel_names"), "'channel_names' is missing"),
])
def test_damaged_model_files_stop_every_command_in_one_line(tiny_project, test_images, tmp_path, fails_with,
                                                            predict_argv, scratch_model, name, damage, needle):
    """A damaged plans.json or dataset.json of the model gave nnU-Net's tracebacks (KeyError, TypeError,
    JSONDecodeError, "configuration not found"); a missing 'spacing' left a half-written output folder, a missing
    channel_names said "the model expects 0 input channel(s)". Now one line naming the file and the fix, before
    anything is written, in nnUNetv2_predict_ood, nnUNetv2_fit_ood and the Python API."""
    import torch

    from nnunet_ood.errors import OODInputError
    from nnunet_ood.inference.predictor import nnUNetOODPredictor

    path = scratch_model / name
    if damage is None:
        path.write_text(path.read_text()[:100])
    else:
        content = json.loads(path.read_text())
        damage(content)
        path.write_text(json.dumps(content))
    out = tmp_path / "out"
    fails_with(predict_entry.main, predict_argv(test_images, out, "nnUNetTrainerOOD_5epochs"), name, needle,
               "restore it")
    assert not out.exists()
    fails_with(fit.main, ["-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerOOD_5epochs",
                          "-device", "cpu"], name, needle)
    with pytest.raises(OODInputError, match=f"{name} is damaged|cannot read .*{name}"):  # the API: the configuration
        nnUNetOODPredictor(device=torch.device("cpu")).initialize_from_trained_model_folder(str(scratch_model), [0])


def copy_test_labels(tiny_project, folder: Path) -> Path:
    """A writable copy of every test domain's reference segmentations in one folder."""
    folder.mkdir()
    for domain in tiny_project.dataset.domains:
        for f in Path(tiny_project.dataset.labels_ts[domain]).iterdir():
            shutil.copy(f, folder / f.name)
    return folder


def calibration_with_labels_is_refused(tiny_project, test_images, labels: Path, tmp_path: Path, fails_with,
                                       *needles: str) -> None:
    """nnUNetv2_calibrate_ood -l LABELS fails in one line naming ``needles``, before anything is written."""
    from nnunet_ood.cli import calibrate

    out = tmp_path / "cal"
    fails_with(calibrate.main, ["-i", str(test_images), "-l", str(labels), "-o", str(out), "-d", "501", "-c", "2d",
                                "-f", "0", "-tr", OOD_TRAINER, "-device", "cpu", "--name", "refused"], *needles)
    assert not out.exists()
    assert not (tiny_project.model(OOD_TRAINER) / "ood_calibrations" / "refused.json").exists()


def test_calibration_references_with_values_outside_the_dataset_are_refused(tiny_project, test_images, tmp_path,
                                                                           fails_with):
    """nnUNetv2_calibrate_ood -l: a reference storing class 1 under 7 gave a wrong Dice silently."""
    import SimpleITK as sitk

    labels = copy_test_labels(tiny_project, tmp_path / "labels")
    bad = next(f for f in sorted(labels.iterdir()) if 1 in sitk.GetArrayFromImage(sitk.ReadImage(str(f))))
    image = sitk.ReadImage(str(bad))
    array = sitk.GetArrayFromImage(image)
    assert set(np.unique(array)) <= {0, 1, 2}
    array[array == 1] = 7
    relabelled = sitk.GetImageFromArray(array)
    relabelled.CopyInformation(image)
    sitk.WriteImage(relabelled, str(bad))
    calibration_with_labels_is_refused(tiny_project, test_images, labels, tmp_path, fails_with, str(bad), "7",
                                       "0, 1, 2")


def test_calibration_references_of_another_size_are_refused_before_predicting(tiny_project, test_images, tmp_path,
                                                                              fails_with):
    """nnUNetv2_calibrate_ood -l with a reference of another shape failed only after predicting every case."""
    import SimpleITK as sitk

    labels = copy_test_labels(tiny_project, tmp_path / "labels")
    bad = sorted(labels.iterdir())[0]
    sitk.WriteImage(sitk.Image([10, 12], sitk.sitkUInt8), str(bad))
    calibration_with_labels_is_refused(tiny_project, test_images, labels, tmp_path, fails_with, str(bad), "(10, 12)",
                                       "give the reference of this image")


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_checkpoint_that_is_no_checkpoint_is_refused(tiny_project, test_images, tmp_path, fails_with, predict_argv,
                                                     scratch_model, damage):
    """-chk a truncated file (RuntimeError: PytorchStreamReader...) or a non-checkpoint (ValueError): one line."""
    path = scratch_model / "fold_0" / "checkpoint_broken.pth"
    source = (scratch_model / "fold_0" / "checkpoint_final.pth").read_bytes()
    path.write_bytes(source[:len(source) // 2] if damage == "truncated" else b"not a checkpoint\n" * 10)
    out = tmp_path / "out"
    fails_with(predict_entry.main, predict_argv(test_images, out, "nnUNetTrainerOOD_5epochs", "-chk", path.name),
               str(path), "-chk")
    assert not out.exists()
    fails_with(fit.main, ["-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerOOD_5epochs",
                          "-device", "cpu", "-chk", path.name], str(path), "-chk")
    assert not (scratch_model / "fold_0" / "ood.tmp").exists()


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_symbolic_links_that_lead_nowhere_are_named(tiny_project, test_images, tmp_path, fails_with, predict_argv,
                                                    kind):
    """A dangling link or a link loop in -i gave FileNotFoundError / OSError [Errno 40] tracebacks."""
    link = test_images / "linked_000_0000.nii.gz"
    if kind == "dangling":
        link.symlink_to(tmp_path / "gone_0000.nii.gz")
    else:
        link.symlink_to(link)
    out = tmp_path / "out"
    fails_with(predict_entry.main, predict_argv(test_images, out), str(link),
               "dangling symbolic link" if kind == "dangling" else "symbolic link loop")
    assert not out.exists()


def test_input_that_is_a_file_is_called_a_file(tiny_project, test_images, tmp_path, fails_with, predict_argv):
    image = next(test_images.iterdir())
    fails_with(predict_entry.main, predict_argv(image, tmp_path / "out"), str(image), "is a file, not a folder")
    assert not (tmp_path / "out").exists()


def test_output_folders_that_cannot_work_are_refused(tiny_project, test_images, tmp_path, fails_with, predict_argv):
    existing_file = tmp_path / "a_file"
    existing_file.write_text("x")
    fails_with(predict_entry.main, predict_argv(test_images, existing_file), "is not a folder")
    before = sorted(p.name for p in test_images.iterdir())
    fails_with(predict_entry.main, predict_argv(test_images, test_images), "is the input folder")
    assert sorted(p.name for p in test_images.iterdir()) == before
    fails_with(predict_entry.main, predict_argv(test_images, Path("/sys/nnunet_ood_test_out")), "cannot write to",
               "writable -o")
    fails_with(predict_entry.main, predict_argv(test_images, existing_file / "sub"), "is not a folder")


def test_paired_input_and_output_folders_are_checked(tiny_project, test_images, tmp_path, fails_with, predict_argv):
    """-i and -o with several folders: one output per input, distinct, none an input; every input checked first."""
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(next(test_images.iterdir()), second)
    a, b = tmp_path / "a", tmp_path / "b"

    def argv(inputs, outputs):
        args = predict_argv(test_images, a)
        i, o = args.index("-i"), args.index("-o")
        return args[:i] + ["-i", *map(str, inputs), "-o", *map(str, outputs)] + args[o + 2:]

    fails_with(predict_entry.main, argv([test_images, second], [a]), "-i has 2 folder(s) but -o has 1")
    fails_with(predict_entry.main, argv([test_images, second], [a, a]), "given twice in -o")
    fails_with(predict_entry.main, argv([test_images, second], [a, test_images]), "is one of the input folders")
    (second / "notes.txt").write_text("not an image")  # the second folder is bad: nothing of the first is written
    shutil.copy(next(test_images.iterdir()), second / "x.nii.gz")
    fails_with(predict_entry.main, argv([test_images, second], [a, b]), str(second))
    assert not a.exists() and not b.exists()


@pytest.mark.parametrize("extra, needle", [
    (["-step_size", "0"], "-step_size"), (["-step_size", "2"], "-step_size"), (["-step_size", "-0.5"], "-step_size"),
    (["-step_size", "1e-9"], "less than one voxel"),  # asked nnU-Net for billions of windows
    (["-num_parts", "0"], "-num_parts must be at least 1"),
    (["-npp", "-1"], "-npp and -nps must be in 0.."),  # ran as -npp 1
    (["-nps", "10000"], "-npp and -nps must be in 0.."),  # spawned workers until the machine ran out of memory
    (["-num_parts", "2", "-part_id", "1", "-npp", "0", "-nps", "0"], "multiprocessing"),
    (["--ood", "foo"], "unknown OOD method 'foo'; the known methods are mahalanobis"),
    (["-device", "tpu"], "-device"),
    (["--calibration", "../../x"], "--calibration '../../x'"),  # said --name
])
def test_argument_errors(tiny_project, test_images, tmp_path, fails_with, predict_argv, extra, needle):
    out = tmp_path / "out"
    fails_with(predict_entry.main, predict_argv(test_images, out, OOD_TRAINER, *extra), needle)
    assert not out.exists()


def test_score_tables_keep_the_cases_of_earlier_runs_into_the_folder(tiny_project, test_images, tmp_path,
                                                                     predict_argv, capsys):
    """Folder A, then folder B into the same -o with the same settings: the tables held B's cases only."""
    images = sorted(test_images.iterdir())
    folders = {"A": tmp_path / "A", "B": tmp_path / "B"}
    for name, files in (("A", images[:2]), ("B", images[2:4])):
        folders[name].mkdir()
        for f in files:
            shutil.copy(f, folders[name] / f.name)
    cases = {name: {f.name[:-len("_0000.nii.gz")] for f in folder.iterdir()} for name, folder in folders.items()}
    out = tmp_path / "out"
    sequential = ("-npp", "0", "-nps", "0")
    predict_entry.main(predict_argv(folders["A"], out, OOD_TRAINER, *sequential))
    first = {(r["case"], r["method"]): r["score"] for r in read_score_rows(str(out))}
    assert json.loads((out / "ood_scores.json").read_text())["input_folder"] == str(folders["A"])
    predict_entry.main(predict_argv(folders["B"], out, OOD_TRAINER, *sequential))
    rows = read_score_rows(str(out))
    assert {r["case"] for r in rows} == cases["A"] | cases["B"]
    assert {(r["case"], r["method"]): r["score"] for r in rows if r["case"] in cases["A"]} == first
    document = json.loads((out / "ood_scores.json").read_text())
    assert {r["case"] for r in document["scores"]} == cases["A"] | cases["B"]
    assert document["input_folder"] is None  # two input folders
    # other settings: their records are not mixed with these, and the cases left out are named
    capsys.readouterr()
    predict_entry.main(predict_argv(folders["B"], out, OOD_TRAINER, *sequential, "--ood", "mahalanobis"))
    assert {r["case"] for r in read_score_rows(str(out))} == cases["B"]
    printed = capsys.readouterr().out
    assert f"warning: {len(cases['A'])} case(s) in {out} were scored with other settings" in printed
    assert all(case in printed for case in cases["A"])


def test_empty_segmentation_file_is_redone_by_continue_prediction(tiny_project, test_images, tmp_path, predict_argv):
    out = tmp_path / "out"
    predict_entry.main(predict_argv(test_images, out))
    victim = sorted(out.glob("*.nii.gz"))[0]
    victim.write_bytes(b"")  # what a writer killed mid-way leaves
    predict_entry.main(predict_argv(test_images, out, OOD_TRAINER, "--continue_prediction"))
    assert victim.stat().st_size > 0


def test_a_case_failing_inside_nnunet_is_named_and_the_tables_of_the_others_are_written(
        tiny_project, test_images, tmp_path, fails_with, predict_argv, monkeypatch):
    from nnunet_ood.inference.predictor import nnUNetOODPredictor

    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in test_images.iterdir())
    original = nnUNetOODPredictor.predict_logits_from_preprocessed_data
    calls = []

    def fail_on_third(self, data):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure inside nnU-Net")
        return original(self, data)

    monkeypatch.setattr(nnUNetOODPredictor, "predict_logits_from_preprocessed_data", fail_on_third)
    out = tmp_path / "out"
    fails_with(predict_entry.main, predict_argv(test_images, out, OOD_TRAINER, "-npp", "0", "-nps", "0"),
               f"prediction stopped at case {cases[2]}", "simulated failure", "--continue_prediction")
    assert sorted({r["case"] for r in read_score_rows(str(out))}) == cases[:2]


def test_killed_prediction_leaves_no_worker_processes(tiny_project, test_images, tmp_path, predict_argv):
    """SIGKILL of nnUNetv2_predict_ood takes its preprocessing, manager and export workers with it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def children(pid: int) -> set[int]:
        found = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == pid:
                    found.add(int(entry))
        return found

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    source = next(test_images.iterdir())
    for i in range(60):  # enough cases that the workers are busy when the command is killed
        shutil.copy(source, test_images / f"extra_{i:03d}_0000.nii.gz")
    exe = str(Path(sys.executable).parent / "nnUNetv2_predict_ood")
    argv = predict_argv(test_images, tmp_path / "out", OOD_TRAINER, "-npp", "3", "-nps", "3", "--save_ood_maps")
    proc = subprocess.Popen([exe, *argv], env=tiny_project.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    deadline = time.time() + 120
    while time.time() < deadline and len(workers) < 7 and proc.poll() is None:  # tracker, 3 + 3 workers, manager
        workers |= children(proc.pid)
        time.sleep(0.2)
    time.sleep(1)
    workers |= children(proc.pid)
    assert proc.poll() is None and len(workers) >= 7, f"the workers did not start: {workers}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    alive = workers
    while alive and time.time() < deadline:
        alive = {pid for pid in alive if os.path.exists(f"/proc/{pid}") and
                 open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"}
        time.sleep(0.2)
    assert not alive, f"orphaned worker processes: {sorted(alive)}"


def test_trainer_folder_is_found_without_the_export(tiny_project, test_images, tmp_path, predict_argv, monkeypatch):
    import torch

    from nnunet_ood.errors import OODInputError
    from nnunet_ood.inference.predictor import nnUNetOODPredictor

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    predictor = nnUNetOODPredictor(device=torch.device("cpu"), allow_tqdm=False)
    with pytest.raises(OODInputError, match="cannot find the trainer class .*nnUNetv2_ood_trainer_dir"):
        predictor.initialize_from_trained_model_folder(str(tiny_project.model(OOD_TRAINER)), [0])
    predict_entry.main(predict_argv(test_images, tmp_path / "out"))  # the command adds the folder itself
    assert (tmp_path / "out" / "ood_scores.csv").is_file()


def test_calibration_into_a_folder_with_earlier_cases_uses_only_its_own(tiny_project, test_images, tmp_path,
                                                                        predict_argv):
    """The score table of -o keeps earlier cases of the same settings; the calibration must come from -i's only."""
    from nnunet_ood.cli import calibrate

    images = sorted(test_images.iterdir())
    folders = {"A": tmp_path / "A", "B": tmp_path / "B"}
    for name, files in (("A", images[:3]), ("B", images[3:5])):
        folders[name].mkdir()
        for f in files:
            shutil.copy(f, folders[name] / f.name)
    out = tmp_path / "out"
    predict_entry.main(predict_argv(folders["B"], out, OOD_TRAINER, "-npp", "0", "-nps", "0"))
    calibrate.main(["-i", str(folders["A"]), "-o", str(out), "-d", "501", "-c", "2d", "-f", "0", "-tr", OOD_TRAINER,
                    "-device", "cpu", "-npp", "0", "-nps", "0", "--name", "onlyA", "--disable_progress_bar"])
    stored = json.loads((tiny_project.model(OOD_TRAINER) / "ood_calibrations" / "onlyA.json").read_text())
    expected = {f.name[:-len("_0000.nii.gz")] for f in folders["A"].iterdir()}
    assert all(set(scores) == expected for scores in stored["case_scores"].values())
    in_table = {r["case"] for r in read_score_rows(str(out))}
    assert in_table > expected  # the folder's table does hold B's cases too
