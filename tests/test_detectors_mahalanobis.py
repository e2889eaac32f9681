"""MahalanobisDetector against scikit-learn and numpy brute-force references."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.covariance import EmpiricalCovariance, LedoitWolf

from nnunet_ood.detectors.base import FeatureDetector
from nnunet_ood.detectors.mahalanobis import MahalanobisDetector
from nnunet_ood.errors import OODInputError, OODStateError


def _well_conditioned(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows whose covariance has eigenvalues in [1, 10] and a non-zero mean."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scale = np.sqrt(rng.uniform(1.0, 10.0, size=d))
    return (rng.standard_normal((n, d)) * scale) @ q.T + rng.uniform(-5, 5, size=d)


def _fit_streamed(detector: MahalanobisDetector, x: np.ndarray, n_batches: int = 5) -> MahalanobisDetector:
    for chunk in np.array_split(x, n_batches):
        detector.partial_fit(torch.from_numpy(chunk))
    return detector


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = _well_conditioned(1500, 40)
    rng = np.random.default_rng(1)
    y = np.concatenate([_well_conditioned(30, 40, seed=2), x[:10] + rng.normal(0, 3, (10, 40))])
    return x, y


def test_unregularised_matches_sklearn_empirical_covariance(data) -> None:
    x, y = data
    detector = _fit_streamed(MahalanobisDetector(shrinkage=0.0), x)
    scores = detector.score(torch.from_numpy(y))
    assert scores.dtype == torch.float64 and scores.shape == (len(y),)
    np.testing.assert_allclose(scores.numpy(), EmpiricalCovariance().fit(x).mahalanobis(y), rtol=1e-6)
    assert detector.shrinkage_ == 0.0 and detector.jitter_ == 0.0
    np.testing.assert_allclose(detector.location_.numpy(), x.mean(0), rtol=1e-12, atol=1e-12)
    assert detector.n_features_in_ == 40 and detector.n_samples_seen_ == 1500


def test_default_ledoit_wolf_matches_sklearn(data) -> None:
    x, y = data
    detector = _fit_streamed(MahalanobisDetector(), x, n_batches=7)
    reference = LedoitWolf().fit(x)
    np.testing.assert_allclose(detector.shrinkage_, reference.shrinkage_, rtol=1e-9)
    np.testing.assert_allclose(detector.score(y).numpy(), reference.mahalanobis(y), rtol=1e-6)


def test_fixed_shrinkage_matches_numpy_brute_force(data) -> None:
    x, y = data
    s = 0.3
    detector = MahalanobisDetector(shrinkage=s, chunk_size=7).fit(torch.from_numpy(x).float())
    x32 = torch.from_numpy(x).float().double().numpy()  # the detector saw float32 features
    cov = np.cov(x32.T, bias=True)
    shrunk = (1 - s) * cov + s * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    diff = y - x32.mean(0)
    expected = np.einsum("ij,jk,ik->i", diff, np.linalg.inv(shrunk), diff)
    np.testing.assert_allclose(detector.score(y).numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(detector.regularized_covariance().numpy(), shrunk, rtol=1e-10, atol=1e-12)


def test_merge_equals_fit_on_everything(data) -> None:
    x, y = data
    parts = [MahalanobisDetector(shrinkage=0.0).fit(chunk) for chunk in (x[:3], x[3:900], x[900:])]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    expected = EmpiricalCovariance().fit(x).mahalanobis(y)
    np.testing.assert_allclose(merged.score(y).numpy(), expected, rtol=1e-6)


def test_cached_factor_is_invalidated_by_partial_fit(data) -> None:
    x, y = data
    detector = MahalanobisDetector().fit(x[:700])
    first = detector.score(y).numpy()
    np.testing.assert_allclose(first, LedoitWolf().fit(x[:700]).mahalanobis(y), rtol=1e-6)
    detector.partial_fit(x[700:])
    np.testing.assert_allclose(detector.score(y).numpy(), LedoitWolf().fit(x).mahalanobis(y), rtol=1e-6)


def test_fewer_samples_than_features_gives_finite_positive_distances() -> None:
    rng = np.random.default_rng(5)
    x = _well_conditioned(30, 120, seed=4)
    far = x.mean(0) + 20.0 * rng.standard_normal((10, 120))
    detector = MahalanobisDetector().fit(x)
    train_scores, far_scores = detector.score(x).numpy(), detector.score(far).numpy()
    assert np.all(np.isfinite(train_scores)) and np.all(train_scores > 0)
    assert np.all(np.isfinite(far_scores)) and train_scores.max() < far_scores.min()
    assert 0.0 < detector.shrinkage_ <= 1.0 and detector.jitter_ == 0.0


def test_singular_unshrunk_covariance_gets_jitter_and_warns() -> None:
    rng = np.random.default_rng(6)
    x = _well_conditioned(10, 60, seed=6)
    detector = MahalanobisDetector(shrinkage=0.0).fit(x)
    with pytest.warns(RuntimeWarning, match="jitter"):
        train_scores = detector.score(x).numpy()
    assert detector.jitter_ > 0.0
    far_scores = detector.score(x.mean(0) + 20.0 * rng.standard_normal((5, 60))).numpy()
    assert np.all(np.isfinite(train_scores)) and np.all(train_scores > 0)
    assert np.all(np.isfinite(far_scores)) and train_scores.max() < far_scores.min()
    # The jitter is reproduced on the cached factor: no second warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detector.score(x[:2])


def test_non_finite_rows_score_nan(data) -> None:
    x, y = data
    detector = MahalanobisDetector().fit(x)
    dirty = y.copy()
    dirty[[0, 7], 3] = np.nan
    dirty[12, 0] = np.inf
    scores = detector.score(dirty).numpy()
    bad = np.zeros(len(y), dtype=bool)
    bad[[0, 7, 12]] = True
    assert np.all(np.isnan(scores[bad]))
    np.testing.assert_allclose(scores[~bad], LedoitWolf().fit(x).mahalanobis(y[~bad]), rtol=1e-6)
    assert detector.score(np.full((2, 40), np.nan)).isnan().all()
    assert detector.score(np.zeros((0, 40))).shape == (0,)


def test_non_finite_training_rows_are_skipped(data) -> None:
    x, y = data
    dirty = x[:400].copy()
    dirty[[5, 6], 0] = np.nan
    dirty[300, 39] = -np.inf
    detector = _fit_streamed(MahalanobisDetector(shrinkage=0.0), dirty, n_batches=3)
    clean = np.delete(x[:400], [5, 6, 300], axis=0)
    assert detector.n_skipped_ == 3 and detector.n_samples_seen_ == 397
    np.testing.assert_allclose(detector.score(y).numpy(), EmpiricalCovariance().fit(clean).mahalanobis(y),
                               rtol=1e-6)


def test_save_load_round_trip(tmp_path, data) -> None:
    x, y = data
    detector = _fit_streamed(MahalanobisDetector(chunk_size=16), x)
    path = detector.save(tmp_path / "ood")
    assert path == os.path.join(str(tmp_path / "ood"), "mahalanobis.safetensors")
    assert os.listdir(tmp_path / "ood") == ["mahalanobis.safetensors"]  # no temporary files left
    loaded = MahalanobisDetector.load(tmp_path / "ood")
    assert isinstance(loaded, FeatureDetector) and loaded.is_fitted
    assert loaded.chunk_size == 16 and loaded.shrinkage == "ledoit_wolf"
    np.testing.assert_allclose(loaded.score(y).numpy(), LedoitWolf().fit(x).mahalanobis(y), rtol=1e-6)
    assert loaded.get_config() == detector.get_config()
    # Loading the file path directly works too, and an overwrite replaces the state.
    MahalanobisDetector(shrinkage=0.0).fit(x[:500]).save(tmp_path / "ood")
    reloaded = MahalanobisDetector.load(path)
    np.testing.assert_allclose(reloaded.score(y).numpy(), EmpiricalCovariance().fit(x[:500]).mahalanobis(y),
                               rtol=1e-6)


def _assert_state_error(directory, *fragments: str) -> None:
    with pytest.raises(OODStateError) as info:
        MahalanobisDetector.load(directory)
    message = str(info.value)
    assert "\n" not in message and "nnUNetv2_fit_ood" in message
    for fragment in fragments:
        assert fragment in message


def test_missing_truncated_and_garbage_files_raise(tmp_path, data) -> None:
    x, _ = data
    _assert_state_error(tmp_path / "nowhere", "mahalanobis.safetensors")
    path = MahalanobisDetector().fit(x).save(tmp_path)
    blob = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(blob[: len(blob) // 2])
    _assert_state_error(tmp_path, path)
    with open(path, "wb") as fh:
        fh.write(b"\x13\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
    _assert_state_error(tmp_path, path)
    with open(path, "wb") as fh:
        fh.write(os.urandom(1000))
    _assert_state_error(tmp_path, path)


def test_wrong_detector_name_and_missing_tensors_raise(tmp_path, data) -> None:
    x, _ = data
    detector = MahalanobisDetector().fit(x)
    path = detector.save(tmp_path)
    tensors = {k: v.contiguous() for k, v in detector.state_dict().items()}
    config = json.dumps(detector.get_config())
    save_file(tensors, path, metadata={"format_version": "1", "name": "knn", "config": config})
    _assert_state_error(tmp_path, path, "knn")
    del tensors["scatter"]
    save_file(tensors, path, metadata={"format_version": "1", "name": "mahalanobis", "config": config})
    _assert_state_error(tmp_path, path, "scatter")
    save_file({"mean": tensors["mean"]}, path, metadata={"format_version": "99", "name": "mahalanobis",
                                                         "config": config})
    _assert_state_error(tmp_path, path, "format version")


def test_unfitted_and_mismatched_use_raise(data) -> None:
    x, y = data
    with pytest.raises(OODStateError, match="nnUNetv2_fit_ood"):
        MahalanobisDetector().score(y)
    # one sample: say how many it has and how many it needs, not "not fitted"
    with pytest.raises(OODStateError, match="needs at least 2 finite training feature vectors, has 1"):
        MahalanobisDetector().fit(x[:1]).score(y)
    with pytest.raises(OODStateError, match="40"):
        MahalanobisDetector().fit(x).score(y[:, :39])
    with pytest.raises(OODStateError):
        MahalanobisDetector().save("unused")
    for bad in ("oas", -0.1, 1.5, True):
        with pytest.raises(OODInputError):
            MahalanobisDetector(shrinkage=bad)
    with pytest.raises(OODInputError):
        MahalanobisDetector(chunk_size=0)


def test_save_into_a_file_path_is_a_one_line_error(tmp_path, data) -> None:
    x, _ = data
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    with pytest.raises(OODInputError, match="is a file, not a folder"):
        MahalanobisDetector().fit(x).save(target)
    with pytest.raises(OODInputError, match="is a file, not a folder"):
        MahalanobisDetector().fit(x).save(target / "deeper")
    assert target.read_text() == "not a folder"


def test_scoring_only_keeps_sklearn_scores_and_refuses_to_refit(tmp_path, data) -> None:
    """The predictor keeps only the mean and the factor: the same distances as scikit-learn's Ledoit-Wolf, the
    scatter released, and updating, merging or saving refused with a one-line error instead of using it."""
    x, y = data
    reference = LedoitWolf().fit(x)
    detector = _fit_streamed(MahalanobisDetector(), x).scoring_only()
    assert detector.statistics.scatter.numel() == 0 and detector.statistics.third.numel() == 0
    np.testing.assert_allclose(detector.score(y).numpy(), reference.mahalanobis(y), rtol=1e-6)
    np.testing.assert_allclose(detector.shrinkage_, reference.shrinkage_, rtol=1e-9)
    config = detector.get_config()
    assert config["n_samples_seen_"] == 1500 and config["jitter_"] == 0.0
    for action, call in (("update", lambda: detector.partial_fit(x[:5])), ("save", lambda: detector.save(tmp_path)),
                         ("merge", lambda: MahalanobisDetector().fit(x).merge(detector))):
        with pytest.raises(OODStateError, match=f"cannot {action} the mahalanobis detector: its statistics were "
                                                "released.*load its state again"):
            call()
    # a detector factorised before (and one loaded from a file, as the predictor does) ends up the same
    factored = _fit_streamed(MahalanobisDetector(), x)
    factored.score(y[:1])
    np.testing.assert_array_equal(factored.scoring_only().score(y).numpy(), detector.score(y).numpy())
    _fit_streamed(MahalanobisDetector(), x).save(tmp_path)
    loaded = MahalanobisDetector.load(tmp_path).scoring_only()
    np.testing.assert_allclose(loaded.score(y).numpy(), reference.mahalanobis(y), rtol=1e-6)
    assert detector.fit(x).score(y[:1]).shape == (1,)  # fit starts afresh: allowed again
