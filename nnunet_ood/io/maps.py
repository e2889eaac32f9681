"""Write float OOD maps in the input image's own geometry (same size, spacing, origin, direction).

A map is computed in nnU-Net's preprocessed space (cropped to the non-zero region, resampled to the
target spacing, axes transposed). Export reverses those three steps with nnU-Net's own resampling
function and bounding box, then writes float32 with the geometry nnU-Net recorded when reading the input
(or, for NIfTI, scaled int16/uint8 codes in the same geometry: :mod:`nnunet_ood.io.map_dtypes`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import nibabel
import numpy as np
import SimpleITK as sitk
import tifffile
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_ood.errors import OODInputError
from nnunet_ood.io.map_dtypes import NIFTI_ENDINGS, quantize_int16, quantize_uint8, set_nifti_scaling

#: value of voxels outside nnU-Net's crop (the all-zero border it never predicts on)
OUTSIDE_CROP_VALUE = 0.0


def map_to_input_geometry(ood_map: np.ndarray | torch.Tensor, properties: Mapping,
                          configuration_manager: ConfigurationManager, plans_manager: PlansManager) -> np.ndarray:
    """Resample a preprocessed-space map ``(X, Y, Z)`` back to the input's voxel grid (float32)."""
    ood_map = torch.as_tensor(ood_map, dtype=torch.float32)[None]
    target_spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape_before_resampling = properties["shape_after_cropping_and_before_resampling"]
    # 2d configurations resample in-plane only: the first (slice) axis keeps its original spacing
    current_spacing = configuration_manager.spacing if len(configuration_manager.spacing) == \
        len(shape_before_resampling) else [target_spacing[0], *configuration_manager.spacing]
    resampled = configuration_manager.resampling_fn_probabilities(ood_map, shape_before_resampling,
                                                                   current_spacing, target_spacing)
    resampled = np.asarray(resampled, dtype=np.float32)[0]
    if tuple(resampled.shape) == tuple(properties["shape_before_cropping"]):
        full = resampled  # nothing was cropped (no all-zero border, as in CT): no second full-size array
    else:
        full = np.full(properties["shape_before_cropping"], OUTSIDE_CROP_VALUE, dtype=np.float32)
        full = insert_crop_into_image(full, resampled, properties["bbox_used_for_cropping"])
    return np.ascontiguousarray(np.asarray(full).transpose(plans_manager.transpose_backward))


def map_file_ending(plans_manager: PlansManager, dataset_json: Mapping) -> str:
    """File ending for maps: the dataset's own for medical formats, ``.tif`` for PNG/TIFF datasets."""
    writer = plans_manager.image_reader_writer_class
    return dataset_json["file_ending"] if issubclass(writer, (SimpleITKIO, NibabelIO, NibabelIOWithReorient)) \
        else ".tif"


def map_filename(output_file_truncated: str, method: str, file_ending: str) -> str:
    """``<case>_ood_<method><ending>`` next to the segmentation."""
    return f"{output_file_truncated}_ood_{method}{file_ending}"


def _temporary_name(path: str) -> str:
    # keep the full ending (.nii.gz) at the end: writers choose the format from it
    directory, name = os.path.split(path)
    return os.path.join(directory, f".tmp-{os.getpid()}-{name}")


