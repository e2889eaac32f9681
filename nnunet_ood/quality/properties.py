"""Simple properties of a predicted segmentation and its Dice, in nnU-Net's preprocessed space.

The quality model looks at them next to the method scores: a segmentation much smaller or larger than the
training cases' structures, or broken into many pieces, is suspicious whatever the scores say. Both are
computed from the final logits of a case (``(C, *spatial)``: class logits, or region logits for region-based
models) and compared with nnU-Net's preprocessed reference segmentation (``(1, *spatial)``; negative values
are outside the nonzero mask and count as background, voxels of the ignore label are left out).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from nnunet_ood.segmentation import class_labels, dice
from nnunet_ood.slabs import slab_slices

#: name of the connected-components feature
COMPONENTS = "components"


def class_names(label_manager: Any) -> list[str]:
    """One name per foreground class (label value) or region (``region1``, ... in the model's order)."""
    if label_manager.has_regions:
        return [f"region{i + 1}" for i in range(len(label_manager.foreground_regions))]
    return [str(int(label)) for label in label_manager.foreground_labels]


def volume_feature(name: str) -> str:
    return f"volume_{name}"


def property_names(label_manager: Any) -> list[str]:
    """The property features, in a fixed order: one relative volume per class, then the component count."""
    return [volume_feature(n) for n in class_names(label_manager)] + [COMPONENTS]


def _labels(label_manager: Any) -> list[Sequence[int]]:
    if label_manager.has_regions:
        return [tuple(np.atleast_1d(r).tolist()) for r in label_manager.foreground_regions]
    return [(int(label),) for label in label_manager.foreground_labels]


def predicted_masks(logits: torch.Tensor, label_manager: Any) -> torch.Tensor:
    """Boolean masks ``(K, *spatial)`` of the foreground classes as nnU-Net would export them."""
    logits = logits.float()
    if label_manager.has_regions:  # one sigmoid channel per region, foreground where above 0.5
        return logits > 0
    labels = class_labels(logits)
    wanted = torch.tensor([int(v) for v in label_manager.foreground_labels], device=labels.device)
    return labels.unsqueeze(0) == wanted.view(-1, *([1] * labels.ndim))


def reference_masks(seg: np.ndarray | torch.Tensor, label_manager: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masks (K, *spatial), valid (*spatial))`` of a preprocessed reference segmentation ``(1, *spatial)``."""
    seg = torch.as_tensor(np.asarray(seg[:]) if not isinstance(seg, torch.Tensor) else seg)[0].long()
    seg = seg.clamp_min(0)  # -1 marks voxels outside nnU-Net's nonzero mask: background
    valid = seg != label_manager.ignore_label if label_manager.has_ignore_label else \
        torch.ones_like(seg, dtype=torch.bool)
    masks = torch.stack([torch.isin(seg, torch.tensor(list(r))) for r in _labels(label_manager)])
    return masks, valid


def segmentation_dice(logits: torch.Tensor, seg: np.ndarray | torch.Tensor, label_manager: Any) -> float:
    """Mean Dice over the foreground classes (or regions) of the prediction against the reference.

    A class empty in both counts as 1, as in ``nnUNetv2_evaluate_ood``; ignore-label voxels are left out.
    """
    predicted = predicted_masks(logits, label_manager).cpu()
    reference, valid = reference_masks(seg, label_manager)
    if predicted.shape[1:] != reference.shape[1:]:
        raise ValueError(f"prediction {tuple(predicted.shape[1:])} and reference {tuple(reference.shape[1:])} "
                         "have different shapes")
    return float(dice(predicted & valid, reference & valid, predicted.ndim - 1).mean())


def reference_volumes(segs: Iterable[np.ndarray], label_manager: Any) -> dict[str, float]:
    """Median voxel count of each foreground class over reference segmentations (the training cases)."""
    counts = [reference_masks(seg, label_manager)[0].flatten(1).sum(1).double() for seg in segs]
    if not counts:
        raise ValueError("no reference segmentations to take volumes from")
    medians = torch.stack(counts).median(dim=0).values
    return dict(zip(class_names(label_manager), (float(v) for v in medians)))


def segmentation_properties(logits: torch.Tensor, label_manager: Any,
                            reference: Mapping[str, float]) -> dict[str, float]:
    """Per class ``log((volume + 1) / (reference volume + 1))``, and ``log(1 + connected components)`` of the
    predicted foreground (face connectivity)."""
    names = class_names(label_manager)
    volumes = torch.zeros(len(names), dtype=torch.float64)
    foreground = torch.empty(tuple(logits.shape[1:]), dtype=torch.bool)
    # slab by slab: the argmax of a whole 512 x 512 x 300 volume alone is 630 MB of int64 (counts are exact)
    for part in slab_slices(foreground.shape):
        masks = predicted_masks(logits[:, part], label_manager).cpu()
        volumes += masks.flatten(1).sum(1).double()
        foreground[part] = masks.any(0)
    out = {volume_feature(name): float(np.log((v + 1.0) / (reference[name] + 1.0)))
           for name, v in zip(names, volumes.tolist())}
    foreground = foreground.numpy()
    out[COMPONENTS] = float(np.log1p(ndimage.label(foreground)[1])) if foreground.any() else 0.0
    return out


def stored_label_manager(label_manager: Any) -> dict[str, Any]:
    """What :func:`segmentation_properties` needs of nnU-Net's label manager, as JSON (stored with the method)."""
    return {"has_regions": bool(label_manager.has_regions),
            "foreground_labels": [int(v) for v in label_manager.foreground_labels],
            "foreground_regions": [list(np.atleast_1d(r).tolist()) for r in label_manager.foreground_regions]
            if label_manager.has_regions else [],
            "ignore_label": None if label_manager.ignore_label is None else int(label_manager.ignore_label)}


class StoredLabelManager:
    """The attributes of nnU-Net's label manager that this module reads, rebuilt from
    :func:`stored_label_manager`'s JSON (at prediction, without the plans)."""

    def __init__(self, setup: dict[str, Any]) -> None:
        self.has_regions = bool(setup["has_regions"])
        self.foreground_labels = [int(v) for v in setup["foreground_labels"]]
        self.foreground_regions = [tuple(r) for r in setup["foreground_regions"]]
        self.ignore_label = setup["ignore_label"]
        self.has_ignore_label = self.ignore_label is not None
