"""KNNDetector against numpy brute force, scikit-learn and the sequential reservoir algorithm."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.neighbors import NearestNeighbors

from nnunet_ood.detectors.base import FeatureDetector
from nnunet_ood.detectors.cross_fitting import merge_parts
from nnunet_ood.detectors.knn import KNNDetector
from nnunet_ood.errors import OODInputError, OODStateError

D = 12


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Float32 training rows (so the float32 bank holds them exactly) and float64 queries.

    The queries include training rows (distance 0), near copies and far points.
    """
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, D)) * rng.uniform(0.5, 3.0, D) + rng.uniform(-2, 2, D)).astype(np.float32)
    y = np.concatenate([
        rng.standard_normal((40, D)) * 2.0,
        x[:6].astype(np.float64),
        x[10:14] + rng.normal(0, 1e-3, (4, D)),
        rng.standard_normal((5, D)) * 20.0,
    ])
    return x, y


def _brute_force(x: np.ndarray, y: np.ndarray, k: int, aggregate: str) -> np.ndarray:
    """k-th / mean-of-k Euclidean distances from the full distance matrix."""
    distances = np.sqrt(((y[:, None, :] - x[None, :, :].astype(np.float64)) ** 2).sum(axis=2))
    nearest = np.sort(distances, axis=1)[:, :k]
    return nearest[:, -1] if aggregate == "kth" else nearest.mean(axis=1)


def _fit_streamed(detector: KNNDetector, x: np.ndarray, sizes: list[int]) -> KNNDetector:
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == len(x)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        detector.partial_fit(torch.from_numpy(x[lo:hi]))
    return detector


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("aggregate", ["kth", "mean"])
def test_scores_match_numpy_brute_force(data, k: int, aggregate: str) -> None:
    x, y = data
    expected = _brute_force(x, y, k, aggregate)
    # Tiny chunks and blocks: 7 queries at a time, bank blocks of 4 rows, one query per refinement step.
    small = _fit_streamed(KNNDetector(k=k, aggregate=aggregate, chunk_size=7, block_elements=50), x, [100, 1, 199])
    default = KNNDetector(k=k, aggregate=aggregate).fit(x)
    for detector in (small, default):
        scores = detector.score(y)
        assert scores.dtype == torch.float64 and scores.shape == (len(y),)
        np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-12, atol=1e-12)
    if k == 1:
        assert np.all(small.score(x[:6]).numpy() == 0.0)  # training rows: exactly zero, no cancellation error
    assert small.n_samples_seen_ == 300 and small.bank_size_ == 300 and small.n_features_in_ == D


