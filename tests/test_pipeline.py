"""End to end on a tiny real nnU-Net project: train with nnUNetTrainerOOD, fit post hoc, predict with OOD.

The reference for segmentations is stock ``nnUNetv2_predict``; the reference for scores is the
detector applied by hand to features pulled out of the network, or simple identities (fold averages,
mirroring invariance) that an independent computation fixes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from nnunet_ood.cli import predict as predict_entry
from nnunet_ood.io.score_reader import read_score_rows
from nnunet_ood.methods import DEFAULT_FIT_METHODS

OOD_TRAINER = "nnUNetTrainerOOD_smoke"
STOCK_TRAINER = "nnUNetTrainer_1epoch"


def predict_ood(out: Path, inp: Path, *extra: str, trainer: str = OOD_TRAINER) -> None:
    predict_entry.main(["-i", str(inp), "-o", str(out), "-d", "501", "-c", "2d", "-f", "0",
                        "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar",
                        *extra])


def scores_by_case(folder: Path) -> dict[str, float]:
    return {r["case"]: r["score"] for r in read_score_rows(str(folder))
            if r["method"] == "mahalanobis"}


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_trainer_fits_state_at_end_of_training(tiny_project):
    ood_dir = tiny_project.model(OOD_TRAINER) / "fold_0" / "ood"
    manifest = json.loads((ood_dir / "ood_state.json").read_text())
    assert (ood_dir / "mahalanobis.safetensors").is_file()
    assert manifest["fingerprint"]["fold"] == "0" and manifest["fingerprint"]["configuration"] == "2d"
    calibration = manifest["methods"]["mahalanobis"]["calibration"]
    val = list(manifest["provenance"]["val_case_scores"]["mahalanobis"].values())
    assert len(val) == manifest["provenance"]["n_val_cases"]
    n_cases = len(list(Path(tiny_project.dataset.images_tr).glob("*_0000.nii.gz")))
    assert manifest["provenance"]["n_train_cases"] + len(val) == n_cases
    assert manifest["provenance"]["normalization_cases"] == 0
    # by default every bound comes from the validation cases (out of sample; no training case is re-scored)
    assert calibration["low"] == pytest.approx(min(val))
    assert calibration["high"] == pytest.approx(2 * max(val))
    rank = min(math.ceil((len(val) + 1) * 0.95), len(val))  # finite-sample quantile of the validation scores
    assert calibration["threshold"] == sorted(val)[rank - 1]
    assert manifest["provenance"]["train_case_scores"] == {}


def test_predict_matches_stock_segmentation_and_writes_tables(tiny_project, test_images, tmp_path, run_command,
                                                              read_map):
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    predict_ood(ours, test_images, "--save_ood_maps")
    run_command(["nnUNetv2_predict", "-i", str(test_images), "-o", str(stock), "-d", "501", "-c", "2d",
                 "-f", "0",
         "-tr", OOD_TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"], tiny_project.env)
    cases = sorted(tiny_project.dataset.case_domain)
    for case in cases:
        np.testing.assert_array_equal(read_array(ours / f"{case}.nii.gz"), read_array(stock / f"{case}.nii.gz"))
    rows = read_score_rows(str(ours))
    methods = list(DEFAULT_FIT_METHODS)  # every fitted method by default, in table order
    assert [(r["case"], r["method"]) for r in rows] == [(c, m) for c in cases for m in methods]
    assert all(0 <= r["normalized"] <= 1 for r in rows)
    document = json.loads((ours / "ood_scores.json").read_text())
    assert document["folds"] == ["0"] and document["checkpoint"] == "checkpoint_final.pth"
    assert all(set(document["calibration"][m]) >= {"low", "high", "threshold"} for m in methods)
    assert document["plugin_version"] and document["model_folder"].endswith(f"{OOD_TRAINER}__nnUNetPlans__2d")
    assert document["input_folder"] == os.path.abspath(test_images)
    assert all(r["ood"] == (r["score"] > document["calibration"][r["method"]]["threshold"]) for r in rows)
    # maps: one per case and method with maps (quality, derived from the others, has none), in the input's geometry
    assert not list(ours.glob("*_ood_quality*"))
    for case in cases:
        for method in (m for m in methods if m != "quality"):
            values = read_map(test_images / f"{case}_0000.nii.gz",
                                                ours / f"{case}_ood_{method}.nii.gz")
            assert np.isfinite(values).all()


def test_strong_shift_scores_above_every_id_case(tiny_project, tmp_path):
    inp = tmp_path / "input"
    inp.mkdir()
    id_cases = tiny_project.dataset.cases("id")
    for f in Path(tiny_project.dataset.images_ts["id"]).iterdir():
        shutil.copy(f, inp / f.name)
    # a strongly shifted copy of an ID case: heavy noise and a steep multiplicative bias field
    image = sitk.ReadImage(str(inp / f"{id_cases[0]}_0000.nii.gz"))
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    rng = np.random.default_rng(1)
    ramp = np.linspace(0.2, 3.0, arr.shape[-1])[None, :]
    shifted = arr * ramp + rng.normal(0, 3 * arr.std(), arr.shape)
    out_image = sitk.GetImageFromArray(shifted.astype(np.float32))
    out_image.CopyInformation(image)
    sitk.WriteImage(out_image, str(inp / "shifted_000_0000.nii.gz"))
    predict_ood(tmp_path / "out", inp)
    scores = scores_by_case(tmp_path / "out")
    assert scores["shifted_000"] > max(scores[c] for c in id_cases)


def test_scores_ignore_mirroring_and_sequential_mode_matches(tiny_project, test_images, tmp_path):
    predict_ood(tmp_path / "tta", test_images)
    predict_ood(tmp_path / "notta", test_images, "--disable_tta")
    predict_ood(tmp_path / "seq", test_images, "--save_ood_maps", "-npp", "0", "-nps", "0")
    tta, notta, seq = (scores_by_case(tmp_path / name) for name in ("tta", "notta", "seq"))
    for case in tta:
        assert tta[case] == pytest.approx(notta[case], rel=1e-5)
        assert tta[case] == pytest.approx(seq[case], rel=1e-5)
    assert len(list((tmp_path / "seq").glob("*_ood_mahalanobis.nii.gz"))) == len(tta)


def test_parts_and_continue_prediction_complete_the_tables(tiny_project, test_images, tmp_path):
    out = tmp_path / "out"
    predict_ood(out, test_images, "-num_parts", "2", "-part_id", "0")
    predict_ood(out, test_images, "-num_parts", "2", "-part_id", "1")
    full = scores_by_case(out)
    assert sorted(full) == sorted(tiny_project.dataset.case_domain)
    # lose one case's OOD record: --continue_prediction redoes exactly that case
    victim = sorted(full)[0]
    (out / "ood_cases" / f"{victim}.json").unlink()
    (out / "ood_scores.csv").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    predict_ood(out, test_images, "--continue_prediction")
    again = scores_by_case(out)
    assert again == pytest.approx(full, rel=1e-6)
    changed = [n for n, t in mtimes.items() if (out / n).stat().st_mtime_ns != t]
    assert changed == [f"{victim}.nii.gz"]


def test_post_hoc_fit_of_stock_trainer_and_fold_ensemble(tiny_project, test_images, tmp_path, run_command):
    model = tiny_project.model(STOCK_TRAINER)
    # fold 1: same weights copied, fitted on fold 1's own training cases -> a different detector
    shutil.copytree(model / "fold_0", model / "fold_1", ignore=shutil.ignore_patterns("ood"))
    run_command(["nnUNetv2_fit_ood", "-d", "501", "-c", "2d", "-f", "0", "1", "-tr", STOCK_TRAINER,
         "-device", "cpu", "--disable_progress_bar", "--ood", "mahalanobis"], tiny_project.env)
    assert (model / "fold_0" / "ood" / "ood_state.json").is_file()
    run_command(["nnUNetv2_predict_ood", "-i", str(test_images), "-o", str(tmp_path / "f0"), "-d", "501",
         "-c", "2d", "-f", "0", "-tr", STOCK_TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1",
         "--disable_progress_bar"], tiny_project.env)
    predict_ood(tmp_path / "f1", test_images, "-f", "1", trainer=STOCK_TRAINER)
    predict_ood(tmp_path / "f01", test_images, "-f", "0", "1", trainer=STOCK_TRAINER)
    f0, f1, f01 = (scores_by_case(tmp_path / n) for n in ("f0", "f1", "f01"))
    # maps and case means are linear in the patch scores, so averaging per patch = averaging cases
    for case in f01:
        assert f01[case] == pytest.approx((f0[case] + f1[case]) / 2, rel=1e-5)
    assert any(not math.isclose(f0[c], f1[c], rel_tol=1e-3) for c in f0)

    # adding sd later keeps the fitted mahalanobis state as it is
    ood = model / "fold_0" / "ood"
    before = load_file(str(ood / "mahalanobis.safetensors"))
    kept_provenance = json.loads((ood / "ood_state.json").read_text())["provenance"]["val_case_scores"]
    run_command(["nnUNetv2_fit_ood", "-d", "501", "-c", "2d", "-f", "0", "-tr", STOCK_TRAINER, "-device", "cpu",
         "--disable_progress_bar", "--ood", "sd", "--sd_latent", "8", "--sd_iterations", "5", "--sd_max_epochs", "2",
         "--sd_val_batches", "1"], tiny_project.env)
    manifest = json.loads((ood / "ood_state.json").read_text())
    assert list(manifest["methods"]) == ["mahalanobis", "sd", "latent_mahalanobis"]
    after = load_file(str(ood / "mahalanobis.safetensors"))
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    # ... and its provenance: the validation case scores of mahalanobis are those of its own fit
    assert manifest["provenance"]["val_case_scores"]["mahalanobis"] == kept_provenance["mahalanobis"]
    assert manifest["provenance"]["train_case_scores"] == {}
    assert set(manifest["provenance"]["val_case_scores"]) == {"mahalanobis", "sd", "latent_mahalanobis"}
    assert manifest["provenance"]["sd_training"]["config"]["latent_dim"] == 8
    assert manifest["provenance"]["sd_training"]["epochs_run"] == 2
    # each pass's seconds (latent_mahalanobis: an encoder pass over the training patches; no failure table)
    seconds = manifest["provenance"]["pass_seconds"]
    assert set(seconds) == {"features", "validation"} and seconds["features"] > 0 and seconds["validation"] > 0
    assert seconds["features"] + seconds["validation"] < manifest["provenance"]["fit_seconds"]

    # the case aggregation is chosen at fit time, stored with the calibration and used at inference
    run_command(["nnUNetv2_fit_ood", "-d", "501", "-c", "2d", "-f", "0", "-tr", STOCK_TRAINER, "-device", "cpu",
         "--disable_progress_bar", "--ood", "entropy", "knn", "--ood_aggregation", "entropy=foreground_mean",
         "knn=max_patch"], tiny_project.env)
    calibration = json.loads((ood / "ood_state.json").read_text())["methods"]
    assert calibration["entropy"]["calibration"]["aggregation"] == "foreground_mean"
    assert calibration["knn"]["calibration"]["aggregation"] == "max_patch"
    assert calibration["mahalanobis"]["calibration"]["aggregation"] == "mean"
    predict_ood(tmp_path / "agg", test_images, "--ood", "entropy", "knn", trainer=STOCK_TRAINER)
    document = json.loads((tmp_path / "agg" / "ood_scores.json").read_text())
    assert document["calibration"]["entropy"]["aggregation"] == "foreground_mean"


def test_site_calibration_end_to_end(tiny_project, test_images, tmp_path, capsys):
    """nnUNetv2_calibrate_ood on a site's ID images; nnUNetv2_predict_ood --calibration flags with its thresholds."""
    from nnunet_ood.cli import calibrate

    site_images = tmp_path / "site"
    shutil.copytree(tiny_project.dataset.images_ts["id"], site_images)
    for f in sorted(Path(tiny_project.dataset.images_ts["shift_mild"]).iterdir()):  # more cases for the rank rule
        shutil.copy(f, site_images / f"mild_{f.name}")
    common = ["-d", "501", "-c", "2d", "-f", "0", "-tr", OOD_TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1",
              "--disable_progress_bar"]
    calibrate.main(["-i", str(site_images), "--name", "siteA", "--false_alarm_rate", "0.1",
                    "-o", str(tmp_path / "cal"), *common])
    out = capsys.readouterr().out
    assert "calibration siteA written to" in out and "too few for a false-alarm rate of 0.1 (needs 9)" in out
    stored = json.loads((tiny_project.model(OOD_TRAINER) / "ood_calibrations" / "siteA.json").read_text())
    cal_rows = read_score_rows(str(tmp_path / "cal"))
    scores = sorted(r["score"] for r in cal_rows if r["method"] == "mahalanobis")
    assert len(scores) == 6 and stored["model"]["folds"] == ["0"] and stored["settings"]["tile_step_size"] == 0.5
    rank = min(math.ceil(7 * 0.9), 6)  # 7 > 6 cases: too few for 0.1, the largest score
    assert stored["calibration"]["mahalanobis"]["threshold"] == scores[rank - 1]
    assert stored["calibration"]["mahalanobis"]["low"] == scores[0]

    predict_ood(tmp_path / "pred", test_images, "--calibration", "siteA")
    document = json.loads((tmp_path / "pred" / "ood_scores.json").read_text())
    assert document["calibration_source"] == "siteA"
    assert document["calibration"]["mahalanobis"]["threshold"] == scores[rank - 1]
    rows = read_score_rows(str(tmp_path / "pred"))
    assert all(r["ood"] == (r["score"] > document["calibration"][r["method"]]["threshold"]) for r in rows)
    capsys.readouterr()
    predict_ood(tmp_path / "pred2", test_images, "--calibration", "siteA", "-step_size", "0.25")
    assert "warning: predicting with other settings than calibration siteA (tile_step_size 0.5 -> 0.25)" in \
        capsys.readouterr().out
    with pytest.raises(SystemExit):
        predict_ood(tmp_path / "pred3", test_images, "--calibration", "nope")
    assert "no calibration named nope" in capsys.readouterr().err and not (tmp_path / "pred3").exists()
    with pytest.raises(SystemExit):  # an existing name is not replaced silently
        calibrate.main(["-i", str(site_images), "--name", "siteA", *common])
    assert "pass --overwrite" in capsys.readouterr().err


