"""k-nearest-neighbour distance detector (Woodland et al. 2024; Sun et al., ICML 2022).

Woodland et al. score a patch by its distance to the nearest training patches in the space of the
same pooled bottleneck features that the Mahalanobis detector uses; no distribution is assumed.
Sun et al. ("Out-of-distribution detection with deep nearest neighbors") use the distance to the
k-th nearest training feature vector as the score, on L2-normalised features. Here the training
features are kept in a bounded bank (a uniform random sample once there are more rows than fit),
and distances are computed exactly, in float64, by blocks so that temporary memory stays bounded
(:mod:`nnunet_ood.detectors.nearest`); the bank's random draws are :mod:`nnunet_ood.detectors.reservoir`'s.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import torch

from nnunet_ood.detectors.base import ArrayLike, DeviceLike, FeatureDetector
from nnunet_ood.detectors.nearest import l2_normalize, nearest_indices, neighbour_distances
from nnunet_ood.detectors.reservoir import hypergeometric, reservoir_replacements
from nnunet_ood.detectors.statistics import as_feature_tensor
from nnunet_ood.errors import OODInputError, OODStateError

__all__ = ["DEFAULT_BLOCK_ELEMENTS", "KNNDetector"]

#: Default bound on the elements of one temporary distance block (float64: 128 MiB).
DEFAULT_BLOCK_ELEMENTS = 1 << 24

_AGGREGATES = ("kth", "mean")
_MAX_SEED = 2**63


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise OODInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class KNNDetector(FeatureDetector):
    """Euclidean distance of feature vectors to their k nearest training feature vectors.

    Score: with d_1 <= ... <= d_k the Euclidean distances (not squared) of a feature vector to
    its k nearest rows of the training bank, the score is d_k (``aggregate="kth"``, the k-th
    nearest-neighbour distance of Sun et al. 2022) or (d_1 + ... + d_k) / k
    (``aggregate="mean"``). The default k = 1 is the plain nearest-neighbour distance; larger k
    make the score less sensitive to single outlying training patches. Scoring is exact
    (brute force): for each chunk of ``chunk_size`` queries the bank is scanned in blocks of
    rows, squared distances ||a||^2 + ||b||^2 - 2 a.b are computed in float64 with one matrix
    product per block, and a running top-k of the smallest is kept. The distances to the k
    selected neighbours are then recomputed directly as ||a - b|| in float64, so scores of
    training rows are exactly 0 for k = 1 instead of the cancellation error of the expansion.
    A block holds at most ``block_elements`` entries (and so does the bank slice converted to
    float64), so temporary memory is about 3 * 8 * ``block_elements`` bytes whatever the
    bank size.

    Bank: the training feature vectors are stored as float32 rows, at most ``max_bank_size``
    of them (memory O(max_bank_size * D)). :meth:`partial_fit` appends rows while the bank is
    not full; beyond that it performs reservoir sampling (Vitter's algorithm R): the t-th row
    seen (0-based) replaces a uniformly chosen bank row with probability
    ``max_bank_size / (t + 1)``, so the bank is always a uniform random sample of all finite
    rows seen. The draws are vectorised per batch (one uniform number per row beyond the bound,
    from a ``torch.Generator`` seeded with ``seed``; when several rows of a batch hit the same
    bank row the last one wins, exactly as in the sequential algorithm), so the bank does not
    depend on how the stream is split into batches. Rows containing NaN or Inf are skipped and
    counted in :attr:`n_skipped_`.

    Normalisation: ``normalize=True`` divides every feature vector (training and query) by its
    L2 norm before distances are taken, as Sun et al. do for their penultimate-layer features.
    It is off by default because pooled nnU-Net bottleneck features are post-activation
    magnitudes: their norm itself carries information about how unusual a patch is, which
    normalisation would discard.

    Args:
        k: number of neighbours, >= 1.
        aggregate: ``"kth"`` (distance to the k-th nearest neighbour) or ``"mean"`` (mean
            distance to the k nearest neighbours).
        max_bank_size: maximum number of training rows kept, >= k.
        normalize: L2-normalise feature vectors before computing distances.
        seed: seed of the generator used for reservoir sampling and :meth:`merge`.
        device: device of the bank and of scoring; ``None`` adopts the device of the first
            training batch.
        chunk_size: query rows scored at once.
        block_elements: bound on the entries of one temporary distance block; lower it to
            bound memory further (tests lower it to exercise the blocking).
    """

    name: ClassVar[str] = "knn"

    def __init__(self, k: int = 1, aggregate: str = "kth", max_bank_size: int = 50_000,
                 normalize: bool = False, seed: int = 0, device: DeviceLike = None,
                 chunk_size: int = 4096, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> None:
        super().__init__(device=device, chunk_size=chunk_size)
        self.k = _check_int("k", k, 1)
        if aggregate not in _AGGREGATES:
            raise OODInputError(f"aggregate must be 'kth' or 'mean', got {aggregate!r}")
        self.aggregate = aggregate
        self.max_bank_size = _check_int("max_bank_size", max_bank_size, 1)
        if self.max_bank_size < self.k:
            raise OODInputError(
                f"max_bank_size ({self.max_bank_size}) must be at least k ({self.k}); "
                f"raise max_bank_size or use a smaller k"
            )
        if not isinstance(normalize, bool):
            raise OODInputError(f"normalize must be True or False, got {normalize!r}")
        self.normalize = normalize
        self.seed = _check_int("seed", seed, 0)
        if self.seed >= _MAX_SEED:
            raise OODInputError(f"seed must be below 2**63, got {seed!r}")
        self.block_elements = _check_int("block_elements", block_elements, 1)
        self.reset()

    def __repr__(self) -> str:
        return (f"KNNDetector(k={self.k}, aggregate={self.aggregate!r}, max_bank_size={self.max_bank_size}, "
                f"normalize={self.normalize}, device={self.device}, bank_size_={self.bank_size_}, "
                f"n_samples_seen_={self.n_samples_seen_}, n_features_in_={self.n_features_in_})")

    # ------------------------------------------------------------------ fitting
    def reset(self) -> None:
        """Empty the bank, forget the counts and re-seed the generator."""
        self._dim: int | None = None
        self._buffer: torch.Tensor | None = None  # (capacity, D) float32; rows [0, _rows) are the bank
        self._rows = 0
        self.n_samples_seen_ = 0
        self.n_skipped_ = 0
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)

    def _start(self, dim: int, device: torch.device) -> None:
        if dim < 1:
            raise OODInputError(f"features must have at least 1 column, got {dim}")
        self._dim = dim
        target = self._requested_device if self._requested_device is not None else device
        self._buffer = torch.empty((0, dim), dtype=torch.float32, device=target)

    def _append(self, rows: torch.Tensor) -> None:
        """Append ``rows`` to the bank, growing the buffer geometrically up to ``max_bank_size``."""
        assert self._buffer is not None
        needed = self._rows + rows.shape[0]
        if needed > self._buffer.shape[0]:
            capacity = min(self.max_bank_size, max(needed, 2 * self._buffer.shape[0]))
            grown = torch.empty((capacity, self._buffer.shape[1]), dtype=torch.float32, device=self._buffer.device)
            grown[:self._rows] = self._buffer[:self._rows]
            self._buffer = grown
        self._buffer[self._rows:needed] = rows
        self._rows = needed

    def partial_fit(self, X: ArrayLike) -> KNNDetector:
        """Stream the rows of ``X`` (N, D) into the bank (reservoir sampling beyond the bound).

        Rows that contain NaN or Inf (also after the cast to float32) are skipped.
        """
        x = as_feature_tensor(X)
        if self._dim is None:
            self._start(x.shape[1], x.device)
        elif x.shape[1] != self._dim:
            raise OODInputError(
                f"features have {x.shape[1]} columns but the knn detector was started with "
                f"{self._dim}; use features from the same network and pooling"
            )
        x = x.to(device=self.device)
        if self.normalize:
            x = l2_normalize(x.to(torch.float64))
        x = x.to(torch.float32)
        finite = torch.isfinite(x).all(dim=1)
        n_bad = int((~finite).sum())
        if n_bad:
            self.n_skipped_ += n_bad
            x = x[finite]
        self._absorb(x)
        return self

    def _absorb(self, x: torch.Tensor) -> None:
        """Reservoir-sample the finite float32 rows ``x`` (on :attr:`device`) into the bank."""
        n = x.shape[0]
        if n == 0:
            return
        bound = self.max_bank_size
        fill = min(n, bound - self._rows)  # the bank is not full only while rows == samples seen
        if fill > 0:
            self._append(x[:fill])
        rest = n - fill
        if rest > 0:
            assert self._buffer is not None
            first = self.n_samples_seen_ + fill  # 0-based stream index of x[fill]
            replaced = reservoir_replacements(first, rest, bound, self._generator)
            if replaced is not None:
                target, source = replaced[0], replaced[1] + fill
                device = self._buffer.device
                self._buffer[target.to(device)] = x[source.to(device)]
        self.n_samples_seen_ += n

    def merge(self, other: KNNDetector) -> KNNDetector:
        """Add the bank of ``other`` (fitted on other patches); returns ``self``.

        If all rows seen by both fit in ``max_bank_size`` the banks are concatenated, which is
        exactly the bank a fit on all rows would have. Otherwise the merged bank has
        m = ``max_bank_size`` rows drawn so that it is again a uniform random sample of the
        union: the number K taken from ``self`` is hypergeometric (m draws without replacement
        from n_a rows of ``self`` and n_b rows of ``other``, n = :attr:`n_samples_seen_`), so
        every drawn row comes from a bank with probability proportional to its
        :attr:`n_samples_seen_`; K rows of ``self``'s bank and m - K of ``other``'s are then
        chosen uniformly without replacement. The settings of ``self`` are kept; ``other`` is
        not modified, and merging an unfitted detector changes nothing (apart from
        :attr:`n_skipped_`).

        Raises :class:`OODInputError` if ``k``, ``aggregate`` or ``normalize`` differ, or if
        ``other`` kept fewer rows than this detector would need (smaller ``max_bank_size``
        and overflowed); :class:`OODStateError` if the feature dimensions differ.
        """
        self._check_merge_settings(other)
        if other._rows == 0:
            self.n_skipped_ += other.n_skipped_
            return self
        self._check_merge_bank(other)
        if self._dim is None:
            assert other._buffer is not None
            self._start(other._dim, other._buffer.device)  # type: ignore[arg-type]
        self._merge_bank(other)
        self.n_samples_seen_ += other.n_samples_seen_
        self.n_skipped_ += other.n_skipped_
        return self

    def _check_merge_settings(self, other: KNNDetector) -> None:
        """:meth:`merge` needs another knn detector with the same ``k``, ``aggregate`` and ``normalize``."""
        if not isinstance(other, KNNDetector):
            raise TypeError(f"can only merge another KNNDetector, got {type(other).__name__}")
        for setting in ("k", "aggregate", "normalize"):
            mine, theirs = getattr(self, setting), getattr(other, setting)
            if mine != theirs:
                raise OODInputError(
                    f"cannot merge a knn detector with {setting}={theirs!r} into one with "
                    f"{setting}={mine!r}; create all parts with the same settings"
                )

    def _check_merge_bank(self, other: KNNDetector) -> None:
        """:meth:`merge` needs a fitted ``other`` of the same feature dimension that kept every row it must give."""
        if self._dim is not None and other._dim != self._dim:
            raise OODStateError(
                f"cannot merge a knn detector fitted on {other._dim} features into one fitted on "
                f"{self._dim} features; fit all parts on features of the same network"
            )
        if other.max_bank_size < self.max_bank_size and other.n_samples_seen_ > other.max_bank_size:
            raise OODInputError(
                f"cannot merge a knn detector that kept {other._rows} of its {other.n_samples_seen_} rows "
                f"(max_bank_size={other.max_bank_size}) into one with max_bank_size={self.max_bank_size}; "
                f"create all parts with the same max_bank_size"
            )

    def _merge_bank(self, other: KNNDetector) -> None:
        """The bank of all rows seen by ``self`` and ``other``: both banks, or a uniform sample of the union."""
        assert self._buffer is not None
        theirs = other.bank_.to(self._buffer.device)
        n_a, n_b = self.n_samples_seen_, other.n_samples_seen_
        if n_a + n_b <= self.max_bank_size:
            # Both banks are complete (rows == samples seen): the union fits.
            self._append(theirs)
        else:
            size = self.max_bank_size
            from_self = hypergeometric(n_a, n_b, size, self._generator)
            device = self._buffer.device
            pick_a = torch.randperm(self._rows, generator=self._generator)[:from_self].to(device)
            pick_b = torch.randperm(other._rows, generator=self._generator)[:size - from_self].to(device)
            self._buffer = torch.cat([self._buffer[pick_a], theirs[pick_b]])
            self._rows = size

    @property
    def is_fitted(self) -> bool:
        """True once the bank holds at least one row (scoring also needs at least ``k``)."""
        return self._rows > 0

    @property
    def device(self) -> torch.device:
        """Device of the bank and of scoring."""
        if self._buffer is not None:
            return self._buffer.device
        return self._requested_device if self._requested_device is not None else torch.device("cpu")

    @property
    def n_features_in_(self) -> int | None:
        """Number of features D (``None`` before any data)."""
        return self._dim

    @property
    def bank_size_(self) -> int:
        """Number of training rows currently in the bank (min(n_samples_seen_, max_bank_size))."""
        return self._rows

    @property
    def bank_(self) -> torch.Tensor:
        """The training bank, float32 (bank_size_, D) (L2-normalised rows if ``normalize``); a view."""
        if self._buffer is None:
            return torch.empty((0, 0), dtype=torch.float32, device=self.device)
        return self._buffer[:self._rows]

    # ------------------------------------------------------------------ scoring
    def _check_enough_rows(self) -> None:
        if self._rows < self.k:
            raise OODStateError(
                f"the knn detector has {self._rows} training feature vector(s) in its bank but k={self.k} "
                f"neighbours are needed; fit it on more training patches or use a smaller k"
            )

    def _prepare_scoring(self) -> None:
        self._check_enough_rows()

    def _score_finite(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = l2_normalize(x)
        index = nearest_indices(self.bank_, x, self.k, self.block_elements)
        distances = neighbour_distances(self.bank_, x, index, self.block_elements)
        return distances.amax(dim=1) if self.aggregate == "kth" else distances.mean(dim=1)

    # ------------------------------------------------------------------ state
    def get_config(self) -> dict[str, Any]:
        """Constructor parameters plus fitted scalars (the bank itself is in :meth:`state_dict`)."""
        return {
            "k": self.k,
            "aggregate": self.aggregate,
            "max_bank_size": self.max_bank_size,
            "normalize": self.normalize,
            "seed": self.seed,
            "chunk_size": self.chunk_size,
            "block_elements": self.block_elements,
            "n_features_in_": self.n_features_in_,
            "n_samples_seen_": self.n_samples_seen_,
            "n_skipped_": self.n_skipped_,
            "bank_size_": self.bank_size_,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bank (float32 (bank_size_, D)) and the generator state (to continue sampling after a load).

        Raises :class:`OODStateError` if the bank has fewer than ``k`` rows, so that a state that
        cannot score fails when it is saved rather than at inference.
        """
        self._check_enough_rows()
        return {"bank": self.bank_, "rng_state": self._generator.get_state()}

    @classmethod
    def _from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                    device: DeviceLike) -> KNNDetector:
        detector = cls(k=config["k"], aggregate=config["aggregate"], max_bank_size=config["max_bank_size"],
                       normalize=config["normalize"], seed=config["seed"], device=device,
                       chunk_size=int(config.get("chunk_size", 4096)),
                       block_elements=int(config.get("block_elements", DEFAULT_BLOCK_ELEMENTS)))
        bank = tensors["bank"]
        if bank.dtype != torch.float32 or bank.ndim != 2:
            raise ValueError(f"bank is {bank.dtype} of shape {tuple(bank.shape)}, expected float32 (rows, D)")
        dim, seen, skipped = config["n_features_in_"], config["n_samples_seen_"], config.get("n_skipped_", 0)
        for key, value in (("n_features_in_", dim), ("n_samples_seen_", seen), ("n_skipped_", skipped)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} is {value!r}, expected a non-negative integer")
        if bank.shape[1] != dim or dim < 1:
            raise ValueError(f"bank has {bank.shape[1]} columns but n_features_in_ is {dim}")
        expected_rows = min(seen, detector.max_bank_size)
        if bank.shape[0] != expected_rows:
            raise ValueError(f"bank has {bank.shape[0]} rows, expected min(n_samples_seen_, max_bank_size) = "
                             f"{expected_rows}")
        if bank.shape[0] < detector.k:
            raise ValueError(f"bank has {bank.shape[0]} rows, fewer than k={detector.k}")
        if not bool(torch.isfinite(bank).all()):
            raise ValueError("bank contains NaN or Inf")
        if "rng_state" in tensors:
            try:
                detector._generator.set_state(tensors["rng_state"].to("cpu", torch.uint8))
            except RuntimeError as exc:
                raise ValueError(f"rng_state is not a generator state ({exc})") from exc
        detector._dim = dim
        detector._buffer = bank.to(detector.device)
        detector._rows = bank.shape[0]
        detector.n_samples_seen_ = seen
        detector.n_skipped_ = skipped
        return detector

    def to(self, device: DeviceLike) -> KNNDetector:
        """Move the bank to ``device`` in place; returns ``self``."""
        self._requested_device = torch.device(device) if device is not None else torch.device("cpu")
        if self._buffer is not None:
            self._buffer = self._buffer.to(self._requested_device)
        return self
