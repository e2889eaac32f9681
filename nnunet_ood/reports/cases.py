"""One case's files -> the slice to show -> its thumbnails; shared by the evaluation and the review page.

Two steps, so that every thumbnail of a method shares one heat scale: :func:`load_case_slices` reads the files
(each once, keeping only the chosen 2D slices), :func:`render_case` draws them once the scales are known
(:func:`heat_scales`). A file that is missing, unreadable or of another size than the segmentation leaves its
thumbnail out with a note; it never stops the report.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nnunet_ood.errors import OODInputError
from nnunet_ood.reports.slices import disagreement_slice, uncertainty_slice
from nnunet_ood.reports.thumbnails import (
    THUMBNAIL_SIZE,
    HeatScale,
    grey_rgb,
    heat_overlay,
    heat_scale,
    label_overlay,
    normalized_heat,
    png_bytes,
    resize_nearest,
    thumbnail_shape,
)
from nnunet_ood.reports.volumes import Volume, read_volume

#: thumbnail kinds, in the order pages show them
IMAGE, REFERENCE, PREDICTION, MAP = "image", "reference", "prediction", "map"


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case (None: not available) and the method whose map is shown."""

    key: str  # unique prefix of the case's thumbnail files (letters, digits, '-', '_', '.')
    image: str | None
    prediction: str | None
    reference: str | None = None
    ood_map: str | None = None
    method: str | None = None


@dataclass
class CaseSlices:
    """The chosen slice of each available file of one case (2D arrays), and why some are missing."""

    files: CaseFiles
    slice_index: int | None  # None for 2D images
    n_slices: int
    spacing_yx: tuple[float, float]
    image: np.ndarray | None = None
    prediction: np.ndarray | None = None
    reference: np.ndarray | None = None
    ood_map: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def _read(path: str | None, what: str, notes: list[str]) -> Volume | None:
    if path is None:
        return None
    try:
        return read_volume(path)
    except OODInputError as e:
        notes.append(f"{what}: {e}")
        return None


def _same_grid(volume: Volume | None, shape: tuple[int, ...], what: str, notes: list[str]) -> Volume | None:
    if volume is not None and volume.array.shape != shape:
        notes.append(f"{what} has {volume.array.shape[::-1]} voxels (x, y, z), the segmentation "
                     f"{shape[::-1]}; not shown")
        return None
    return volume


def load_case_slices(files: CaseFiles, by_disagreement: bool) -> CaseSlices:
    """Read the files of one case and keep the slice to show: where prediction and reference disagree most
    (``by_disagreement``, evaluation) or the largest summed uncertainty of the map (review); see
    :mod:`nnunet_ood.reports.slices`."""
    notes: list[str] = []
    prediction = _read(files.prediction, "segmentation", notes)
    image = _read(files.image, "input image", notes)
    reference = _read(files.reference, "reference label", notes)
    ood_map = _read(files.ood_map, f"{files.method} map", notes)
    grid = next((v for v in (prediction, image, reference, ood_map) if v is not None), None)
    if grid is None:
        return CaseSlices(files, None, 0, (1.0, 1.0), notes=notes)
    shape = grid.array.shape
    image = _same_grid(image, shape, "input image", notes)
    reference = _same_grid(reference, shape, "reference label", notes)
    ood_map = _same_grid(ood_map, shape, f"{files.method} map", notes)
    if by_disagreement and prediction is not None and reference is not None:
        index = disagreement_slice(prediction.array, reference.array)
    else:
        labels = prediction if prediction is not None else reference
        index = uncertainty_slice(ood_map.array if ood_map is not None else None,
                                  labels.array if labels is not None else np.zeros(shape, dtype=np.uint8))

    def cut(volume: Volume | None) -> np.ndarray | None:
        return None if volume is None else np.array(volume.array[index])

    return CaseSlices(files, index if grid.is_3d else None, shape[0], (grid.spacing[1], grid.spacing[2]),
                      cut(image), cut(prediction), cut(reference), cut(ood_map), notes)


