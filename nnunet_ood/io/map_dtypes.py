"""Smaller map files (``--ood_maps_dtype``): int16 codes or the normalised map as uint8, with NIfTI scaling.

NIfTI-1 has no 16-bit float data type (its datatype codes hold uint8, int8, int16, uint16, int32, uint32,
int64, uint64, float32, float64, float128, complex and RGB types; nibabel refuses float16 with
``HeaderDataError``). So the 16-bit option stores integer codes and sets the header's ``scl_slope`` and
``scl_inter``: every NIfTI reader (nibabel, SimpleITK/ITK, ITK-SNAP, 3D Slicer) returns floats
``code * slope + inter``.

* ``int16``: per map, ``slope = (max - min) / 65534`` from its finite minimum and maximum: the minimum is code
  -32768, the maximum code 32766, so a voxel reads back within half a step, ``(max - min) / 131068``, of its
  float32 value (plus float32 rounding). Non-finite voxels (NaN/Inf, from images with NaN/Inf) get the
  reserved code 32767: they read back as ``max + slope``, just above ``cal_max`` (= max), the top of the scale,
  as a NaN case score is flagged ``ood``.
* ``uint8``: the normalised map, ``(value - low) / (high - low)`` clipped to [0, 1] with the method's calibration
  bounds (the same as the ``normalized`` column, :func:`nnunet_ood.normalization.normalize`), stored as
  ``round(255 * n)`` with slope 1/255, inter 0: within 1/510 of the normalised value. NaN voxels are stored
  as 255 (1.0, the most suspicious value; uint8 has no code to spare).

Only numpy at module level: the command line takes its choices from here before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nnunet_ood.calibration import MethodCalibration
from nnunet_ood.errors import OODInputError
from nnunet_ood.normalization import normalize, usable_bounds

#: ``--ood_maps_dtype`` choices; float32 is the default (maps written as before)
MAP_DTYPES: tuple[str, ...] = ("float32", "int16", "uint8")
#: map file endings that can carry scl_slope/scl_inter
NIFTI_ENDINGS: tuple[str, ...] = (".nii", ".nii.gz")
#: int16 codes of finite values (65534 steps) and the code of non-finite voxels
INT16_LOWEST, INT16_HIGHEST, INT16_NON_FINITE = -32768, 32766, 32767
INT16_STEPS = INT16_HIGHEST - INT16_LOWEST
#: uint8 code of a normalised value of 1, and of NaN voxels
UINT8_TOP = 255

_CHUNK = 1 << 22  # voxels per vectorised step: float64 temporaries of 32 MiB, not of a whole 3D volume


@dataclass(frozen=True)
class NiftiScaling:
    """What the NIfTI header gets besides the integer codes: scaling, display window, a description."""

    slope: float
    inter: float
    cal_min: float
    cal_max: float
    description: str


def _encode(values: np.ndarray, out_dtype: type, encode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``encode`` (float64 in, codes out) applied chunk by chunk over the flattened array."""
    flat = np.ascontiguousarray(values).reshape(-1)
    out = np.empty(flat.shape, dtype=out_dtype)
    for start in range(0, flat.size, _CHUNK):
        out[start:start + _CHUNK] = encode(flat[start:start + _CHUNK].astype(np.float64))
    return out.reshape(np.shape(values))


def _float32_not_below(x: float) -> float:
    # the header stores float32: round the slope up so that [min, max] still fits in the codes
    y = np.float32(x)
    return float(np.nextafter(y, np.float32(np.inf)) if float(y) < x else y)


def quantize_int16(values: np.ndarray) -> tuple[np.ndarray, NiftiScaling]:
    """int16 codes of a float map and their scaling (``code * slope + inter``), from its finite min and max.

    Finite values use codes -32768..32766; non-finite ones the reserved code 32767. A constant (or all
    non-finite) map gets slope 1 and its value as inter, so it reads back exactly.
    """
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    low = float(np.min(values, where=finite, initial=np.inf))
    high = float(np.max(values, where=finite, initial=-np.inf))
    if low > high:  # no finite voxel
        low = high = 0.0
    slope = _float32_not_below((high - low) / INT16_STEPS)
    if high == low or slope == 0.0:  # slope 0 would mean "no scaling" to NIfTI readers
        slope, inter = 1.0, float(np.float32(low))
    else:
        inter = float(np.float32(low - INT16_LOWEST * slope))  # low -> the lowest code

    def encode(chunk: np.ndarray) -> np.ndarray:
        codes = np.clip(np.rint((chunk - inter) / slope), INT16_LOWEST, INT16_HIGHEST)
        codes[~np.isfinite(chunk)] = INT16_NON_FINITE
        return codes

    codes = _encode(values, np.int16, encode)
    return codes, NiftiScaling(slope, inter, low, high,
                               f"nnunet-ood int16 map; code {INT16_NON_FINITE} = NaN/Inf")


