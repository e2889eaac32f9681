"""``--ood_maps_dtype``: int16 and uint8 maps read back, by any NIfTI reader, as the float map within the
documented bound, in exactly the float32 map's geometry, and in smaller files; bad choices are refused first.

References are computed here independently: the float map we hand to the writer, its finite min/max for the
int16 bound, and :func:`nnunet_ood.normalization.normalize` of each voxel's float for uint8.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_ood.calibration import MethodCalibration
from nnunet_ood.cli import predict as predict_entry
from nnunet_ood.errors import OODInputError
from nnunet_ood.io.map_dtypes import check_map_dtype, normalization_bounds
from nnunet_ood.io.maps import write_float_image, write_map_image
from nnunet_ood.io.score_reader import read_score_rows
from nnunet_ood.normalization import normalize

RNG = np.random.default_rng(3)
READERS = [SimpleITKIO, NibabelIO, NibabelIOWithReorient]


def _input(path: Path, reader: type) -> None:
    """A 3D input image with a non-trivial geometry (as nnU-Net would read it with ``reader``)."""
    if reader is SimpleITKIO:
        image = sitk.GetImageFromArray(RNG.normal(size=(5, 7, 9)).astype(np.float32))
        image.SetSpacing((0.7, 0.9, 2.5))
        image.SetOrigin((3.0, -4.0, 12.0))
        image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(image, str(path))
    else:
        affine = np.array([[0.0, -0.8, 0.0, 10.0], [0.9, 0.0, 0.0, -3.0], [0.0, 0.0, 2.0, 5.0], [0, 0, 0, 1]])
        nibabel.save(nibabel.Nifti1Image(RNG.normal(size=(9, 7, 5)).astype(np.float32), affine), str(path))


def _same_geometry(path: Path, reference: Path) -> None:
    a, b = sitk.ReadImage(str(reference)), sitk.ReadImage(str(path))
    assert b.GetSize() == a.GetSize()
    assert b.GetOrigin() == a.GetOrigin() and b.GetSpacing() == a.GetSpacing()
    assert b.GetDirection() == a.GetDirection()


def _unscaled(path: Path) -> np.ndarray:
    return np.asanyarray(nibabel.load(str(path)).dataobj.get_unscaled())


def _half_step(values: np.ndarray) -> float:
    """The documented int16 bound, (max - min) / 131068, plus float32 rounding of the value read back."""
    finite = values[np.isfinite(values)]
    lo, hi = float(finite.min()), float(finite.max())
    return (hi - lo) / (2 * 65534) + 2 * float(np.spacing(np.float32(max(abs(lo), abs(hi)))))


def _normalized(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.array([normalize(float(v), low, high) for v in values.ravel()]).reshape(values.shape)


def _no_temporaries(folder: Path) -> None:
    assert not list(folder.glob(".tmp-*"))


@pytest.mark.parametrize("reader", READERS, ids=lambda c: c.__name__)
def test_int16_reads_back_within_half_a_step_in_the_float_maps_geometry(tmp_path, reader) -> None:
    source = tmp_path / "case_0000.nii.gz"
    _input(source, reader)
    data, properties = reader().read_images([str(source)])
    ood_map = (RNG.random(data.shape[1:]) * 7 - 2).astype(np.float32)
    ood_map[0, 1, 2] = np.nan  # an image with NaN gives NaN voxels
    ref, out = tmp_path / "case_ood_m_f32.nii.gz", tmp_path / "case_ood_m.nii.gz"
    write_float_image(ood_map, str(ref), properties, reader)
    write_map_image(ood_map, str(out), properties, reader, "int16")
    _same_geometry(out, ref)
    finite = np.isfinite(ood_map)
    bound = _half_step(ood_map)
    lo, hi = float(ood_map[finite].min()), float(ood_map[finite].max())
    # nnU-Net's own reader (the plans' class) applies scl_slope/scl_inter...
    back = reader().read_images([str(out)])[0][0]
    assert np.abs(back[finite] - ood_map[finite]).max() <= bound
    assert back[~finite][0] == pytest.approx(hi + (hi - lo) / 65534, rel=1e-5)  # NaN: just above the maximum
    # ...and so does SimpleITK, compared with the float32 file as nibabel reads it (it keeps NaN, ITK makes it 0)
    as_sitk = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    as_float = np.asarray(nibabel.load(str(ref)).dataobj).transpose(2, 1, 0)
    kept = np.isfinite(as_float)
    assert as_sitk.shape == as_float.shape and kept.sum() == finite.sum()
    assert np.abs(as_sitk[kept] - as_float[kept]).max() <= bound and (as_sitk[~kept] > hi).all()
    codes = _unscaled(out)
    assert codes.dtype == np.int16 and codes.min() == -32768  # the finite values span the code range...
    assert np.unique(codes)[-2] == 32766 and (codes == 32767).sum() == 1  # ...and NaN has the reserved code
    header = nibabel.load(str(out)).header
    assert float(header["cal_min"]) == lo and float(header["cal_max"]) == hi  # viewers window the finite range
    _no_temporaries(tmp_path)


@pytest.mark.parametrize("reader", READERS, ids=lambda c: c.__name__)
def test_uint8_is_the_normalised_map_in_the_float_maps_geometry(tmp_path, reader) -> None:
    source = tmp_path / "case_0000.nii"
    _input(source, reader)
    data, properties = reader().read_images([str(source)])
    low, high = 0.5, 3.0
    ood_map = (RNG.random(data.shape[1:]) * 4).astype(np.float32)  # below low and above high too
    ood_map[0, 0, :3] = [np.nan, np.inf, -np.inf]
    ref, out = tmp_path / "case_ood_m_f32.nii", tmp_path / "case_ood_m.nii"  # uncompressed NIfTI works too
    write_float_image(ood_map, str(ref), properties, reader)
    write_map_image(ood_map, str(out), properties, reader, "uint8", (low, high))
    _same_geometry(out, ref)
    back = reader().read_images([str(out)])[0][0]
    expected = _normalized(ood_map, low, high)
    nan = np.isnan(expected)
    assert nan.sum() == 1 and back[nan][0] == pytest.approx(1.0)  # NaN voxels: the top of the scale
    assert np.abs(back[~nan] - expected[~nan]).max() <= 1 / 510 + 1e-6
    assert back.min() >= 0 and back.max() <= 1 + 1e-6
    assert _unscaled(out).dtype == np.uint8
    assert nibabel.load(str(out)).dataobj.slope == pytest.approx(1 / 255)
    _no_temporaries(tmp_path)


def test_degenerate_maps_and_bounds(tmp_path) -> None:
    source = tmp_path / "case_0000.nii.gz"
    _input(source, SimpleITKIO)
    data, properties = SimpleITKIO().read_images([str(source)])
    constant = np.full(data.shape[1:], 0.3125, dtype=np.float32)
    write_map_image(constant, str(tmp_path / "c.nii.gz"), properties, SimpleITKIO, "int16")
    np.testing.assert_array_equal(SimpleITKIO().read_images([str(tmp_path / "c.nii.gz")])[0][0], constant)
    all_nan = np.full(data.shape[1:], np.nan, dtype=np.float32)
    write_map_image(all_nan, str(tmp_path / "n.nii.gz"), properties, SimpleITKIO, "int16")
    assert (_unscaled(tmp_path / "n.nii.gz") == 32767).all()
    # bounds with high == low (every training score equal): the normalised column's step, 0 at or below, 1 above
    values = (RNG.random(data.shape[1:]) * 2).astype(np.float32)
    write_map_image(values, str(tmp_path / "s.nii.gz"), properties, SimpleITKIO, "uint8", (1.0, 1.0))
    back = SimpleITKIO().read_images([str(tmp_path / "s.nii.gz")])[0][0]
    np.testing.assert_allclose(back, _normalized(values, 1.0, 1.0), atol=1e-6)


def test_smaller_files_for_a_smooth_3d_map(tmp_path) -> None:
    image = sitk.Image(96, 80, 64, sitk.sitkFloat32)
    image.SetSpacing((0.8, 0.8, 2.0))
    source = tmp_path / "case_0000.nii.gz"
    sitk.WriteImage(image, str(source))
    data, properties = SimpleITKIO().read_images([str(source)])
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in data.shape[1:]), indexing="ij")
    smooth = (5 * np.exp(-4 * (x**2 + y**2 + z**2)) + np.sin(3 * x) * np.cos(2 * y)).astype(np.float32)
    sizes = {}
    for dtype in ("float32", "int16", "uint8"):
        path = tmp_path / f"case_ood_{dtype}.nii.gz"
        write_map_image(smooth, str(path), properties, SimpleITKIO, dtype, (-1.0, 6.0))
        sizes[dtype] = path.stat().st_size
        assert len(gzip.decompress(path.read_bytes())) > smooth.size  # really gzip'd NIfTI with all voxels
    assert sizes["uint8"] < sizes["int16"] < sizes["float32"]
    assert sizes["int16"] < 0.75 * sizes["float32"], sizes


def test_what_cannot_be_written_is_refused_before_anything_is_written(tmp_path) -> None:
    bounds = normalization_bounds({"mahalanobis": MethodCalibration(1.0, 4.0, 2.0),
                                   "ensemble_mi": MethodCalibration.uncalibrated()})
    assert bounds == {"mahalanobis": (1.0, 4.0), "ensemble_mi": None}
    for dtype in ("float32", "int16"):
        check_map_dtype(dtype, ".nii.gz", bounds)
    check_map_dtype("uint8", ".nii", {"mahalanobis": (1.0, 4.0)})
    for dtype, ending, needles in (("int16", ".tif", (".tif", "float32")), ("uint8", ".nrrd", (".nrrd",)),
                                   ("uint8", ".nii.gz", ("ensemble_mi", "int16"))):
        with pytest.raises(OODInputError) as info:
            check_map_dtype(dtype, ending, bounds)
        assert "\n" not in str(info.value) and all(n in str(info.value) for n in needles)
    with pytest.raises(OODInputError, match="float16"):
        check_map_dtype("float16", ".nii.gz", bounds)
    # the writer refuses too (the API could call it directly): no file, no temporary
    source = tmp_path / "case_0000.nii.gz"
    _input(source, SimpleITKIO)
    data, properties = SimpleITKIO().read_images([str(source)])
    with pytest.raises(OODInputError, match=".nrrd"):
        write_map_image(np.zeros(data.shape[1:], np.float32), str(tmp_path / "m.nrrd"), properties, SimpleITKIO,
                        "int16")
    with pytest.raises(OODInputError, match="bounds"):
        write_map_image(np.zeros(data.shape[1:], np.float32), str(tmp_path / "m.nii.gz"), properties, SimpleITKIO,
                        "uint8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_0000.nii.gz"]


# ---------------------------------------------------------------- command line, before any model is needed
def test_argument_errors_without_a_model(tmp_path, capsys, fails_with) -> None:
    argv = ["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-d", "1", "-c", "2d"]
    with pytest.raises(SystemExit) as info:  # argparse's own message for a choice it does not know
        predict_entry.main([*argv, "--save_ood_maps", "--ood_maps_dtype", "float16"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nnUNetv2_predict_ood: error:") or "error:" in err[-1]
    assert "float16" in err[-1] and "int16" in err[-1]
    fails_with(predict_entry.main, [*argv, "--ood_maps_dtype", "int16"], "--save_ood_maps")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- command line on the tiny trained project
OOD_TRAINER = "nnUNetTrainerOOD_smoke"
SCRATCH_TRAINER = "nnUNetTrainerOOD_5epochs"


def test_a_non_nifti_dataset_is_refused(tiny_project, test_images, tmp_path, fails_with, predict_argv) -> None:
    """A SimpleITK dataset in .mha: its maps cannot carry NIfTI scaling."""
    model = tiny_project.model(SCRATCH_TRAINER)
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(tiny_project.model(OOD_TRAINER), model)
    try:
        dataset_json = model / "dataset.json"
        dataset = json.loads(dataset_json.read_text())
        dataset["file_ending"] = ".mha"
        dataset_json.write_text(json.dumps(dataset))
        mha = tmp_path / "mha"
        mha.mkdir()
        for f in sorted(test_images.glob("*.nii.gz"))[:2]:
            sitk.WriteImage(sitk.ReadImage(str(f)), str(mha / f.name.replace(".nii.gz", ".mha")))
        out = tmp_path / "out"
        fails_with(predict_entry.main, predict_argv(mha, out, SCRATCH_TRAINER, "--save_ood_maps", "--ood_maps_dtype",
                                                    "int16"), ".mha", "NIfTI", "float32")
        assert not out.exists()
    finally:
        shutil.rmtree(model, ignore_errors=True)


def test_uint8_with_a_method_without_bounds_is_refused(tiny_project, test_images, tmp_path, fails_with,
                                                       predict_argv, monkeypatch) -> None:
    # a fold ensemble's calibration, as it is without nnUNetv2_calibrate_ood (one fold here cannot make one)
    monkeypatch.setattr("nnunet_ood.inference.predictor.fold_calibration",
                        lambda methods, states: {m.name: MethodCalibration.uncalibrated() for m in methods})
    out = tmp_path / "out"
    fails_with(predict_entry.main, predict_argv(test_images, out, OOD_TRAINER, "--save_ood_maps", "--ood_maps_dtype",
                                                "uint8", "--ood", "mahalanobis"),
               "mahalanobis", "uint8", "int16")
    assert not out.exists()


def test_predicted_maps_of_each_dtype_match_the_float32_maps(tiny_project, test_images, tmp_path, capsys) -> None:
    """One prediction per dtype (int16 through the map-export worker processes); scores do not depend on it."""
    def predict(out: Path, dtype: str, *extra: str) -> None:
        predict_entry.main(["-i", str(test_images), "-o", str(out), "-d", str(tiny_project.dataset_id), "-c", "2d",
                            "-f", "0", "-tr", OOD_TRAINER, "-device", "cpu", "--disable_progress_bar",
                            "--ood", "mahalanobis", "max_softmax", "--save_ood_maps", "--ood_maps_dtype", dtype,
                            *extra])

    sequential = ("-npp", "0", "-nps", "0")
    predict(tmp_path / "float32", "float32", *sequential)
    predict(tmp_path / "int16", "int16", "-npp", "1", "-nps", "1")
    predict(tmp_path / "uint8", "uint8", *sequential)
    reference = json.loads((tmp_path / "float32" / "ood_scores.json").read_text())
    rows = read_score_rows(str(tmp_path / "float32"))
    cases = sorted({r["case"] for r in rows})
    assert len(cases) == len(list(test_images.glob("*_0000.nii.gz")))
    for dtype in ("int16", "uint8"):
        document = json.loads((tmp_path / dtype / "ood_scores.json").read_text())
        assert document["ood_maps"]["dtype"] == dtype
        assert document["ood_maps"]["values"] == ("normalized" if dtype == "uint8" else "score")
        other = read_score_rows(str(tmp_path / dtype))
        assert [(r["case"], r["method"]) for r in other] == [(r["case"], r["method"]) for r in rows]
        assert [r["score"] for r in other] == pytest.approx([r["score"] for r in rows], rel=1e-6)
    assert reference["ood_maps"] == {"dtype": "float32", "values": "score", "methods": ["mahalanobis", "max_softmax"]}
    for case in cases:
        for method in ("mahalanobis", "max_softmax"):
            name = f"{case}_ood_{method}.nii.gz"
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "float32" / name))).astype(np.float64)
            _same_geometry(tmp_path / "int16" / name, tmp_path / "float32" / name)
            _same_geometry(tmp_path / "uint8" / name, tmp_path / "float32" / name)
            as_int16 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "int16" / name)))
            assert np.abs(as_int16 - ref).max() <= _half_step(ref) * (1 + 1e-6) + 1e-7 * np.abs(ref).max()
            c = reference["calibration"][method]
            as_uint8 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "uint8" / name)))
            assert np.abs(as_uint8 - _normalized(ref, c["low"], c["high"])).max() <= 1 / 510 + 1e-5
    # --continue_prediction finds every int16 map under its usual name: nothing to redo
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "int16").glob("*.nii.gz")}
    capsys.readouterr()
    predict(tmp_path / "int16", "int16", *sequential, "--continue_prediction")
    assert "That's 0 cases" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "int16").glob("*.nii.gz")} == mtimes
    # ... but with another map type every case is redone, so that one folder never mixes map types
    predict(tmp_path / "int16", "uint8", *sequential, "--continue_prediction")
    assert f"That's {len(cases)} cases" in capsys.readouterr().out
    assert json.loads((tmp_path / "int16" / "ood_scores.json").read_text())["ood_maps"]["dtype"] == "uint8"
