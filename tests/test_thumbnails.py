"""Thumbnails of the report pages: slice choice against brute-force loops, reading files, overlays, PNGs.

Synthetic arrays and tiny NIfTI/PNG files only; nothing is trained or predicted.
"""

from __future__ import annotations

import io
import math

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from nnunet_ood.reports.cases import CaseFiles, heat_scales, load_case_slices, render_case
from nnunet_ood.reports.slices import disagreement_slice, pick_slice, uncertainty_slice
from nnunet_ood.reports.thumbnails import (
    LABEL_ALPHA,
    LABEL_COLORS,
    HeatScale,
    label_overlay,
    normalized_heat,
    png_bytes,
    resize_nearest,
    thumbnail_shape,
    window,
)
from nnunet_ood.reports.volumes import read_volume

# ------------------------------------------------------------------------------------------- brute force


def brute_force_slice(primary: list[float], secondary: list[float]) -> int:
    """The first slice with the largest (primary, secondary); the middle one when all slices are equal."""
    if all(p == primary[0] for p in primary) and all(s == secondary[0] for s in secondary):
        return len(primary) // 2
    best = 0
    for z in range(1, len(primary)):
        if (primary[z], secondary[z]) > (primary[best], secondary[best]):
            best = z
    return best


def brute_disagreement(pred: np.ndarray, ref: np.ndarray) -> int:
    differ, foreground = [], []
    for z in range(pred.shape[0]):
        d = f = 0
        for y in range(pred.shape[1]):
            for x in range(pred.shape[2]):
                d += int(pred[z, y, x] != ref[z, y, x])
                f += int(pred[z, y, x] > 0 or ref[z, y, x] > 0)
        differ.append(d)
        foreground.append(f)
    return brute_force_slice(differ, foreground)


def brute_uncertainty(ood_map: np.ndarray | None, seg: np.ndarray) -> int:
    sums, foreground = [], []
    for z in range(seg.shape[0]):
        total, f = 0.0, 0
        for y in range(seg.shape[1]):
            for x in range(seg.shape[2]):
                if ood_map is not None and math.isfinite(ood_map[z, y, x]):
                    total += float(ood_map[z, y, x])
                f += int(seg[z, y, x] > 0)
        sums.append(total)
        foreground.append(f)
    if ood_map is None:
        return brute_force_slice(foreground, [0] * len(foreground))
    return brute_force_slice(sums, foreground)


# ------------------------------------------------------------------------------------------- slice choice


@pytest.mark.parametrize("seed", range(6))
def test_disagreement_slice_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 3, size=(7, 6, 5))
    pred = ref.copy()
    for z in range(7):  # a different amount of errors per slice, sometimes equal (ties)
        flips = rng.random((6, 5)) < rng.choice([0.0, 0.2, 0.2, 0.5])
        pred[z][flips] = (pred[z][flips] + 1) % 3
    assert disagreement_slice(pred, ref) == brute_disagreement(pred, ref)


def test_disagreement_ties_and_perfect_cases() -> None:
    ref = np.zeros((5, 4, 4), dtype=np.uint8)
    assert disagreement_slice(ref, ref) == 2  # empty and perfect: the middle slice
    ref[3, 1:3, 1:3] = 1
    assert disagreement_slice(ref, ref) == 3 == brute_disagreement(ref, ref)  # perfect: most foreground
    pred = ref.copy()
    pred[1, 0, 0] = pred[4, 0, 0] = 2  # two slices with one error each: the first wins
    assert disagreement_slice(pred, ref) == 1 == brute_disagreement(pred, ref)


@pytest.mark.parametrize("seed", range(6))
def test_uncertainty_slice_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    seg = (rng.random((6, 5, 4)) < 0.3).astype(np.uint8)
    ood_map = rng.normal(size=(6, 5, 4))  # negative values too (energy-like maps)
    ood_map[rng.random(ood_map.shape) < 0.05] = np.nan  # non-finite voxels are ignored
    ood_map[0, 0, 0] = np.inf
    assert uncertainty_slice(ood_map, seg) == brute_uncertainty(ood_map, seg)
    assert uncertainty_slice(None, seg) == brute_uncertainty(None, seg)


