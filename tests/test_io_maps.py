"""Maps written in the input's geometry read back, with nnU-Net's own readers, as the array we wrote."""

from __future__ import annotations

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from PIL import Image

from nnunet_ood.io.maps import write_float_image

RNG = np.random.default_rng(0)


def _sitk_input(path) -> None:
    image = sitk.GetImageFromArray(RNG.normal(size=(5, 7, 9)).astype(np.float32))
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((3.0, -4.0, 12.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))


def _nibabel_input(path) -> None:
    affine = np.array([[0.0, -0.8, 0.0, 10.0], [0.9, 0.0, 0.0, -3.0], [0.0, 0.0, 2.0, 5.0], [0, 0, 0, 1]])
    nibabel.save(nibabel.Nifti1Image(RNG.normal(size=(9, 7, 5)).astype(np.float32), affine), str(path))


@pytest.mark.parametrize("reader", [SimpleITKIO, NibabelIO, NibabelIOWithReorient], ids=lambda c: c.__name__)
def test_medical_formats_round_trip_with_geometry(tmp_path, reader) -> None:
    source = tmp_path / "case_0000.nii.gz"
    (_sitk_input if reader is SimpleITKIO else _nibabel_input)(source)
    data, properties = reader().read_images([str(source)])
    ood_map = RNG.random(data.shape[1:]).astype(np.float32)
    out = tmp_path / "case_ood_mahalanobis.nii.gz"
    write_float_image(ood_map[None] if ood_map.ndim == 2 else ood_map, str(out), properties, reader)
    back, back_properties = reader().read_images([str(out)])
    np.testing.assert_array_equal(back[0], ood_map)
    np.testing.assert_allclose(back_properties["spacing"], properties["spacing"])
    a, b = sitk.ReadImage(str(source)), sitk.ReadImage(str(out))
    assert b.GetSize() == a.GetSize()
    assert b.GetOrigin() == pytest.approx(a.GetOrigin(), abs=1e-4)
    assert b.GetDirection() == pytest.approx(a.GetDirection(), abs=1e-6)
    assert b.GetPixelID() == sitk.sitkFloat32
    assert not list(tmp_path.glob(".tmp-*"))


def test_png_input_gives_float_tif_of_the_same_size(tmp_path) -> None:
    source = tmp_path / "case_0000.png"
    Image.fromarray(RNG.integers(0, 255, size=(6, 11), dtype=np.uint8)).save(source)
    data, properties = NaturalImage2DIO().read_images([str(source)])
    ood_map = RNG.random(data.shape[1:]).astype(np.float32)  # (1, 6, 11)
    out = tmp_path / "case_ood_mahalanobis.tif"
    write_float_image(ood_map, str(out), properties, NaturalImage2DIO)
    back = tifffile.imread(str(out))
    assert back.dtype == np.float32 and back.shape == (6, 11)
    np.testing.assert_array_equal(back, ood_map[0])
