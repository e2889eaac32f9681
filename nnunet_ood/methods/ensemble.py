"""Uncertainty of the fold ensemble nnU-Net already runs (METHODS.md §3; Zenk et al. 2024).

nnU-Net predicts a case with every fold in use and averages the logits. The members' predictions are
streamed into :class:`FoldEnsemble` one fold at a time, so memory is a few volumes whatever the number
of folds:

* ``ensemble_entropy``: entropy of the mean of the members' probabilities, per voxel;
* ``ensemble_mi``: mutual information, entropy of the mean minus the mean of the members' entropies;
* ``pairwise_dice``: 1 - mean Dice between the members' segmentations over all pairs of members (mean
  over foreground classes or regions, both empty = 1). Its map is the share of member pairs that
  disagree at a voxel; its case score is the Dice-based number, not the mean of that map.

Region-based datasets use per-region sigmoid probabilities, binary entropies averaged over regions
and per-region masks (probability > 0.5). A per-fold fit cannot calibrate these: they have no
normalisation and no threshold in the state (``nnUNetv2_evaluate_ood --id_val`` gives one).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from nnunet_ood.methods.base import NON_NEGATIVE, UNIT_INTERVAL, FoldEnsembleMethod
from nnunet_ood.segmentation import dice, entropy, foreground_masks, probabilities

if TYPE_CHECKING:
    from torch import Tensor


class FoldEnsemble:
    """Streams the members' logits of one case (:meth:`add`); the maps and the pairwise Dice at the end."""

    def __init__(self, region_based: bool) -> None:
        self.region_based = region_based
        self.n = 0
        self._sum_p: Tensor | None = None
        self._sum_entropy: Tensor | None = None
        self._masks: list[Tensor] = []
        self._mean_entropy: Tensor | None = None

    def add(self, logits: Tensor) -> None:
        """One member's logits ``(C, *spatial)``."""
        p = probabilities(logits[None], self.region_based)[0]
        h = entropy(p, self.region_based)
        self._sum_p = p if self._sum_p is None else self._sum_p + p
        self._sum_entropy = h if self._sum_entropy is None else self._sum_entropy + h
        self._masks.append(foreground_masks(p, self.region_based))
        self._mean_entropy = None
        self.n += 1

    @property
    def _pairs(self) -> list[tuple[int, int]]:
        return list(itertools.combinations(range(self.n), 2))

    def mean_entropy(self) -> Tensor:
        """Entropy of the members' mean probabilities."""
        if self._mean_entropy is None:  # shared by ensemble_entropy and ensemble_mi
            self._mean_entropy = entropy(self._sum_p / self.n, self.region_based)
        return self._mean_entropy

    def mutual_information(self) -> Tensor:
        """Entropy of the mean minus the mean of the members' entropies (clipped at 0)."""
        return (self.mean_entropy() - self._sum_entropy / self.n).clamp_min(0)

    def disagreement(self) -> Tensor:
        """Share of member pairs whose segmentations differ at each voxel."""
        zeros = self._sum_entropy.new_zeros(self._sum_entropy.shape)
        pairs = self._pairs
        total = sum(((self._masks[i] != self._masks[j]).any(0).float() for i, j in pairs), zeros)
        return total / max(1, len(pairs))

    def pairwise_dice_score(self) -> float:
        """1 - mean Dice over all pairs of members (0 for a single member)."""
        pairs = self._pairs
        if not pairs:
            return 0.0
        n_spatial = self._masks[0].ndim - 1
        return 1.0 - sum(float(dice(self._masks[i], self._masks[j], n_spatial).mean()) for i, j in pairs) / len(pairs)


class EnsembleEntropy(FoldEnsembleMethod):
    name = "ensemble_entropy"
    score_range = NON_NEGATIVE
    summary = "entropy of the mean of the folds' probabilities, per voxel"

    def voxel_map(self, ensemble: FoldEnsemble) -> Tensor:
        return ensemble.mean_entropy()


class EnsembleMI(FoldEnsembleMethod):
    name = "ensemble_mi"
    summary = "mutual information: ensemble_entropy minus the mean of the folds' entropies, per voxel"

    def voxel_map(self, ensemble: FoldEnsemble) -> Tensor:
        return ensemble.mutual_information()


class PairwiseDice(FoldEnsembleMethod):
    name = "pairwise_dice"
    score_range = UNIT_INTERVAL  # 1 - a Dice
    summary = ("1 - mean Dice between the folds' segmentations over all pairs (case score); its map is the share "
               "of disagreeing pairs per voxel (Zenk et al. 2024)")

    def voxel_map(self, ensemble: FoldEnsemble) -> Tensor:
        return ensemble.disagreement()

    def case_score(self, voxel_map: Tensor, case: Any) -> float | None:
        return case.ensemble.pairwise_dice_score()
