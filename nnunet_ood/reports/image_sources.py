"""Where the input images of each evaluated group are, for the thumbnails of ``report.html``.

Per group: ``--images GROUP FOLDER``, else the input folder the prediction recorded in its ``ood_scores.json`` (if
it still exists), else the nnU-Net raw-data sibling of the label folder (``labelsTs_x`` -> ``imagesTs_x``,
``labelsTr`` -> ``imagesTr``). Without them the gallery shows the labels on a grey background and says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from nnunet_ood.errors import OODInputError
from nnunet_ood.evaluation.groups import GroupSpec
from nnunet_ood.io.score_reader import read_score_document

IMAGES_FLAG = "--images"


@dataclass(frozen=True)
class ImageSource:
    """Where a group's input images are (None: not found) and how that folder was chosen."""

    folder: str | None
    origin: str


def sibling_image_folder(label_folder: str) -> str | None:
    """nnU-Net's raw layout: the ``images*`` folder next to a ``labels*`` folder (``labelsTs_x`` -> ``imagesTs_x``),
    if it exists."""
    path = os.path.abspath(label_folder)
    name = os.path.basename(path)
    if "labels" not in name:
        return None
    candidate = os.path.join(os.path.dirname(path), name.replace("labels", "images", 1))
    return candidate if os.path.isdir(candidate) else None


def recorded_input_folder(prediction_folder: str) -> str | None:
    """The input folder ``nnUNetv2_predict_ood`` recorded in the prediction folder's ``ood_scores.json``, if it still
    exists (predictions are often moved or read on another machine)."""
    try:
        folder = read_score_document(prediction_folder).get("input_folder")
    except OODInputError:  # only a hint here: the evaluation reads the same document and names what is wrong
        return None
    return folder if isinstance(folder, str) and os.path.isdir(folder) else None


def resolve_image_sources(specs: Sequence[GroupSpec], images: Sequence[Sequence[str]] | None) -> dict[str, ImageSource]:
    """Each group's input-image folder: from ``--images GROUP FOLDER`` (checked: known group, given once, a folder),
    else the prediction's recorded input folder (:func:`recorded_input_folder`), else the sibling of its label
    folder (:func:`sibling_image_folder`)."""
    names = [s.name for s in specs]
    given: dict[str, str] = {}
    for group, folder in images or ():
        if group not in names:
            raise OODInputError(f"{IMAGES_FLAG} names group {group!r}, which is not evaluated; use one of "
                                f"{', '.join(names)}")
        if group in given:
            raise OODInputError(f"{IMAGES_FLAG} is given twice for {group}; give one image folder per group")
        if not os.path.isdir(folder):
            raise OODInputError(f"{IMAGES_FLAG} folder {folder} of {group} does not exist or is not a folder")
        given[group] = folder
    sources = {}
    for spec in specs:
        if spec.name in given:
            sources[spec.name] = ImageSource(given[spec.name], f"{IMAGES_FLAG}")
            continue
        recorded = recorded_input_folder(spec.prediction_folder)
        if recorded is not None:
            sources[spec.name] = ImageSource(recorded, "the prediction's input folder (ood_scores.json)")
            continue
        sibling = sibling_image_folder(spec.label_folder)
        sources[spec.name] = ImageSource(sibling, "next to the label folder") if sibling is not None else \
            ImageSource(None, f"not found (no images* folder next to the labels; pass {IMAGES_FLAG} {spec.name} "
                              "FOLDER)")
    return sources