def test_constant_map_falls_back_to_foreground_then_middle() -> None:
    seg = np.zeros((5, 3, 3), dtype=np.uint8)
    assert uncertainty_slice(np.ones((5, 3, 3)), seg) == 2
    seg[4, 1, 1] = 1
    assert uncertainty_slice(np.ones((5, 3, 3)), seg) == 4 == brute_uncertainty(np.ones((5, 3, 3)), seg)


def test_pick_slice_rejects_empty_volumes() -> None:
    with pytest.raises(ValueError):
        pick_slice(np.array([]))


# ------------------------------------------------------------------------------------------- pictures


def test_resize_nearest_matches_loop() -> None:
    rng = np.random.default_rng(1)
    array = rng.integers(0, 9, size=(5, 7))
    for shape in ((12, 9), (3, 2), (5, 7)):
        out = resize_nearest(array, shape)
        for i in range(shape[0]):
            for j in range(shape[1]):
                src_i = min(int((i + 0.5) * 5 / shape[0]), 4)
                src_j = min(int((j + 0.5) * 7 / shape[1]), 6)
                assert out[i, j] == array[src_i, src_j]


def test_thumbnail_shape_follows_physical_extent() -> None:
    assert thumbnail_shape((64, 64), (1.0, 1.0), 100) == (100, 100)
    assert thumbnail_shape((50, 100), (2.0, 1.0), 100) == (100, 100)  # 100 mm x 100 mm
    assert thumbnail_shape((10, 40), (1.0, 1.0), 80) == (20, 80)
    assert thumbnail_shape((10, 40), (float("nan"), 1.0), 80) == (20, 80)  # broken spacing: voxel aspect


def test_window_ignores_outliers_and_non_finite_voxels() -> None:
    image = np.tile(np.linspace(0.0, 100.0, 1000), (2, 1))
    image[0, 0] = 1e9  # one bright voxel must not squash the rest to black
    image[1, 0] = np.nan
    grey = window(image)
    assert grey[1, 0] == 0.0 and grey[0, 0] == 1.0
    middle = image[1, 500]
    low, high = np.nanpercentile(image, 0.5), np.nanpercentile(image, 99.5)
    assert grey[1, 500] == pytest.approx((middle - low) / (high - low))
    assert 0.45 < grey[1, 500] < 0.55
    assert np.all(window(np.full((3, 3), 7.0)) == 0.5)


def test_label_overlay_fills_and_outlines_with_the_label_colours() -> None:
    base = np.full((7, 7, 3), 0.5)
    labels = np.zeros((7, 7), dtype=int)
    labels[1:6, 1:6] = 2
    out = label_overlay(base, labels)
    np.testing.assert_allclose(out[0, 0], [0.5, 0.5, 0.5])  # background unchanged
    np.testing.assert_allclose(out[1, 3], LABEL_COLORS[1])  # boundary: opaque label colour
    np.testing.assert_allclose(out[3, 3], 0.5 * (1 - LABEL_ALPHA) + LABEL_COLORS[1] * LABEL_ALPHA)  # interior


def test_normalized_heat_on_a_scale() -> None:
    values = np.array([-1.0, 0.0, 2.0, 4.0, 9.0, np.nan, np.inf, -np.inf])
    np.testing.assert_allclose(normalized_heat(values, HeatScale(0.0, 4.0)), [0, 0, 0.5, 1, 1, 1, 1, 0])
    np.testing.assert_allclose(normalized_heat(np.array([1.0, 2.0]), HeatScale(1.0, 1.0)), [0, 1])


