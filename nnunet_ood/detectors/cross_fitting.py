"""Out-of-sample training scores by cross-fitting, using the mergeable detector statistics.

The normalisation bounds are the min and 2·max of the ID training case scores (METHODS.md §1). Scored
by the detector fitted on them, training cases are in-sample: their distances are biased low, and
extremely so when there are fewer training patches than features (typical for 2D: one patch per
image), so that every unseen case, ID or not, lands at the top of the scale. Here the training cases
are split into K parts; a detector is fitted per part (one pass over the data), the fold's detector is
the exact merge of all parts, and each part's cases are scored by the merge of the *other* parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

D = TypeVar("D")  # a detector with ``merge`` (e.g. MahalanobisDetector)


def assign_parts(keys: Sequence[str], n_parts: int, seed: int = 0) -> dict[str, int]:
    """Split case identifiers into ``min(n_parts, len(keys))`` parts of (nearly) equal size, seeded."""
    keys = sorted(keys)
    n = max(1, min(n_parts, len(keys)))
    order = np.random.default_rng(seed).permutation(len(keys))
    return {keys[i]: rank % n for rank, i in enumerate(order)}


def merge_parts(parts: Sequence[D], fresh: D, skip: int | None = None) -> D:
    """Merge the detectors in ``parts`` (except index ``skip``) into the empty detector ``fresh``."""
    for index, part in enumerate(parts):
        if index != skip:
            fresh.merge(part)
    return fresh