def _write_image(array: np.ndarray, path: str, properties: Mapping, writer_class: type) -> None:
    # the array (any dtype, nnU-Net's array layout of the input) at path, in the input's geometry; not atomic
    if issubclass(writer_class, SimpleITKIO):
        sitk_stuff = properties["sitk_stuff"]
        if len(sitk_stuff["spacing"]) == 2:
            array = array[0]
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(sitk_stuff["spacing"])
        image.SetOrigin(sitk_stuff["origin"])
        image.SetDirection(sitk_stuff["direction"])
        if "original_orientation" in sitk_stuff:  # SimpleITKIOWithReorient
            image = sitk.DICOMOrient(image, sitk_stuff["original_orientation"])
        sitk.WriteImage(image, path, True)
    elif issubclass(writer_class, NibabelIOWithReorient):
        nib_stuff = properties["nibabel_stuff"]
        image = nibabel.Nifti1Image(array.transpose((2, 1, 0)), affine=nib_stuff["reoriented_affine"])
        back = ornt_transform(axcodes2ornt("RAS"), io_orientation(nib_stuff["original_affine"]))
        nibabel.save(image.as_reoriented(back), path)
    elif issubclass(writer_class, NibabelIO):
        image = nibabel.Nifti1Image(array.transpose((2, 1, 0)),
                                    affine=properties["nibabel_stuff"]["original_affine"])
        nibabel.save(image, path)
    else:  # natural images and TIFF: a float TIFF with the same array layout nnU-Net writes
        tifffile.imwrite(path, array[0] if array.shape[0] == 1 else array, compression="zlib")


def write_float_image(array: np.ndarray, output_file: str, properties: Mapping, writer_class: type) -> None:
    """Write a float32 array (in nnU-Net's array layout of the input) with the input's geometry, atomically."""
    tmp = _temporary_name(output_file)
    try:
        _write_image(np.asarray(array, dtype=np.float32), tmp, properties, writer_class)
        os.replace(tmp, output_file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_map_image(array: np.ndarray, output_file: str, properties: Mapping, writer_class: type,
                    dtype: str = "float32", bounds: tuple[float, float] | None = None) -> None:
    """Write a float map as ``dtype``, atomically: float32 as :func:`write_float_image`; ``int16`` (scaled from
    the map's finite min/max) or ``uint8`` (normalised with ``bounds``) as NIfTI with scl_slope/scl_inter."""
    if dtype == "float32":
        write_float_image(array, output_file, properties, writer_class)
        return
    if not output_file.endswith(NIFTI_ENDINGS):  # checked before prediction too (check_map_dtype)
        raise OODInputError(f"--ood_maps_dtype {dtype} needs NIfTI maps (.nii or .nii.gz), not {output_file}; use "
                            "--ood_maps_dtype float32")
    if dtype == "uint8" and bounds is None:
        raise OODInputError(f"--ood_maps_dtype uint8 needs normalisation bounds for {os.path.basename(output_file)}; "
                            "use --ood_maps_dtype int16 or float32")
    codes, scaling = quantize_int16(array) if dtype == "int16" else quantize_uint8(array, *bounds)
    tmp = _temporary_name(output_file)
    directory, name = os.path.split(output_file)
    # the plans' writer sets the geometry (uncompressed: written once, read once), then nibabel sets the scaling
    raw = os.path.join(directory, f".tmp-{os.getpid()}-codes-{name.removesuffix('.gz')}")
    try:
        _write_image(codes, raw, properties, writer_class)
        set_nifti_scaling(raw, tmp, scaling)
        os.replace(tmp, output_file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        if os.path.exists(raw):
            os.remove(raw)


def export_ood_maps(maps: Sequence[np.ndarray], methods: Sequence[str], properties: Mapping,
                    configuration_manager: ConfigurationManager, plans_manager: PlansManager,
                    dataset_json: Mapping, output_file_truncated: str, dtype: str = "float32",
                    bounds: Mapping[str, tuple[float, float] | None] | None = None) -> list[str]:
    """Resample every method's map ``maps[i]`` to the input geometry and write it as ``dtype`` (uint8: normalised
    with ``bounds[method]``). Runs in export workers: every argument is picklable."""
    ending = map_file_ending(plans_manager, dataset_json)
    written = []
    for method, ood_map in zip(methods, maps):
        path = map_filename(output_file_truncated, method, ending)
        full = map_to_input_geometry(ood_map, properties, configuration_manager, plans_manager)
        write_map_image(full, path, properties, plans_manager.image_reader_writer_class, dtype,
                        (bounds or {}).get(method))
        written.append(path)
    return written
