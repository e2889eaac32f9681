"""Exact nearest-neighbour search of :class:`~nnunet_ood.detectors.knn.KNNDetector`: brute force in float64, by
blocks, so that temporary memory stays bounded whatever the bank size.

For a chunk of queries the bank is scanned in blocks of rows, squared distances ||a||^2 + ||b||^2 - 2 a.b are computed
with one matrix product per block and a running top-k of the smallest is kept (:func:`nearest_indices`); the
distances to the k selected neighbours are then recomputed directly as ||a - b|| (:func:`neighbour_distances`), so a
training row's distance to itself is exactly 0 instead of the cancellation error of the expansion.
"""

from __future__ import annotations

import torch


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` divided by their Euclidean norm (all-zero rows stay zero)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / norm.clamp_min(torch.finfo(x.dtype).tiny)


def nearest_indices(bank: torch.Tensor, x: torch.Tensor, k: int, block_elements: int) -> torch.Tensor:
    """Bank indices (n, k) of the k nearest rows of ``bank`` (float32) to the float64 rows ``x``, in blocks of at
    most ``block_elements`` entries."""
    n, dim = x.shape
    step = max(1, block_elements // max(n, dim))
    x_sq = x.square().sum(dim=1, keepdim=True)
    best = x.new_empty((n, 0))
    best_index = torch.empty((n, 0), dtype=torch.int64, device=x.device)
    for start in range(0, bank.shape[0], step):
        block = bank[start:start + step].to(torch.float64)
        d2 = torch.addmm(x_sq, x, block.mT, alpha=-2.0).add_(block.square().sum(dim=1))
        del block
        width = best.shape[1]
        candidates = torch.cat([best, d2], dim=1)
        del d2
        best, position = torch.topk(candidates, min(k, candidates.shape[1]), dim=1, largest=False, sorted=False)
        del candidates
        from_block = position + (start - width)
        if width == 0:
            best_index = from_block
        else:
            kept = best_index.gather(1, position.clamp(max=width - 1))
            best_index = torch.where(position < width, kept, from_block)
    return best_index


def neighbour_distances(bank: torch.Tensor, x: torch.Tensor, index: torch.Tensor, block_elements: int) -> torch.Tensor:
    """Euclidean distances (n, k), float64, of the rows ``x`` to the rows ``index`` of ``bank``, in blocks of at most
    ``block_elements`` entries."""
    n, dim = x.shape
    step = max(1, block_elements // (index.shape[1] * dim))
    out = torch.empty(index.shape, dtype=torch.float64, device=x.device)
    for start in range(0, n, step):
        diff = bank[index[start:start + step]].to(torch.float64)  # (rows, k, D)
        diff.sub_(x[start:start + step, None, :])
        out[start:start + step] = torch.linalg.vector_norm(diff, dim=2)
    return out