def test_png_bytes_round_trip() -> None:
    rgb = np.zeros((4, 6, 3))
    rgb[1, 2] = [1.0, 0.0, 0.0]
    back = imread(io.BytesIO(png_bytes(rgb)), format="png")
    assert back.shape[:2] == (4, 6)
    np.testing.assert_allclose(back[1, 2, :3], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(back[0, 0, :3], [0.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------------- files


def write(path, array: np.ndarray, spacing=(0.7, 0.8, 2.5)) -> str:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return str(path)


def test_read_volume_2d_3d_vector_and_scaled_nifti(tmp_path) -> None:
    rng = np.random.default_rng(0)
    vol = read_volume(write(tmp_path / "a.nii.gz", rng.random((4, 5, 6)).astype(np.float32)))
    assert vol.array.shape == (4, 5, 6) and vol.is_3d and vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    flat = read_volume(write(tmp_path / "b.nii.gz", rng.random((5, 6)).astype(np.float32)))
    assert flat.array.shape == (1, 5, 6) and not flat.is_3d and flat.spacing == pytest.approx((1.0, 0.8, 0.7))
    one_slice = read_volume(write(tmp_path / "c.nii.gz", rng.random((1, 5, 6)).astype(np.float32)))
    assert not one_slice.is_3d  # a 2D dataset stored as 3D NIfTI: no slice to choose
    rgb = (rng.random((5, 6, 3)) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "d.png"))
    assert np.array_equal(read_volume(str(tmp_path / "d.png")).array[0], rgb[..., 0])  # channel 0
    codes = np.arange(30, dtype=np.int16).reshape(6, 5, 1)  # x, y, z as nibabel stores them
    scaled = nibabel.Nifti1Image(codes, np.eye(4))
    scaled.header.set_slope_inter(0.5, 2.0)
    nibabel.save(scaled, str(tmp_path / "e.nii.gz"))
    np.testing.assert_allclose(read_volume(str(tmp_path / "e.nii.gz")).array[0], codes[..., 0].T * 0.5 + 2.0)


def test_read_volume_errors_are_one_line(tmp_path) -> None:
    from nnunet_ood.errors import OODInputError

    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    for path in (tmp_path / "missing.nii.gz", tmp_path / "broken.nii.gz"):
        with pytest.raises(OODInputError) as info:
            read_volume(str(path))
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_load_case_slices_picks_the_brute_force_slice_and_renders(tmp_path) -> None:
    rng = np.random.default_rng(3)
    ref = (rng.random((6, 8, 9)) < 0.4).astype(np.uint8)
    pred = ref.copy()
    pred[4] = 1 - pred[4]  # the worst slice
    image = rng.normal(size=ref.shape).astype(np.float32)
    ood_map = rng.random(ref.shape).astype(np.float32)
    ood_map[1] += 5  # the most uncertain slice
    files = CaseFiles("0000_case", write(tmp_path / "img.nii.gz", image), write(tmp_path / "pred.nii.gz", pred),
                      write(tmp_path / "ref.nii.gz", ref), write(tmp_path / "map.nii.gz", ood_map), "m")
    by_error = load_case_slices(files, by_disagreement=True)
    assert by_error.slice_index == brute_disagreement(pred, ref) == 4 and by_error.n_slices == 6
    np.testing.assert_array_equal(by_error.reference, ref[4])
    np.testing.assert_allclose(by_error.image, image[4])
    by_map = load_case_slices(files, by_disagreement=False)
    assert by_map.slice_index == brute_uncertainty(ood_map, pred) == 1
    pngs = render_case(by_error, heat_scales([by_error]), with_reference=True)
    assert set(pngs) == {"image", "reference", "prediction", "map"}
    size = thumbnail_shape((8, 9), (0.8, 0.7))
    for data in pngs.values():
        assert imread(io.BytesIO(data), format="png").shape[:2] == size


def test_missing_and_mismatched_files_leave_thumbnails_out_with_a_note(tmp_path) -> None:
    pred = np.zeros((3, 4, 5), dtype=np.uint8)
    files = CaseFiles("k", str(tmp_path / "absent.nii.gz"), write(tmp_path / "pred.nii.gz", pred), None,
                      write(tmp_path / "map.nii.gz", np.zeros((3, 4, 6), dtype=np.float32)), "m")
    case = load_case_slices(files, by_disagreement=False)
    assert case.image is None and case.ood_map is None and case.prediction is not None
    assert any("absent.nii.gz" in n for n in case.notes) and any("m map" in n for n in case.notes)
    assert set(render_case(case, heat_scales([case]), with_reference=True)) == {"prediction"}
