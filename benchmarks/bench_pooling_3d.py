"""Pooled feature dimension, covariance memory and Mahalanobis fit time for nnU-Net's 3d_fullres bottlenecks.

nnU-Net's default 3d_fullres networks end their encoder with 320 channels on a bottleneck of 4 x 4 x 4 up to
7 x 7 x 5 voxels (the patch size divided by the network's total stride, anisotropic for anisotropic spacings).
For each shape this prints the pooled feature dimension D that the default rule gives
(:func:`nnunet_ood.features.pooled_shape`: 2-stride-2 average pooling until C * prod(spatial) < 1e4), the
memory of one D x D float64 matrix (the streamed sum of outer products; the Cholesky factor is another one), and
the time of :class:`~nnunet_ood.detectors.mahalanobis.MahalanobisDetector`'s fit at that D on this machine:
streaming ``--n`` random patches (float32 features, float64 statistics) and the factorisation. Run::

    python benchmarks/bench_pooling_3d.py [--n 20000] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from nnunet_ood.detectors.mahalanobis import MahalanobisDetector
from nnunet_ood.features import MAX_POOLED_FEATURES, pooled_shape

CHANNELS = 320
#: bottlenecks of nnU-Net's default 3d_fullres plans: isotropic and anisotropic, 4 x 4 x 4 to 7 x 7 x 5
SHAPES: tuple[tuple[int, int, int], ...] = ((4, 4, 4), (5, 5, 5), (6, 6, 6), (7, 7, 5), (4, 5, 5), (4, 6, 6),
                                           (5, 6, 7), (3, 6, 6), (2, 6, 6))


def fit_seconds(dim: int, n: int, batch: int = 2048) -> tuple[float, float]:
    """``(stream seconds, factorise seconds)`` of a fit on ``n`` random patches of dimension ``dim``."""
    generator = torch.Generator().manual_seed(0)
    detector = MahalanobisDetector()
    started = time.perf_counter()
    for start in range(0, n, batch):
        detector.partial_fit(torch.randn(min(batch, n - start), dim, generator=generator))
    streamed = time.perf_counter()
    detector.factorize()
    return streamed - started, time.perf_counter() - streamed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="training patches per fit (default: 20000)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{CHANNELS} channels, pooling until C * prod(spatial) < {MAX_POOLED_FEATURES}; fit on {args.n} patches, "
          f"{args.threads} threads")
    print(f"{'bottleneck':>12} {'pooled':>10} {'D':>7} {'D^2 x 8 B':>10} {'stream s':>9} {'factor s':>9} "
          f"{'s per 1e4 patches':>18}")
    timed: dict[int, tuple[float, float]] = {}
    for shape in SHAPES:
        pooled = pooled_shape(CHANNELS, shape)
        dim = CHANNELS * math.prod(pooled)
        assert dim < MAX_POOLED_FEATURES, (shape, dim)
        if dim not in timed:
            timed[dim] = fit_seconds(dim, args.n)
        stream, factor = timed[dim]
        print(f"{'x'.join(map(str, shape)):>12} {'x'.join(map(str, pooled)):>10} {dim:>7} "
              f"{dim * dim * 8 / 2**20:>8.0f} MB {stream:>9.1f} {factor:>9.1f} {stream / args.n * 1e4:>18.1f}")


if __name__ == "__main__":
    main()
