"""Streaming, mergeable float64 sufficient statistics of feature vectors.

The Mahalanobis detector needs the mean and covariance of (possibly) millions of
high-dimensional feature vectors. Instead of keeping an N x D array (the reference code of
González et al. does), :class:`GaussianStatistics` folds batches into centred moments whose
size is O(D^2) and independent of N. Batches and separately fitted parts are combined with
the exact pairwise formulas of Chan, Golub and LeVeque (1979), extended here to the two
higher moments that the Ledoit-Wolf shrinkage needs.

Notation for one set of n vectors x_i with mean m and centred vectors y_i = x_i - m::

    scatter = sum_i y_i y_i^T               (D, D)
    third   = sum_i ||y_i||^2 y_i           (D,)
    fourth  = sum_i ||y_i||^4               ()

Moving the centre of a set by delta (y -> y - delta) changes them to (using sum_i y_i = 0)::

    scatter' = scatter + n delta delta^T
    third'   = third - 2 scatter delta - tr(scatter) delta - n ||delta||^2 delta
    fourth'  = fourth + 4 delta^T scatter delta + n ||delta||^4 - 4 delta^T third
               + 2 ||delta||^2 tr(scatter)

which follow from expanding ||y - delta||^2 = ||y||^2 - 2 y.delta + ||delta||^2. Merging sets
A and B shifts both to the joint mean and adds the results.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from nnunet_ood.errors import OODInputError, OODStateError

__all__ = ["GaussianStatistics"]

_TENSOR_KEYS = ("count", "mean", "scatter", "third", "fourth")

DeviceLike = torch.device | str | None


def as_feature_tensor(x: torch.Tensor | np.ndarray, what: str = "features") -> torch.Tensor:
    """Return ``x`` as a 2-D floating tensor (numpy arrays are wrapped without copying).

    Raises :class:`OODInputError` if ``x`` is not 2-D (rows are samples, columns features).
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2:
        raise OODInputError(
            f"{what} must be a 2-D array of shape (n_samples, n_features), got shape "
            f"{tuple(x.shape)}; flatten each feature vector into one row"
        )
    if x.is_complex():
        raise OODInputError(f"{what} must be real numbers, got dtype {x.dtype}")
    return x