def test_normalized_scores_match_numpy(data) -> None:
    x, y = data
    x_unit = (x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)
    y_unit = y / np.linalg.norm(y, axis=1, keepdims=True)
    detector = KNNDetector(k=3, normalize=True, chunk_size=9, block_elements=100).fit(x)
    np.testing.assert_allclose(detector.score(y).numpy(), _brute_force(x_unit, y_unit, 3, "kth"),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(detector.bank_, torch.from_numpy(x_unit))


@pytest.mark.parametrize("k", [1, 4])
def test_scores_match_sklearn_nearest_neighbors(data, k: int) -> None:
    x, y = data
    distances, _ = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(x.astype(np.float64)).kneighbors(y)
    detector = KNNDetector(k=k, chunk_size=16, block_elements=200).fit(torch.from_numpy(x))
    np.testing.assert_allclose(detector.score(y).numpy(), distances[:, -1], rtol=1e-9, atol=1e-9)
    mean = KNNDetector(k=k, aggregate="mean", block_elements=200).fit(x)
    np.testing.assert_allclose(mean.score(y).numpy(), distances.mean(axis=1), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------- bank and reservoir sampling
def _algorithm_r(n: int, bound: int, seed: int) -> np.ndarray:
    """Sequential algorithm R on the stream 0..n-1 with the detector's documented generator draws."""
    uniform = torch.rand(n - bound, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    bank = np.arange(bound, dtype=np.float32)
    for t in range(bound, n):
        slot = int(np.floor(uniform[t - bound] * (t + 1)))
        if slot < bound:
            bank[slot] = t
    return bank


def test_bank_is_bounded_subset_and_matches_sequential_algorithm_r(data) -> None:
    x, _ = data
    sizes = [20, 45, 1, 0, 90, 144]
    detector = KNNDetector(max_bank_size=50, seed=3)
    seen = 0
    for lo, size in zip(np.cumsum([0, *sizes[:-1]]), sizes):
        detector.partial_fit(x[lo:lo + size])
        seen += size
        assert detector.bank_size_ == min(seen, 50) and detector.bank_.shape == (min(seen, 50), D)
        assert detector.n_samples_seen_ == seen
    bank = detector.bank_.numpy()
    rows = {row.tobytes() for row in x}
    assert all(row.tobytes() in rows for row in bank)
    assert len({row.tobytes() for row in bank}) == 50  # distinct training rows, no duplicates

    # The same stream as 1-D features 0..n-1: the bank equals the sequential algorithm's,
    # whatever the batching (one draw per row beyond the bound, last writer wins).
    stream = np.arange(300, dtype=np.float32)[:, None]
    reference = _algorithm_r(300, 50, seed=3)
    for batches in ([300], sizes, [1] * 300):
        streamed = _fit_streamed(KNNDetector(max_bank_size=50, seed=3), stream, batches)
        np.testing.assert_array_equal(streamed.bank_.numpy()[:, 0], reference)


def test_reservoir_sample_is_uniform_over_seeds() -> None:
    n, bound, seeds = 1000, 100, range(30)
    stream = np.arange(n, dtype=np.float32)[:, None]
    means, early = [], []
    for seed in seeds:
        kept = _fit_streamed(KNNDetector(max_bank_size=bound, seed=seed), stream, [37, 150, 13, 400, 400])
        values = kept.bank_.numpy()[:, 0]
        assert len(np.unique(values)) == bound
        means.append(values.mean())
        early.append(np.mean(values < n / 2))
    # One sample mean has sd ~27; the average of 30 has sd ~5: the tolerances are > 5 sd, so a
    # uniform sampler cannot fail, while keeping the first rows (mean 49.5) or favouring late
    # batches would.
    assert abs(np.mean(means) - (n - 1) / 2) < 30
    assert abs(np.mean(early) - 0.5) < 0.06
    assert len(set(means)) > 25  # different seeds give different samples


# ---------------------------------------------------------------------- merge
def test_merge_without_overflow_equals_fit_on_everything(data) -> None:
    x, y = data
    whole = KNNDetector(k=5, chunk_size=11, block_elements=64).fit(x)
    parts = [KNNDetector(k=5, chunk_size=11, block_elements=64).fit(chunk) for chunk in (x[:3], x[3:150], x[150:])]
    merged = merge_parts(parts, KNNDetector(k=5, chunk_size=11, block_elements=64))
    assert merged.n_samples_seen_ == 300 and merged.bank_size_ == 300
    np.testing.assert_array_equal(merged.score(y).numpy(), whole.score(y).numpy())
    np.testing.assert_allclose(merged.score(y).numpy(), _brute_force(x, y, 5, "kth"), rtol=1e-12, atol=1e-12)
    # Leaving one part out (cross-fitting) equals a fit on the other parts; parts are not modified.
    others = merge_parts(parts, KNNDetector(k=5), skip=1)
    np.testing.assert_allclose(others.score(y).numpy(), _brute_force(np.concatenate([x[:3], x[150:]]), y, 5, "kth"),
                               rtol=1e-12, atol=1e-12)
    assert [p.bank_size_ for p in parts] == [3, 147, 150]
    # Merging an unfitted detector is a no-op; merging into an unfitted one copies.
    before = merged.score(y).numpy()
    assert merged.merge(KNNDetector(k=5)) is merged
    np.testing.assert_array_equal(merged.score(y).numpy(), before)
    assert merged.n_samples_seen_ == 300


def test_merge_with_overflow_is_uniform_sample_of_union() -> None:
    stream = np.arange(1000, dtype=np.float32)[:, None]
    bound, from_a, means = 100, [], []
    for seed in range(30):
        a = KNNDetector(max_bank_size=bound, seed=seed).fit(stream[:600])
        b = KNNDetector(max_bank_size=bound, seed=seed + 100).fit(stream[600:])
        merged = KNNDetector(max_bank_size=bound, seed=seed).merge(a).merge(b)
        values = merged.bank_.numpy()[:, 0]
        assert merged.bank_size_ == bound and merged.n_samples_seen_ == 1000
        assert len(np.unique(values)) == bound
        assert set(values.tolist()) <= set(a.bank_.numpy()[:, 0].tolist()) | set(b.bank_.numpy()[:, 0].tolist())
        from_a.append(np.sum(values < 600))
        means.append(values.mean())
    # 60 % of the union came from part A: K ~ hypergeometric(600, 400, 100), sd ~4.7 per seed, ~0.9 averaged.
    assert abs(np.mean(from_a) - 60) < 5
    assert abs(np.mean(means) - 499.5) < 30


def test_merge_rejects_mismatched_parts(data) -> None:
    x, _ = data
    base = KNNDetector(k=2).fit(x)
    with pytest.raises(OODStateError, match="features"):
        base.merge(KNNDetector(k=2).fit(x[:, :5]))
    with pytest.raises(OODInputError, match="k=3"):
        base.merge(KNNDetector(k=3).fit(x))
    with pytest.raises(OODInputError, match="normalize"):
        base.merge(KNNDetector(k=2, normalize=True).fit(x))
    with pytest.raises(OODInputError, match="max_bank_size"):
        base.merge(KNNDetector(k=2, max_bank_size=10).fit(x))
    with pytest.raises(TypeError):
        base.merge(object())  # type: ignore[arg-type]
    assert base.bank_size_ == 300 and base.n_samples_seen_ == 300  # failed merges changed nothing


# ---------------------------------------------------------------------- state
def test_save_load_round_trip(tmp_path, data) -> None:
    x, y = data
    detector = _fit_streamed(KNNDetector(k=3, aggregate="mean", max_bank_size=120, seed=7, chunk_size=13,
                                         block_elements=500), x, [100, 100, 100])
    path = detector.save(tmp_path / "ood")
    assert path == os.path.join(str(tmp_path / "ood"), "knn.safetensors")
    loaded = KNNDetector.load(tmp_path / "ood")
    assert isinstance(loaded, FeatureDetector) and loaded.is_fitted
    assert loaded.get_config() == detector.get_config()
    json.dumps(loaded.get_config())
    np.testing.assert_array_equal(loaded.score(y).numpy(), detector.score(y).numpy())
    # The generator state is saved: further streaming continues exactly as without the round trip.
    more = np.random.default_rng(9).standard_normal((200, D)).astype(np.float32)
    np.testing.assert_array_equal(loaded.partial_fit(more).bank_.numpy(), detector.partial_fit(more).bank_.numpy())


def _assert_state_error(path, *fragments: str) -> None:
    with pytest.raises(OODStateError) as info:
        KNNDetector.load(path)
    message = str(info.value)
    assert "\n" not in message and "nnUNetv2_fit_ood" in message
    for fragment in fragments:
        assert fragment in message


def test_corrupt_state_files_raise(tmp_path, data) -> None:
    x, _ = data
    detector = KNNDetector(k=2, max_bank_size=100).fit(x)
    path = detector.save(tmp_path)
    blob = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(blob[: len(blob) // 2])
    _assert_state_error(tmp_path, path)

    config = detector.get_config()
    good = {k: v.contiguous().clone() for k, v in detector.state_dict().items()}

    def write(tensors, **changes) -> None:
        meta = {"format_version": "1", "name": "knn", "config": json.dumps({**config, **changes})}
        save_file(tensors, path, metadata=meta)

    write({"rng_state": good["rng_state"]})
    _assert_state_error(tmp_path, "bank")
    write({**good, "bank": good["bank"][:, :5].contiguous()})
    _assert_state_error(tmp_path, "columns")
    write({**good, "bank": good["bank"][:50].contiguous()})
    _assert_state_error(tmp_path, "rows")
    write({**good, "bank": good["bank"].double()})
    _assert_state_error(tmp_path, "float32")
    nan_bank = good["bank"].clone()
    nan_bank[3, 1] = float("nan")
    write({**good, "bank": nan_bank})
    _assert_state_error(tmp_path, "NaN")
    write({**good, "rng_state": good["rng_state"][:10].contiguous()})
    _assert_state_error(tmp_path, "rng_state")
    write(good, k=0)
    _assert_state_error(tmp_path, "k must be")
    write(good, n_samples_seen_="many")
    _assert_state_error(tmp_path, "n_samples_seen_")
    write(good)
    assert KNNDetector.load(path).bank_size_ == 100


# ---------------------------------------------------------------------- edge cases and arguments
def test_non_finite_rows_score_nan_and_are_skipped_in_training(data) -> None:
    x, y = data
    dirty_train = x.copy()
    dirty_train[[4, 8], 2] = np.nan
    dirty_train[20, 0] = np.inf
    detector = KNNDetector(k=2).fit(dirty_train.astype(np.float64))
    assert detector.n_skipped_ == 3 and detector.n_samples_seen_ == 297
    clean = np.delete(x, [4, 8, 20], axis=0)
    dirty = y.copy()
    dirty[[0, 7], 3] = np.nan
    dirty[12, 0] = -np.inf
    scores = detector.score(dirty).numpy()
    bad = np.zeros(len(y), dtype=bool)
    bad[[0, 7, 12]] = True
    assert np.all(np.isnan(scores[bad]))
    np.testing.assert_allclose(scores[~bad], _brute_force(clean, y[~bad], 2, "kth"), rtol=1e-12, atol=1e-12)
    assert detector.score(np.full((2, D), np.nan)).isnan().all()
    assert detector.score(np.zeros((0, D))).shape == (0,)
    # Values beyond float32 range would become Inf in the bank: skipped as well.
    assert KNNDetector().fit(np.array([[1e300, 0.0], [1.0, 2.0]])).n_skipped_ == 1


def test_fewer_bank_rows_than_k_raises(tmp_path, data) -> None:
    x, y = data
    detector = KNNDetector(k=5).fit(x[:3])
    assert detector.is_fitted
    with pytest.raises(OODStateError, match=r"3 training feature vector\(s\).*k=5.*smaller k"):
        detector.score(y)
    with pytest.raises(OODStateError, match="k=5"):
        detector.save(tmp_path)
    with pytest.raises(OODStateError, match="not fitted"):
        KNNDetector().score(y)
    with pytest.raises(OODStateError, match="columns"):
        KNNDetector().fit(x).score(y[:, :5])
    with pytest.raises(OODInputError, match="columns"):
        KNNDetector().fit(x).partial_fit(x[:, :5])


@pytest.mark.parametrize("kwargs", [
    {"k": 0}, {"k": True}, {"k": 1.5}, {"max_bank_size": 0}, {"k": 5, "max_bank_size": 4},
    {"aggregate": "x"}, {"normalize": 1}, {"seed": -1}, {"block_elements": 0}, {"chunk_size": 0},
])
def test_bad_constructor_arguments_raise(kwargs) -> None:
    with pytest.raises(OODInputError):
        KNNDetector(**kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(data) -> None:
    x, y = data
    cpu = KNNDetector(k=4, max_bank_size=200, block_elements=300).fit(x)
    gpu = KNNDetector(k=4, max_bank_size=200, block_elements=300, device="cuda").fit(x)
    assert gpu.device.type == "cuda" and gpu.score(y).device.type == "cuda"
    np.testing.assert_array_equal(gpu.bank_.cpu().numpy(), cpu.bank_.numpy())
    np.testing.assert_allclose(gpu.score(y).cpu().numpy(), cpu.score(y).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cpu.to("cuda").score(y).cpu().numpy(), gpu.score(y).cpu().numpy(), rtol=1e-12)
