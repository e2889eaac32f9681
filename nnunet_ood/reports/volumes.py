"""Read an image, segmentation, label or OOD map file as a ``(Z, Y, X)`` array with its spacing.

SimpleITK reads every format nnU-Net's SimpleITK and nibabel readers write (NIfTI, NRRD, MHA, ...) plus the PNG
and TIFF files of 2D datasets (and the float ``.tif`` maps of those). NIfTI maps stored as scaled integers
(``--ood_maps_dtype``) come back as floats: SimpleITK applies ``scl_slope``/``scl_inter``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from nnunet_ood.errors import OODInputError


@dataclass(frozen=True)
class Volume:
    """An array in SimpleITK's axis order ``(Z, Y, X)``; a 2D image is one slice ``(1, Y, X)``."""

    array: np.ndarray
    spacing: tuple[float, float, float]  # (z, y, x), matching the array axes
    is_3d: bool


def read_volume(path: str) -> Volume:
    """The file at ``path`` as a :class:`Volume`; vector pixels (RGB PNG) give component 0, 4D images time point 0.

    Raises :class:`~nnunet_ood.errors.OODInputError` (one line) when the file is missing or unreadable.
    """
    import SimpleITK as sitk

    if not os.path.isfile(path):
        raise OODInputError(f"{path} does not exist")
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as e:
        reason = " ".join(str(e).split()).split("ERROR: ")[-1][:160]
        raise OODInputError(f"cannot read {path} ({reason})") from None
    array = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:  # components are the last array axis
        array = array[..., 0]
    dimension = image.GetDimension()
    spacing = tuple(float(s) for s in image.GetSpacing())[::-1]  # SimpleITK spacing is (x, y, z)
    while array.ndim > 3:  # 4D: the first (time/channel) index
        array, spacing = array[0], spacing[1:]
    if array.ndim == 2:
        array, spacing = array[None], (1.0, *spacing)
    return Volume(np.array(array), (spacing[0], spacing[1], spacing[2]), dimension >= 3 and array.shape[0] > 1)