def quantize_uint8(values: np.ndarray, low: float, high: float) -> tuple[np.ndarray, NiftiScaling]:
    """uint8 codes ``round(255 * normalised)`` of a float map and their scaling (slope 1/255, inter 0); NaN -> 255."""
    if not usable_bounds(low, high):
        raise OODInputError(f"uint8 maps need finite normalisation bounds with high >= low, got low={low}, "
                            f"high={high}; use --ood_maps_dtype int16 or float32")

    def encode(chunk: np.ndarray) -> np.ndarray:
        normalized = normalize(chunk, low, high)
        return np.where(np.isnan(normalized), UINT8_TOP, np.rint(normalized * UINT8_TOP))

    codes = _encode(np.asarray(values, dtype=np.float32), np.uint8, encode)
    return codes, NiftiScaling(1.0 / UINT8_TOP, 0.0, 0.0, 1.0,
                               f"nnunet-ood normalised map [{low:.6g}, {high:.6g}] -> [0, 1]; NaN = 1")


def normalization_bounds(calibration: Mapping[str, MethodCalibration]) -> dict[str, tuple[float, float] | None]:
    """Per method the ``(low, high)`` that make its ``normalized`` column; None where it has none (fold
    ensembles without a named calibration)."""
    out: dict[str, tuple[float, float] | None] = {}
    for method, c in calibration.items():
        low, high = float(c.low), float(c.high)
        out[method] = (low, high) if c.calibrated and usable_bounds(low, high) else None
    return out


def check_dtype_name(dtype: str) -> None:
    """One-line error unless ``dtype`` is one of :data:`MAP_DTYPES`."""
    if dtype not in MAP_DTYPES:
        raise OODInputError(f"ood_maps_dtype must be one of {', '.join(MAP_DTYPES)}, got {dtype!r}")


def check_map_dtype(dtype: str, file_ending: str, bounds: Mapping[str, tuple[float, float] | None]) -> None:
    """One-line errors for a map data type this prediction cannot write (maps ending ``file_ending``, methods'
    normalisation ``bounds``); call before predicting."""
    check_dtype_name(dtype)
    if dtype == "float32":
        return
    if file_ending not in NIFTI_ENDINGS:
        raise OODInputError(f"--ood_maps_dtype {dtype} needs NIfTI maps (.nii or .nii.gz, for scl_slope/scl_inter) "
                            f"but this dataset's maps are written as {file_ending}; use --ood_maps_dtype float32")
    missing = [m for m, b in bounds.items() if b is None]
    if dtype == "uint8" and missing:
        raise OODInputError(f"--ood_maps_dtype uint8 writes maps normalised with each method's calibration bounds, "
                            f"but {', '.join(missing)} has none (fold ensembles get bounds only from "
                            "nnUNetv2_calibrate_ood); use --ood_maps_dtype int16 or float32, leave it out of --ood, "
                            "or predict with --calibration NAME")


def maps_metadata(save_ood_maps: bool, dtype: str, methods: Sequence[str] = ()) -> dict[str, object] | None:
    """How the maps of a run are stored and of which ``methods``, for ``ood_scores.json`` (None without maps)."""
    if not save_ood_maps:
        return None
    if dtype == "int16":
        stored = {"dtype": "int16", "values": "score", "non_finite_code": INT16_NON_FINITE,
                  "scaling": "per map from its finite min/max (NIfTI scl_slope/scl_inter); error <= (max - min) / "
                             "131068"}
    elif dtype == "uint8":
        stored = {"dtype": "uint8", "values": "normalized", "non_finite_code": UINT8_TOP,
                  "scaling": "scl_slope 1/255, scl_inter 0: the calibration's normalised value in [0, 1]; error <= "
                             "1/510"}
    else:
        stored = {"dtype": "float32", "values": "score"}
    return {**stored, "methods": list(methods)}


def set_nifti_scaling(source: str, target: str, scaling: NiftiScaling) -> None:
    """Rewrite the integer NIfTI ``source`` as ``target`` with ``scaling`` in its header; every other header
    field (geometry: qform, sform, pixdim, units) is kept as the writer of ``source`` set it."""
    import nibabel

    image = nibabel.load(source, mmap=False)
    codes = np.asanyarray(image.dataobj.get_unscaled())
    out = type(image)(codes, None, image.header)  # no affine: the header's qform/sform are kept as they are
    out.header.set_data_dtype(codes.dtype)
    out.header.set_slope_inter(scaling.slope, scaling.inter)  # after construction, which resets them
    out.header["cal_min"], out.header["cal_max"] = scaling.cal_min, scaling.cal_max
    out.header["descrip"] = scaling.description.encode("ascii")[:79]
    nibabel.save(out, target)
