"""Uncertainty of the fold ensemble nnU-Net already runs (METHODS.md §3; Zenk et al. 2024).

nnU-Net predicts a case with every fold in use and averages the logits. The members' predictions are
streamed here one fold at a time, so memory is a few volumes whatever the number of folds:

* ``ensemble_entropy``: entropy of the mean of the members' probabilities, per voxel;
* ``ensemble_mi``: mutual information, entropy of the mean minus the mean of the members' entropies;
* ``pairwise_dice``: 1 - mean Dice between the members' segmentations over all pairs of members (mean
  over foreground classes or regions, both empty = 1). Its map is the share of member pairs that
  disagree at a voxel; its case score is the Dice-based number, not the mean of that map.

Region-based datasets use per-region sigmoid probabilities, binary entropies averaged over regions
and per-region masks (probability > 0.5).
"""

from __future__ import annotations

import itertools

import torch

from nnunet_ood.distortion import probabilities

ENSEMBLE_METHODS: tuple[str, ...] = ("ensemble_entropy", "ensemble_mi", "pairwise_dice")
_EPS = 1e-12


def _entropy(p: torch.Tensor, region_based: bool) -> torch.Tensor:
    """Per-voxel entropy ``(*spatial)`` of probabilities ``(C, *spatial)``."""
    if region_based:
        q = 1 - p
        return -(p * torch.log(p.clamp_min(_EPS)) + q * torch.log(q.clamp_min(_EPS))).mean(0)
    return -(p * torch.log(p.clamp_min(_EPS))).sum(0)


def _foreground_masks(p: torch.Tensor, region_based: bool) -> torch.Tensor:
    """Boolean masks ``(K, *spatial)`` of the foreground classes (argmax) or regions (p > 0.5)."""
    if region_based:
        return p > 0.5
    labels = p.argmax(0)
    return torch.stack([labels == c for c in range(1, p.shape[0])])


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    dims = tuple(range(1, a.ndim))
    total = a.sum(dims).double() + b.sum(dims).double()
    dice = torch.where(total > 0, 2 * (a & b).sum(dims).double() / total.clamp_min(1), torch.ones_like(total))
    return float(dice.mean())


class EnsembleAccumulator:
    """Streams the members' logits of one case; :meth:`maps` and :meth:`pairwise_dice_score` at the end."""

    def __init__(self, region_based: bool) -> None:
        self.region_based = region_based
        self.n = 0
        self._sum_p: torch.Tensor | None = None
        self._sum_entropy: torch.Tensor | None = None
        self._masks: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor) -> None:
        """One member's logits ``(C, *spatial)``."""
        p = probabilities(logits[None], self.region_based)[0]
        entropy = _entropy(p, self.region_based)
        self._sum_p = p if self._sum_p is None else self._sum_p + p
        self._sum_entropy = entropy if self._sum_entropy is None else self._sum_entropy + entropy
        self._masks.append(_foreground_masks(p, self.region_based))
        self.n += 1

    def maps(self) -> dict[str, torch.Tensor]:
        """Per-voxel maps of the three ensemble methods."""
        mean_entropy = _entropy(self._sum_p / self.n, self.region_based)
        pairs = list(itertools.combinations(range(self.n), 2))
        disagreement = sum(((a != b).any(0).float() for a, b in ((self._masks[i], self._masks[j]) for i, j in pairs)),
                           torch.zeros_like(mean_entropy))
        return {"ensemble_entropy": mean_entropy,
                "ensemble_mi": (mean_entropy - self._sum_entropy / self.n).clamp_min(0),
                "pairwise_dice": disagreement / max(1, len(pairs))}

    def pairwise_dice_score(self) -> float:
        """1 - mean Dice over all pairs of members (0 for a single member)."""
        pairs = list(itertools.combinations(range(self.n), 2))
        if not pairs:
            return 0.0
        return 1.0 - sum(_dice(self._masks[i], self._masks[j]) for i, j in pairs) / len(pairs)