class GaussianStatistics:
    """Streaming, mergeable float64 sufficient statistics of feature vectors (rows).

    Holds the count, mean, centred scatter matrix and the third and fourth centred moments
    needed for the Ledoit-Wolf shrinkage. Memory is O(D^2) whatever the number of rows.
    Rows containing NaN or Inf are skipped (and counted in :attr:`n_skipped`) so that one bad
    training patch cannot poison the fit.

    Args:
        dim: number of features D; if ``None`` it is taken from the first batch.
        device: where the statistics live; if ``None`` the device of the first batch is
            adopted (CPU until then).
    """

    def __init__(self, dim: int | None = None, device: DeviceLike = None) -> None:
        self._device_fixed = device is not None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dim: int | None = None
        self.count: int = 0
        self.n_skipped: int = 0
        if dim is not None:
            self._allocate(int(dim))
        else:
            self.mean = torch.zeros(0, dtype=torch.float64, device=self.device)
            self.scatter = torch.zeros(0, 0, dtype=torch.float64, device=self.device)
            self.third = torch.zeros(0, dtype=torch.float64, device=self.device)
            self.fourth = torch.zeros((), dtype=torch.float64, device=self.device)

    def _allocate(self, dim: int) -> None:
        if dim < 1:
            raise OODInputError(f"feature dimension must be at least 1, got {dim}")
        self.dim = dim
        kw = {"dtype": torch.float64, "device": self.device}
        self.mean = torch.zeros(dim, **kw)
        self.scatter = torch.zeros(dim, dim, **kw)
        self.third = torch.zeros(dim, **kw)
        self.fourth = torch.zeros((), **kw)

    def __repr__(self) -> str:
        return (f"GaussianStatistics(dim={self.dim}, count={self.count}, n_skipped={self.n_skipped}, "
                f"device={self.device})")

    # ------------------------------------------------------------------ accumulation
    def update(self, x: torch.Tensor | np.ndarray) -> GaussianStatistics:
        """Fold the rows of ``x`` (N, D) into the statistics, exactly; returns ``self``.

        ``x`` may have any real dtype and live on any device; it is cast to float64 on this
        object's device. Non-finite rows are skipped and counted in :attr:`n_skipped`.
        """
        x = as_feature_tensor(x)
        if self.dim is None:
            if not self._device_fixed:
                self.device = x.device
            self._allocate(x.shape[1])
        elif x.shape[1] != self.dim:
            raise OODInputError(
                f"features have {x.shape[1]} columns but the statistics were started with "
                f"{self.dim}; use features from the same network and pooling"
            )
        x = x.to(device=self.device, dtype=torch.float64)
        finite = torch.isfinite(x).all(dim=1)
        n_bad = int((~finite).sum())
        if n_bad:
            self.n_skipped += n_bad
            x = x[finite]
        n_b = x.shape[0]
        if n_b == 0:
            return self

        mean_b = x.mean(dim=0)
        y = x - mean_b  # centred batch, (N, D): batch-sized, never dataset-sized
        sq = y.square().sum(dim=1)  # ||y_i||^2
        third_b = y.T @ sq
        fourth_b = sq.square().sum()
        trace_b = sq.sum()

        if self.count == 0:
            self.count = n_b
            self.mean = mean_b
            self.scatter.zero_().addmm_(y.T, y)
            self.third = third_b
            self.fourth = fourth_b
            return self

        n_a = self.count
        n = n_a + n_b
        diff = mean_b - self.mean
        d_a = diff * (n_b / n)  # shift of A's centre to the joint mean
        d_b = -diff * (n_a / n)
        # The O(D^2) terms of set A must be read from the scatter before it is overwritten.
        third_a, fourth_a = _shifted_higher_moments(
            n_a, self.scatter @ d_a, torch.trace(self.scatter), self.third, self.fourth, d_a)
        yd = y @ d_b
        third_bs, fourth_bs = _shifted_higher_moments(n_b, y.T @ yd, trace_b, third_b, fourth_b, d_b)
        # scatter_A + scatter_B + (n_a n_b / n) diff diff^T in one GEMM: the rank-one term is an
        # extra row appended to the centred batch, so the D x D matrix is touched only once.
        z = torch.cat([y, (diff * (n_a * n_b / n) ** 0.5).unsqueeze(0)], dim=0)
        self.scatter.addmm_(z.T, z)
        self.mean = self.mean + d_a
        self.third = third_a + third_bs
        self.fourth = fourth_a + fourth_bs
        self.count = n
        return self

    def merge(self, other: GaussianStatistics) -> GaussianStatistics:
        """Merge ``other`` into ``self`` in place (exact); returns ``self``.

        Merging with an empty object is a no-op; ``other`` is never modified.
        """
        self.n_skipped += other.n_skipped
        if other.count == 0:
            return self
        if self.dim is None:
            if not self._device_fixed:
                self.device = other.device
            self._allocate(other.dim)  # type: ignore[arg-type]
        elif other.dim != self.dim:
            raise OODStateError(
                f"cannot merge statistics of {other.dim} features into statistics of {self.dim} "
                f"features; fit all parts on features of the same network"
            )
        o = {k: getattr(other, k).to(self.device) for k in ("mean", "scatter", "third", "fourth")}
        if self.count == 0:
            self.count = other.count
            self.mean = o["mean"].clone()
            self.scatter = o["scatter"].clone()
            self.third = o["third"].clone()
            self.fourth = o["fourth"].clone()
            return self

        n_a, n_b = self.count, other.count
        n = n_a + n_b
        diff = o["mean"] - self.mean
        d_a = diff * (n_b / n)
        d_b = -diff * (n_a / n)
        third_a, fourth_a = _shifted_higher_moments(
            n_a, self.scatter @ d_a, torch.trace(self.scatter), self.third, self.fourth, d_a)
        third_b, fourth_b = _shifted_higher_moments(
            n_b, o["scatter"] @ d_b, torch.trace(o["scatter"]), o["third"], o["fourth"], d_b)
        self.scatter.add_(o["scatter"]).addr_(diff, diff, alpha=n_a * n_b / n)
        self.mean = self.mean + d_a
        self.third = third_a + third_b
        self.fourth = fourth_a + fourth_b
        self.count = n
        return self

    @classmethod
    def merged(cls, parts: Iterable[GaussianStatistics]) -> GaussianStatistics:
        """Return new statistics equal to those of all ``parts`` together (parts are unchanged)."""
        out: GaussianStatistics | None = None
        for part in parts:
            if out is None:
                out = cls(device=part.device)
            out.merge(part)
        return out if out is not None else cls()

    # ------------------------------------------------------------------ estimates
    def _require_samples(self) -> None:
        if self.count == 0:
            raise OODStateError(
                "the statistics contain no finite feature vectors; fit on at least two training "
                "patches (re-run nnUNetv2_fit_ood)"
            )

    def covariance(self) -> torch.Tensor:
        """Maximum-likelihood covariance ``scatter / count`` (as sklearn's EmpiricalCovariance)."""
        self._require_samples()
        return self.scatter / self.count

    def ledoit_wolf_shrinkage(self) -> float:
        """Ledoit-Wolf shrinkage intensity computed from the statistics alone.

        Equals ``sklearn.covariance.ledoit_wolf_shrinkage(X)`` (``assume_centered=False``) on
        the same rows: with S = scatter / n and mu = tr(S) / D,
        beta = (fourth / n - ||S||_F^2) / (D n), delta = (||S||_F^2 - D mu^2) / D and the
        shrinkage is min(beta, delta) / delta.
        """
        self._require_samples()
        d = self.dim
        assert d is not None
        if d == 1:
            return 0.0  # sklearn: for a single feature the shrinkage is irrelevant
        n = float(self.count)
        s_fro2 = float(self.scatter.square().sum()) / n**2  # ||S||_F^2
        mu = float(torch.trace(self.scatter)) / (n * d)
        beta = (float(self.fourth) / n - s_fro2) / (d * n)
        delta = (s_fro2 - d * mu**2) / d
        beta = min(beta, delta)
        if beta <= 0.0 or delta <= 0.0:
            # beta >= 0 and delta >= 0 hold mathematically; <= 0 means S is already a
            # multiple of the identity (or rounding), where no shrinkage is needed.
            return 0.0
        return beta / delta

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the statistics (float64, count as int64)."""
        if self.dim is None:
            raise OODStateError("cannot save statistics that have seen no data; fit first")
        return {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "n_skipped": torch.tensor(self.n_skipped, dtype=torch.int64),
            "mean": self.mean,
            "scatter": self.scatter,
            "third": self.third,
            "fourth": self.fourth,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: DeviceLike = None
                        ) -> GaussianStatistics:
        """Rebuild statistics from :meth:`state_dict` output, validating shapes and values.

        Raises :class:`OODStateError` if tensors are missing, mis-shaped or non-finite.
        """
        missing = [k for k in _TENSOR_KEYS if k not in state]
        if missing:
            raise OODStateError(f"statistics are missing tensor(s) {', '.join(missing)}")
        mean = state["mean"]
        if mean.ndim != 1 or mean.shape[0] < 1:
            raise OODStateError(f"statistics 'mean' has shape {tuple(mean.shape)}, expected (D,)")
        d = mean.shape[0]
        expected = {"scatter": (d, d), "third": (d,), "fourth": (), "count": ()}
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise OODStateError(
                    f"statistics '{key}' has shape {tuple(state[key].shape)}, expected {shape}")
        count = int(state["count"])
        if count < 0:
            raise OODStateError(f"statistics have a negative count ({count})")
        out = cls(dim=d, device=device if device is not None else mean.device)
        for key in ("mean", "scatter", "third", "fourth"):
            value = state[key].to(device=out.device, dtype=torch.float64)
            if not bool(torch.isfinite(value).all()):
                raise OODStateError(f"statistics '{key}' contains NaN or Inf")
            setattr(out, key, value.clone())
        out.count = count
        out.n_skipped = int(state["n_skipped"]) if "n_skipped" in state else 0
        return out

    def to(self, device: DeviceLike) -> GaussianStatistics:
        """Move the statistics to ``device`` in place; returns ``self``."""
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._device_fixed = True
        for key in ("mean", "scatter", "third", "fourth"):
            setattr(self, key, getattr(self, key).to(self.device))
        return self


def _shifted_higher_moments(
    n: int,
    scatter_delta: torch.Tensor,
    scatter_trace: torch.Tensor,
    third: torch.Tensor,
    fourth: torch.Tensor,
    delta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Third and fourth moments of a set after moving its centre by ``delta``.

    Takes ``scatter @ delta`` and ``tr(scatter)`` rather than the scatter itself so that a
    batch can supply them from its centred rows without forming its own D x D matrix.
    """
    dd = delta @ delta
    new_third = third - 2.0 * scatter_delta - scatter_trace * delta - (n * dd) * delta
    new_fourth = (fourth + 4.0 * (delta @ scatter_delta) + n * dd * dd - 4.0 * (delta @ third)
                  + 2.0 * dd * scatter_trace)
    return new_third, new_fourth