def test_several_input_folders_in_one_run_match_separate_runs(tiny_project, tmp_path, capsys):
    """-i A B -o X Y: one model load, and every file as if each folder had been predicted on its own."""
    folders = {}
    for domain in ("id", "shift_strong"):
        folders[domain] = tmp_path / f"in_{domain}"
        shutil.copytree(tiny_project.dataset.images_ts[domain], folders[domain])
    joint = [tmp_path / f"joint_{d}" for d in folders]
    predict_entry.main(["-i", *map(str, folders.values()), "-o", *map(str, joint), "-d", "501", "-c", "2d",
                        "-f", "0", "-tr", OOD_TRAINER, "-device", "cpu", "-npp", "0", "-nps", "0",
                        "--disable_progress_bar"])
    printed = capsys.readouterr().out
    for domain, out in zip(folders, joint):
        alone = tmp_path / f"alone_{domain}"
        predict_ood(alone, folders[domain], "-npp", "0", "-nps", "0")
        cases = sorted(c for c, d in tiny_project.dataset.case_domain.items() if d == domain)
        assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in cases)
        for case in cases:
            np.testing.assert_array_equal(read_array(out / f"{case}.nii.gz"), read_array(alone / f"{case}.nii.gz"))
            assert f"OOD {case}: " in printed  # the line per scored case that progress bars count
        joint_rows = read_score_rows(str(out))
        alone_rows = read_score_rows(str(alone))
        assert [(r["case"], r["method"], r["ood"]) for r in joint_rows] == \
            [(r["case"], r["method"], r["ood"]) for r in alone_rows]
        assert [r["score"] for r in joint_rows] == pytest.approx([r["score"] for r in alone_rows], rel=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prediction_matches_cpu(tiny_project, test_images, tmp_path):
    """-device cuda (maps accumulated on the GPU, float64 statistics there) gives the CPU's scores and maps."""
    predict_ood(tmp_path / "cpu", test_images, "--save_ood_maps")
    predict_ood(tmp_path / "cuda", test_images, "--save_ood_maps", "-device", "cuda")
    cpu, gpu = (read_score_rows(str(tmp_path / name)) for name in ("cpu", "cuda"))
    assert [(r["case"], r["method"]) for r in cpu] == [(r["case"], r["method"]) for r in gpu]
    for a, b in zip(cpu, gpu):
        assert b["score"] == pytest.approx(a["score"], rel=1e-3, abs=1e-5), (a["case"], a["method"])
    for case in sorted(tiny_project.dataset.case_domain):
        seg_cpu, seg_gpu = (read_array(tmp_path / name / f"{case}.nii.gz") for name in ("cpu", "cuda"))
        assert (seg_cpu == seg_gpu).mean() > 0.999
        np.testing.assert_allclose(read_array(tmp_path / "cuda" / f"{case}_ood_mahalanobis.nii.gz"),
                                   read_array(tmp_path / "cpu" / f"{case}_ood_mahalanobis.nii.gz"), rtol=1e-3,
                                   atol=1e-4)


def test_predictor_holds_the_mahalanobis_factor_only(preprocessed_case, tiny_project):
    """A prediction never refits: the loaded Mahalanobis detector keeps its mean and Cholesky factor, releases the
    fit's D x D scatter matrix, and scores exactly as the full state read again from the fold's folder."""
    from nnunet_ood.fold_state import load_fold_state

    predictor, _ = preprocessed_case(["mahalanobis"], "id")
    held = predictor.ood_states[0].detectors["mahalanobis"]
    assert held.statistics.scatter.numel() == 0
    full = load_fold_state(str(tiny_project.model(OOD_TRAINER) / "fold_0"), None, ["mahalanobis"]).detectors
    full = full["mahalanobis"]
    assert full.statistics.scatter.shape == (full.n_features_in_,) * 2  # the file still has the statistics
    x = torch.randn(7, full.n_features_in_, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(held.score(x), full.score(x), rtol=0, atol=0)
