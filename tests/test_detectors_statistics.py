"""GaussianStatistics against brute-force numpy and scikit-learn references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf_shrinkage

from nnunet_ood.detectors.statistics import GaussianStatistics
from nnunet_ood.errors import OODInputError, OODStateError


def _data(n: int, d: int, seed: int = 0, offset: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    # Skewed (exponential) columns make the third moment non-zero, so it is really tested.
    z = np.concatenate([rng.standard_normal((n, d // 2)), rng.exponential(size=(n, d - d // 2))], axis=1)
    return z @ mix + offset + rng.standard_normal(d)


def _reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """Brute-force centred moments of the rows of x (float64)."""
    x = x.astype(np.float64)
    y = x - x.mean(axis=0)
    sq = (y**2).sum(axis=1)
    return {
        "mean": x.mean(axis=0),
        "cov": np.cov(x.T, bias=True),
        "scatter": y.T @ y,
        "third": (sq[:, None] * y).sum(axis=0),
        "fourth": np.sum(sq**2),
    }


def _assert_matches(stats: GaussianStatistics, x: np.ndarray, rtol: float = 1e-10) -> None:
    ref = _reference(x)
    assert stats.count == x.shape[0]
    scale = np.abs(x - x.mean(0)).max()
    np.testing.assert_allclose(stats.mean.numpy(), ref["mean"], rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(stats.covariance().numpy(), ref["cov"], rtol=rtol, atol=rtol * scale**2)
    np.testing.assert_allclose(stats.scatter.numpy(), ref["scatter"], rtol=rtol,
                               atol=rtol * np.abs(ref["scatter"]).max())
    np.testing.assert_allclose(stats.third.numpy(), ref["third"], rtol=rtol,
                               atol=rtol * np.abs(ref["third"]).max())
    np.testing.assert_allclose(stats.fourth.item(), ref["fourth"], rtol=rtol)


def test_streamed_uneven_batches_match_numpy() -> None:
    x = _data(613, 23)
    stats = GaussianStatistics()
    for start, stop in [(0, 1), (1, 1), (1, 50), (50, 51), (51, 300), (300, 613)]:
        stats.update(torch.from_numpy(x[start:stop]))
    assert stats.dim == 23 and stats.mean.dtype == torch.float64
    _assert_matches(stats, x)


def test_float32_and_numpy_inputs_are_cast_to_float64() -> None:
    x32 = _data(200, 17).astype(np.float32)
    stats = GaussianStatistics(dim=17)
    stats.update(x32[:120]).update(torch.from_numpy(x32[120:]))
    _assert_matches(stats, x32.astype(np.float64))


def test_large_offset_is_numerically_stable() -> None:
    # A naive sum-of-squares accumulator loses all digits here; centred merging does not.
    x = _data(1000, 10, offset=1e7)
    stats = GaussianStatistics()
    for chunk in np.array_split(x, 9):
        stats.update(torch.from_numpy(chunk))
    ref = np.cov(x.T, bias=True)
    np.testing.assert_allclose(stats.covariance().numpy(), ref, rtol=1e-7, atol=1e-7 * np.abs(ref).max())


def test_merge_of_three_parts_equals_whole() -> None:
    x = _data(700, 19, seed=1)
    parts = []
    for chunk in (x[:5], x[5:400], x[400:]):
        part = GaussianStatistics()
        for sub in np.array_split(chunk, 3):
            part.update(torch.from_numpy(sub))
        parts.append(part)
    merged = GaussianStatistics.merged(parts)
    _assert_matches(merged, x)
    # parts are left untouched by merged()
    _assert_matches(parts[1], x[5:400])
    in_place = GaussianStatistics().merge(parts[2]).merge(parts[0]).merge(parts[1])
    _assert_matches(in_place, x[np.r_[400:700, 0:5, 5:400]])


def test_empty_update_and_empty_merge_are_noops() -> None:
    x = _data(50, 8)
    stats = GaussianStatistics().update(torch.from_numpy(x))
    stats.update(torch.zeros(0, 8)).merge(GaussianStatistics()).merge(GaussianStatistics(dim=8))
    _assert_matches(stats, x)
    empty_first = GaussianStatistics().merge(stats)
    _assert_matches(empty_first, x)
    assert GaussianStatistics.merged([]).count == 0


@pytest.mark.parametrize("n,d", [(300, 20), (40, 120), (5, 30), (1000, 2)])
def test_ledoit_wolf_shrinkage_matches_sklearn(n: int, d: int) -> None:
    x = _data(n, d, seed=n + d)
    stats = GaussianStatistics()
    for chunk in np.array_split(x, 4):
        stats.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(stats.ledoit_wolf_shrinkage(), ledoit_wolf_shrinkage(x), rtol=1e-9, atol=1e-12)


def test_ledoit_wolf_shrinkage_from_merged_parts_and_single_feature() -> None:
    x = _data(400, 50, seed=3)
    merged = GaussianStatistics.merged(GaussianStatistics().update(torch.from_numpy(c))
                                       for c in np.array_split(x, 3))
    np.testing.assert_allclose(merged.ledoit_wolf_shrinkage(), ledoit_wolf_shrinkage(x), rtol=1e-9)
    one = GaussianStatistics().update(torch.from_numpy(x[:, :1]))
    assert one.ledoit_wolf_shrinkage() == ledoit_wolf_shrinkage(x[:, :1]) == 0.0


def test_non_finite_rows_are_skipped_and_counted() -> None:
    x = _data(100, 6)
    dirty = x.copy()
    dirty[[3, 50], 2] = np.nan
    dirty[70, 0] = np.inf
    dirty[99, 5] = -np.inf
    stats = GaussianStatistics()
    stats.update(torch.from_numpy(dirty[:60])).update(torch.from_numpy(dirty[60:]))
    _assert_matches(stats, np.delete(x, [3, 50, 70, 99], axis=0))
    assert stats.n_skipped == 4
    all_bad = GaussianStatistics().update(torch.full((3, 6), float("nan")))
    assert all_bad.count == 0 and all_bad.n_skipped == 3


def test_state_dict_round_trip_and_validation() -> None:
    x = _data(90, 7)
    stats = GaussianStatistics().update(torch.from_numpy(x[:1])).update(torch.from_numpy(x))
    restored = GaussianStatistics.from_state_dict(stats.state_dict())
    _assert_matches(restored, np.concatenate([x[:1], x]))
    state = stats.state_dict()
    assert set(state) >= {"count", "mean", "scatter", "third", "fourth"}
    assert all(v.dtype in (torch.float64, torch.int64) for v in state.values())
    with pytest.raises(OODStateError, match="fourth"):
        GaussianStatistics.from_state_dict({k: v for k, v in state.items() if k != "fourth"})
    with pytest.raises(OODStateError, match="scatter"):
        GaussianStatistics.from_state_dict({**state, "scatter": state["scatter"][:3]})
    with pytest.raises(OODStateError, match="NaN"):
        GaussianStatistics.from_state_dict({**state, "mean": torch.full((7,), float("nan"),
                                                                         dtype=torch.float64)})


def test_bad_inputs_raise() -> None:
    stats = GaussianStatistics().update(torch.randn(10, 4))
    with pytest.raises(OODInputError):
        stats.update(torch.randn(10, 5))
    with pytest.raises(OODInputError):
        stats.update(torch.randn(10))
    with pytest.raises(OODStateError):
        stats.merge(GaussianStatistics().update(torch.randn(3, 5)))
    with pytest.raises(OODStateError):
        GaussianStatistics(dim=4).covariance()
