"""LowerTriangularPanels: the lower half of a factor in row panels, against SciPy's triangular solve and
scikit-learn's Mahalanobis distances."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.covariance import LedoitWolf

from nnunet_ood.detectors.mahalanobis import MahalanobisDetector
from nnunet_ood.detectors.triangular import PANEL_ROWS, LowerTriangularPanels


def _lower(dim: int, seed: int = 0) -> np.ndarray:
    """A well-conditioned lower-triangular matrix with NaN above the diagonal (which must never be read)."""
    rng = np.random.default_rng(seed)
    lower = np.tril(rng.normal(0, 0.3, (dim, dim)), -1) + np.diag(rng.uniform(1, 2, dim))
    return np.where(np.tri(dim, dtype=bool), lower, np.nan)


@pytest.mark.parametrize("dim, block", [(37, 8), (16, 8), (5, 8), (1, 4)])
def test_forward_substitution_matches_scipy(dim, block) -> None:
    matrix = _lower(dim)
    panels = LowerTriangularPanels.from_dense(torch.from_numpy(matrix), block)
    assert [p.shape[0] for p in panels.panels] == [min(block, dim - s) for s in range(0, dim, block)]
    assert panels.dim == dim and panels.numel == sum(min(s + block, dim) * min(block, dim - s)
                                                      for s in range(0, dim, block))
    np.testing.assert_array_equal(panels.dense().numpy(), np.nan_to_num(matrix, nan=0.0))
    rhs = np.random.default_rng(1).normal(size=(7, dim))
    expected = scipy.linalg.solve_triangular(np.nan_to_num(matrix), rhs.T, lower=True)
    for given in (torch.from_numpy(rhs).mT, torch.from_numpy(rhs.T.copy())):  # a transposed view, a contiguous one
        np.testing.assert_allclose(panels.solve(given).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_holds_about_half_of_the_dense_factor() -> None:
    dim = 1000
    panels = LowerTriangularPanels.from_dense(torch.eye(dim, dtype=torch.float64))
    assert panels.numel <= dim * (dim + PANEL_ROWS) / 2 < 0.8 * dim * dim
    assert all(p.is_contiguous() for p in panels.panels)  # copies, not views keeping the dense matrix alive


def test_detector_with_several_panels_scores_as_scikit_learn() -> None:
    """D above one panel's rows: the fit's and the predictor's (scoring_only) distances both equal Ledoit-Wolf's."""
    rng = np.random.default_rng(0)
    dim = PANEL_ROWS + 88
    x = rng.normal(size=(1200, dim)) * rng.uniform(0.5, 3, dim) + rng.uniform(-2, 2, dim)
    y = np.concatenate([rng.normal(size=(20, dim)), x[:5] + rng.normal(0, 2, (5, dim))])
    reference = LedoitWolf().fit(x).mahalanobis(y)
    detector = MahalanobisDetector().fit(torch.from_numpy(x))
    np.testing.assert_allclose(detector.score(y).numpy(), reference, rtol=1e-8)
    assert len(detector._cholesky.panels) == 2
    np.testing.assert_allclose(detector.scoring_only().score(y).numpy(), reference, rtol=1e-8)
