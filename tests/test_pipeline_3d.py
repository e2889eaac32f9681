"""``3d_fullres`` end to end: a tiny anisotropic 3D dataset with a rotated direction matrix.

Trains ``nnUNetTrainerOOD_smoke`` on it, then checks against stock ``nnUNetv2_predict`` and against the
input images' geometry, including a test case at another spacing (nnU-Net resamples it there and back).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ood.cli import predict as predict_entry
from nnunet_ood.io.score_reader import read_score_rows

DATASET_ID_3D = 503
NAME_3D = f"Dataset{DATASET_ID_3D}_Tiny3D"
TRAINER = "nnUNetTrainerOOD_smoke"
SPACING = (0.9, 0.8, 3.0)  # SimpleITK order (x, y, z): thick slices
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated 90 degrees in-plane
ORIGIN = (-12.0, 40.0, 7.5)


def _volume(rng: np.random.Generator, shape: tuple[int, int, int], shifted: bool = False):
    """A bright ellipsoid (label 1) in a darker, noisy background; (z, y, x) arrays."""
    zz, yy, xx = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
    c = [s * rng.uniform(0.4, 0.6) for s in shape]
    r = [s * rng.uniform(0.2, 0.3) for s in shape]
    label = (((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1).astype(np.uint8)
    image = 100.0 + 80.0 * label + rng.normal(0, 8, shape)
    if shifted:  # another "scanner": inverted contrast, strong noise, steep bias along x
        image = (300.0 - 1.5 * image) * np.linspace(0.3, 2.5, shape[2])[None, None, :] + rng.normal(0, 60, shape)
    return image.astype(np.float32), label


def _write(array: np.ndarray, path: Path, spacing=SPACING) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(DIRECTION)
    image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def project_3d(tiny_project, run_command, shrink_plans) -> dict[str, Path]:
    raw = tiny_project.root / "raw" / NAME_3D
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True)
    rng = np.random.default_rng(3)
    n_train = 12
    for i in range(n_train):
        image, label = _volume(rng, (10, 20, 24))
        _write(image, raw / "imagesTr" / f"tr_{i:03d}_0000.nii.gz")
        _write(label, raw / "labelsTr" / f"tr_{i:03d}.nii.gz")
    for i in range(2):
        _write(_volume(rng, (10, 20, 24))[0], raw / "imagesTs" / f"id_{i:03d}_0000.nii.gz")
    _write(_volume(rng, (10, 20, 24), shifted=True)[0], raw / "imagesTs" / "shifted_000_0000.nii.gz")
    # (detection itself is asserted in 2D: a 3D network trained for 12 iterations is too random for it)
    # another spacing and size: resampled to the plans' spacing and back by nnU-Net
    _write(_volume(rng, (8, 22, 20))[0], raw / "imagesTs" / "respaced_000_0000.nii.gz", spacing=(1.0, 0.7, 3.6))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "blob": 1}, "numTraining": n_train,
        "file_ending": ".nii.gz"}))
    plan_env = {k: v for k, v in tiny_project.env.items() if k != "nnUNet_n_proc_DA"}
    run_command(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID_3D), "-c", "3d_fullres", "-np", "1"], plan_env)
    # 8x16x16 patches: several per case; bottleneck 16 x 2 x 2 x 2 = 128 features
    shrink_plans(tiny_project.root / "preprocessed", NAME_3D, "3d_fullres", [8, 16, 16], [4, 8, 16, 16],
                 [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
    run_command(["nnUNetv2_train", str(DATASET_ID_3D), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"],
        tiny_project.env)
    return {"images": raw / "imagesTs"}


def test_3d_fullres_matches_stock_and_maps_keep_input_geometry(tiny_project, project_3d, tmp_path, run_command,
                                                               read_map):
    images = project_3d["images"]
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    common = ["-i", str(images), "-d", str(DATASET_ID_3D), "-c", "3d_fullres", "-f", "0", "-tr", TRAINER,
              "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    predict_entry.main(["-o", str(ours), *common, "--save_ood_maps"])
    run_command(["nnUNetv2_predict", "-o", str(stock), *common], tiny_project.env)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in images.iterdir())
    for case in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(ours / f"{case}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(stock / f"{case}.nii.gz")))
        np.testing.assert_array_equal(a, b)
        values = read_map(images / f"{case}_0000.nii.gz", ours / f"{case}_ood_mahalanobis.nii.gz")
        assert np.isfinite(values).all() and values.max() > 0
    scores = {r["case"]: r["score"] for r in read_score_rows(str(ours))}
    assert sorted(scores) == cases and all(np.isfinite(v) and v > 0 for v in scores.values())


def test_3d_map_selection_writes_only_named_maps_with_the_same_scores(tiny_project, project_3d, tmp_path,
                                                                       read_map, fails_with, capsys):
    """``--save_ood_maps METHOD ...``: only those maps, equal to the all-maps run's, and the same scores; the
    record says which maps; resuming does not ask for the maps nobody named; bad names fail before predicting."""
    images = project_3d["images"]
    common = ["-i", str(images), "-d", str(DATASET_ID_3D), "-c", "3d_fullres", "-f", "0", "-tr", TRAINER,
              "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar"]
    every, some = tmp_path / "every", tmp_path / "some"
    predict_entry.main(["-o", str(every), *common, "--save_ood_maps"])
    predict_entry.main(["-o", str(some), *common, "--save_ood_maps", "max_softmax", "mahalanobis"])
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in images.iterdir())
    written = sorted(p.name for p in some.glob("*_ood_*.nii.gz"))
    assert written == sorted(f"{c}_ood_{m}.nii.gz" for c in cases for m in ("mahalanobis", "max_softmax"))
    assert len(list(every.glob("*_ood_*.nii.gz"))) > len(written)  # the bare flag writes every method's map
    for case in cases:
        for method in ("mahalanobis", "max_softmax"):
            image, name = images / f"{case}_0000.nii.gz", f"{case}_ood_{method}.nii.gz"
            np.testing.assert_array_equal(read_map(image, some / name), read_map(image, every / name))
    rows = {(r["case"], r["method"]): r["score"] for r in read_score_rows(str(every))}
    assert rows == {(r["case"], r["method"]): r["score"] for r in read_score_rows(str(some))}
    assert json.loads((some / "ood_scores.json").read_text())["ood_maps"]["methods"] == ["mahalanobis", "max_softmax"]
    # resuming: a case is complete without the maps nobody named; a missing named map makes it incomplete
    (some / f"{cases[0]}_ood_mahalanobis.nii.gz").unlink()
    capsys.readouterr()
    predict_entry.main(["-o", str(some), *common, "--save_ood_maps", "mahalanobis", "max_softmax",
                        "--continue_prediction"])
    assert "That's 1 cases." in capsys.readouterr().out
    assert (some / f"{cases[0]}_ood_mahalanobis.nii.gz").is_file()
    fails_with(predict_entry.main, ["-o", str(tmp_path / "q"), *common, "--save_ood_maps", "quality"],
               "--save_ood_maps quality", "without a voxel map")
    fails_with(predict_entry.main, ["-o", str(tmp_path / "k"), *common, "--ood", "mahalanobis", "--save_ood_maps",
                                    "entropy"], "--save_ood_maps entropy", "add it to --ood")
    fails_with(predict_entry.main, ["-o", str(tmp_path / "u"), *common, "--save_ood_maps", "nosuch"],
               "unknown OOD method 'nosuch'")