def heat_scales(cases: Sequence[CaseSlices]) -> dict[str, HeatScale]:
    """Per method, the heat scale shared by every shown map slice of that method (:func:`heat_scale`)."""
    by_method: dict[str, list[np.ndarray]] = {}
    for case in cases:
        if case.ood_map is not None and case.files.method is not None:
            by_method.setdefault(case.files.method, []).append(case.ood_map)
    scales = {method: heat_scale(values) for method, values in by_method.items()}
    return {method: scale for method, scale in scales.items() if scale is not None}


def thumbnail_box(case: CaseSlices) -> tuple[int, int]:
    """``(height, width)`` in pixels of the case's thumbnails (a square when no file could be read)."""
    some = next((a for a in (case.image, case.prediction, case.reference, case.ood_map) if a is not None), None)
    return thumbnail_shape(some.shape, case.spacing_yx) if some is not None else (THUMBNAIL_SIZE, THUMBNAIL_SIZE)


def render_case(case: CaseSlices, scales: dict[str, HeatScale], with_reference: bool) -> dict[str, bytes]:
    """PNG bytes per thumbnail kind (:data:`IMAGE`, :data:`REFERENCE` if ``with_reference``, :data:`PREDICTION`,
    :data:`MAP`); a kind whose data is missing is left out."""
    if not any(a is not None for a in (case.image, case.prediction, case.reference, case.ood_map)):
        return {}
    shape = thumbnail_box(case)
    base = grey_rgb(case.image, shape)
    out: dict[str, bytes] = {}
    if case.image is not None:
        out[IMAGE] = png_bytes(base)
    if with_reference and case.reference is not None:
        out[REFERENCE] = png_bytes(label_overlay(base, resize_nearest(case.reference, shape)))
    if case.prediction is not None:
        out[PREDICTION] = png_bytes(label_overlay(base, resize_nearest(case.prediction, shape)))
    scale = scales.get(case.files.method or "")
    if case.ood_map is not None and scale is not None:
        out[MAP] = png_bytes(heat_overlay(base, normalized_heat(resize_nearest(case.ood_map, shape), scale)))
    return out


def thumbnail_name(key: str, kind: str) -> str:
    """File name of a case's thumbnail (``key`` is already safe for file names and URLs)."""
    return f"{key}_{kind}.png"


def existing(path: str) -> str | None:
    """``path`` if it is a file, else None."""
    return path if os.path.isfile(path) else None


def channel0_file(folder: str | None, case: str, file_ending: str | None) -> str | None:
    """The first channel's input file ``<case>_0000<ending>`` of ``folder`` (any ending when unknown), or None."""
    if folder is None:
        return None
    if file_ending:
        return existing(os.path.join(folder, f"{case}_0000{file_ending}"))
    found = sorted(glob.glob(os.path.join(glob.escape(folder), glob.escape(f"{case}_0000") + ".*")))
    return found[0] if found else None


def map_file(folder: str, case: str, method: str | None, file_ending: str | None) -> str | None:
    """The map ``<case>_ood_<method>`` of a prediction folder (dataset ending, or ``.tif`` for PNG/TIFF datasets)."""
    if method is None:
        return None
    for ending in dict.fromkeys((file_ending or "", ".tif")):
        if ending and os.path.isfile(os.path.join(folder, f"{case}_ood_{method}{ending}")):
            return os.path.join(folder, f"{case}_ood_{method}{ending}")
    return None


def foreground_labels(dataset: Mapping[str, Any]) -> dict[int, str]:
    """``{value: name}`` of the integer foreground labels of a dataset.json (regions and ignore left out)."""
    labels = dataset.get("labels") if isinstance(dataset.get("labels"), dict) else {}
    return {int(v): str(k) for k, v in labels.items()
            if isinstance(v, int) and not isinstance(v, bool) and v > 0 and k != "ignore"}


def file_key(index: int, case: str) -> str:
    """A thumbnail file prefix unique in the page and safe for file names and URLs."""
    from nnunet_ood.evaluation.outputs import safe_file_part

    return f"{index:04d}_{safe_file_part(case)}"
