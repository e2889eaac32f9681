"""``tta_dice``: 1 - mean Dice between the segmentations of nnU-Net's mirrored passes (METHODS.md §3).

The single-model analogue of the fold ensemble's ``pairwise_dice``. nnU-Net runs every patch un-mirrored and once
per combination of its mirror axes; a forward hook (:class:`MirroredMaskTap`, like ``tta``'s) sees each pass, flips
it back and keeps its foreground masks (argmax without background, or regions with p > 0.5). Per patch:

* the voxel map: the share of pass pairs whose segmentations differ at the voxel (``pairwise_dice``'s map);
* for every pair of passes (i, j) and every foreground class or region k, Gaussian-weighted counts
  ``I_ijk = sum_v w(v) [A_ik and A_jk]`` and ``S_ijk = sum_v w(v) ([A_ik] + [A_jk])``, with ``w`` nnU-Net's
  Gaussian importance map of a patch, summed in float64 over the case's patches (of every fold in use).

The case score is 1 - the mean over pairs and classes of ``2 I / S`` (a class empty in both passes everywhere, S = 0,
counts as Dice 1, as in :func:`nnunet_ood.segmentation.dice`). This is a Gaussian-weighted Dice over the patches,
with the weights nnU-Net's own merge gives a voxel in each patch that covers it (patch centres count most); it is
not the Dice of whole-volume segmentations of each pass, which would need one full volume per pass (8 in 3D).
Cost: one argmax (or threshold) per pass and patch and the pairwise counts; no extra forward pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nnunet_ood.methods.base import UNIT_INTERVAL, PatchMapMethod, Requirements, TapContext
from nnunet_ood.methods.tta import MirroredPasses
from nnunet_ood.segmentation import foreground_masks, probabilities

if TYPE_CHECKING:
    from torch import Tensor


def batch_foreground_masks(logits: Tensor, region_based: bool) -> Tensor:
    """Boolean masks ``(B, K, *patch)`` of the foreground classes or regions of a batch of logits ``(B, C, *patch)``."""
    import torch

    p = probabilities(logits, region_based)
    return torch.stack([foreground_masks(q, region_based) for q in p])


def pairwise_agreement(masks: Sequence[Tensor], weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(overlap, total, disagreement)`` of the masks ``(B, K, *patch)`` of several passes of the same patches.

    ``overlap`` and ``total`` are ``(pairs, K)``: per pair of passes (in ``itertools.combinations`` order) and class,
    ``sum w [A_i and A_j]`` and ``sum w ([A_i] + [A_j])`` over the batch and the patch, ``weights`` ``(*patch)``
    (float64). ``disagreement`` is ``(B, *patch)`` float32: the share of pairs whose masks differ at each voxel.
    """
    import torch

    dims = (0, *range(2, masks[0].ndim))  # batch and space: one count per class
    sizes = [(m * weights).sum(dims) for m in masks]
    pairs = list(itertools.combinations(range(len(masks)), 2))
    overlap = torch.stack([((masks[i] & masks[j]) * weights).sum(dims) for i, j in pairs])
    total = torch.stack([sizes[i] + sizes[j] for i, j in pairs])
    differ = torch.zeros((masks[0].shape[0], *masks[0].shape[2:]), dtype=torch.float32, device=masks[0].device)
    for i, j in pairs:
        differ += (masks[i] != masks[j]).any(1)
    return overlap, total, differ / len(pairs)


def weighted_dice_score(overlap: Tensor, total: Tensor) -> float:
    """1 - the mean over pairs and classes of ``2 overlap / total``; a pair and class with total 0 counts as Dice 1."""
    empty = total <= 0
    dice = (2 * overlap / total.masked_fill(empty, 1)).masked_fill(empty, 1)
    return 1.0 - float(dice.mean())


class MirroredMaskTap(MirroredPasses):
    """Forward hook on the network: the foreground masks of each of nnU-Net's passes of a patch, compared pairwise.

    After each patch, :attr:`disagreement` is the patch's voxel map; the Gaussian-weighted pair counts are summed
    per fold over the case's patches. The first patch of a fold's window starts that fold's counts afresh (fold 0's
    starts the case: every fold's), so a fold nnU-Net retries on the CPU is not counted twice and a case never
    inherits counts from the one before; :meth:`take_score` reads the case score and resets.
    """

    method_name = "tta_dice"

    def __init__(self, context: TapContext) -> None:
        super().__init__(context)
        self._masks: list[Tensor] = []
        self._fold = 0
        self._weights: Tensor | None = None
        self._counts: dict[int, tuple[Tensor, Tensor]] = {}  # by fold: (overlap, total), each (pairs, K)
        self.disagreement: Tensor | None = None

    def before_patch(self, fold_index: int) -> None:
        super().before_patch(fold_index)
        self._masks, self._fold = [], fold_index

    def add_pass(self, logits: Tensor) -> None:
        self._masks.append(batch_foreground_masks(logits, self.context.region_based))

    def _patch_weights(self, shape: tuple[int, ...], device: Any) -> Tensor:
        """nnU-Net's Gaussian importance map of a patch (float64), made once per patch shape and device."""
        import torch

        from nnunet_ood.aggregation import importance_weights

        if self._weights is None or tuple(self._weights.shape) != shape or self._weights.device != device:
            self._weights = importance_weights(shape, True, device).to(torch.float64)
        return self._weights

    def after_patch(self, x: Tensor, patch_index: int) -> None:
        """The patch's voxel map (:attr:`disagreement`); its pair counts added to the fold's."""
        self.end_passes()
        masks, self._masks = self._masks, []
        overlap, total, self.disagreement = pairwise_agreement(
            masks, self._patch_weights(tuple(x.shape[2:]), masks[0].device))
        if patch_index == 0:  # a fold's window begins (again, if nnU-Net retries it on the CPU)
            if self._fold == 0:
                self._counts = {}
            self._counts.pop(self._fold, None)
        if self._fold in self._counts:  # every patch of a case on the same device
            before = self._counts[self._fold]
            overlap, total = before[0] + overlap, before[1] + total
        self._counts[self._fold] = (overlap, total)

    def take_score(self) -> float:
        """The case score from the counts of every fold since the case began (1 - mean weighted Dice); resets."""
        counts, self._counts = list(self._counts.values()), {}
        if not counts:
            raise RuntimeError("tta_dice has seen no patch of this case")
        overlap = sum((o.cpu() for o, _ in counts[1:]), counts[0][0].cpu())
        total = sum((t.cpu() for _, t in counts[1:]), counts[0][1].cpu())
        return weighted_dice_score(overlap, total)


class TTADice(PatchMapMethod):
    name = "tta_dice"
    score_range = UNIT_INTERVAL  # 1 - a Dice
    summary = ("1 - mean Dice between the segmentations of nnU-Net's mirrored passes over all pairs of passes, "
               "Gaussian-weighted over the patches (case score); its map is the share of disagreeing pairs per voxel")
    requires = Requirements(mirroring=True)
    fit_by_default = False  # as a quality input it hurt the held-out shifts (docs/quality.md §5)
    tap = "nnunet_ood.methods.tta_dice:MirroredMaskTap"

    def patch_map(self, tap: MirroredMaskTap) -> Tensor:
        return tap.disagreement

    def case_score(self, voxel_map: Tensor, case: Any) -> float | None:
        return case.taps[self.tap].take_score()
