"""Full-size volumes computed piecewise: slabs along the first spatial axis.

At clinical size (512 x 512 x 300 voxels) one float32 volume is 300 MB and an int64 one 630 MB; a voxelwise
computation made on the whole volume at once holds several such temporaries. Made slab by slab into one
preallocated result, it holds a slab's temporaries only: the same values, with a few dozen slabs per volume.

Voxelwise maps (:func:`in_slabs`) use thinner slabs, :data:`VOXELWISE_SLAB_VOXELS` (one 512 x 512 plane): each of
their elementwise steps reads and writes the whole slab, and a slab of a few MB stays in the CPU's caches between
steps where one of 32 MB goes to main memory every time (measured at 512 x 512 x 300 voxels, 2 classes: the five
logit maps took 3.6 s in slabs of 2^22 voxels, 2.2 s in slabs of 2^18).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

#: voxels per slab: a slab's temporaries (a few C x slab float32 tensors) stay near 100 MB
SLAB_VOXELS = 2**22
#: voxels per slab of :func:`in_slabs`: a slab's temporaries (a few C x slab float32 tensors) stay in the CPU's caches
VOXELWISE_SLAB_VOXELS = 2**18


def slab_slices(spatial: Sequence[int], voxels: int | None = None) -> Iterator[slice]:
    """Consecutive slices of the first axis of a volume of shape ``spatial``, each of about ``voxels`` (default
    :data:`SLAB_VOXELS`) voxels (at least one plane)."""
    step = max(1, (SLAB_VOXELS if voxels is None else voxels) // max(1, math.prod(spatial[1:])))
    for start in range(0, spatial[0], step):  # a few dozen slabs at clinical size, not a loop over voxels
        yield slice(start, min(start + step, spatial[0]))


def in_slabs(fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fn(logits)`` for a voxelwise ``fn`` (``(C, *spatial) -> (*spatial)``), computed in slabs of
    :data:`VOXELWISE_SLAB_VOXELS` along the first spatial axis into one preallocated map: the same values, without
    ``fn``'s full-size temporaries."""
    spatial = tuple(logits.shape[1:])
    parts = list(slab_slices(spatial, VOXELWISE_SLAB_VOXELS))
    if len(parts) <= 1:
        return fn(logits)
    out = torch.empty(spatial, dtype=dtype, device=logits.device)
    for part in parts:
        out[part] = fn(logits[:, part])
    return out
