"""The random draws that keep :class:`~nnunet_ood.detectors.knn.KNNDetector`'s bank a uniform sample of every row
seen: reservoir sampling of a batch (Vitter's algorithm R, vectorised) and the split of a merged bank between its two
parts (hypergeometric). Every draw comes from the detector's seeded ``torch.Generator``.
"""

from __future__ import annotations

import numpy as np
import torch

_HYPERGEOMETRIC_LIMIT = 10**9  # numpy's hypergeometric needs both population parts below this


def reservoir_replacements(first: int, rest: int, bound: int,
                           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Which bank rows the ``rest`` rows of stream index ``first``, ``first + 1``, ... replace in a full bank of
    ``bound`` rows: ``(target, source)``, bank rows and 0-based rows of the batch part, or None when none does.

    The t-th row seen replaces a uniformly chosen bank row with probability ``bound / (t + 1)`` (one uniform number
    per row); when several rows aim at one bank row the last one wins, exactly as in the sequential algorithm.
    """
    index = torch.arange(first, first + rest, dtype=torch.int64)
    uniform = torch.rand(rest, generator=generator, dtype=torch.float64)
    slots = torch.minimum(torch.floor(uniform * (index + 1).to(torch.float64)).to(torch.int64), index)
    chosen = slots < bound
    if not bool(chosen.any()):
        return None
    position = torch.nonzero(chosen).squeeze(1)
    # The sequential algorithm lets the last of several rows aimed at one slot win.
    winner = torch.full((bound,), -1, dtype=torch.int64)
    winner.scatter_reduce_(0, slots[chosen], position, reduce="amax")
    target = torch.nonzero(winner >= 0).squeeze(1)
    return target, winner[target]


def hypergeometric(n_a: int, n_b: int, draws: int, generator: torch.Generator) -> int:
    """Number of rows of the first part among ``draws`` drawn without replacement (seeded)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    if n_a < _HYPERGEOMETRIC_LIMIT and n_b < _HYPERGEOMETRIC_LIMIT:
        return int(rng.hypergeometric(n_a, n_b, draws))
    # Populations this large: the binomial is indistinguishable from the hypergeometric.
    count = int(rng.binomial(draws, n_a / (n_a + n_b)))
    return min(max(count, draws - n_b, 0), n_a, draws)
