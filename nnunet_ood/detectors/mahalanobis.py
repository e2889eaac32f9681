"""Pooled Mahalanobis detector (González et al., Medical Image Analysis 2022).

The paper fits a Gaussian to pooled bottleneck features of the training patches and scores a
patch by its squared Mahalanobis distance (paper eq. 1-2). Its reference code uses sklearn's
``EmpiricalCovariance`` on float16 features: O(N*D) memory, no regularisation (singular
whenever N < D) and a pseudo-inverse by eigendecomposition. Here the fit streams into
float64 sufficient statistics (O(D^2) memory), the covariance is shrunk, and distances are
computed with a Cholesky factor.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, ClassVar

import torch

from nnunet_ood.detectors.base import ArrayLike, DeviceLike, FeatureDetector
from nnunet_ood.detectors.statistics import GaussianStatistics
from nnunet_ood.detectors.triangular import LowerTriangularPanels
from nnunet_ood.errors import OODInputError, OODStateError

__all__ = ["LatentMahalanobisDetector", "MahalanobisDetector"]

_JITTER_START = 1e-10  # relative to tr(S)/D
_JITTER_TRIES = 10


def _check_shrinkage(shrinkage: str | float) -> str | float:
    if isinstance(shrinkage, str):
        if shrinkage != "ledoit_wolf":
            raise OODInputError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1], got {shrinkage!r}")
        return shrinkage
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, numbers.Real):
        raise OODInputError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1], got {shrinkage!r}")
    value = float(shrinkage)
    if not 0.0 <= value <= 1.0:
        raise OODInputError(f"shrinkage must be in [0, 1], got {value}")
    return value


class MahalanobisDetector(FeatureDetector):
    """Squared Mahalanobis distance of feature vectors to a shrunk Gaussian fit.

    Fitting streams rows into :class:`~nnunet_ood.statistics.GaussianStatistics`, so memory is
    O(D^2) whatever the number of training patches, and detectors fitted on separate parts
    can be combined exactly with :meth:`merge`.

    Regularisation: with S the maximum-likelihood covariance and mu = tr(S) / D, the
    detector uses

        S' = (1 - s) S + s mu I,

    where s is the Ledoit-Wolf shrinkage estimated from the streamed statistics
    (``shrinkage="ledoit_wolf"``, identical to ``sklearn.covariance.LedoitWolf``) or a fixed
    number in [0, 1]. s = 0 reproduces the unregularised empirical covariance of the paper.
    If the Cholesky factorisation of S' still fails (e.g. s = 0 with fewer patches than
    features), a jitter of 1e-10 mu is added to the diagonal and multiplied by 10 until the
    factorisation succeeds (at most 10 tries); a warning is emitted and the jitter is
    recorded in :attr:`jitter_`.

    Score: d^2(x) = (x - m)^T S'^{-1} (x - m) = ||L^{-1}(x - m)||^2 with S' = L L^T, computed
    in float64 by forward substitution in chunks of ``chunk_size`` rows; the factor is held without
    its zero upper half (:class:`~nnunet_ood.detectors.triangular.LowerTriangularPanels`). The factor is computed
    lazily on the first score after fitting or loading (or by :meth:`factorize`) and cached
    until :meth:`partial_fit` or :meth:`merge` changes the statistics. Only the statistics
    are saved; the factor is recomputed on load.

    Args:
        shrinkage: ``"ledoit_wolf"`` or a fixed shrinkage intensity s in [0, 1].
        device: device of the statistics and of scoring; ``None`` adopts the device of the
            first training batch.
        chunk_size: rows scored at once.
    """

    name: ClassVar[str] = "mahalanobis"

    def __init__(self, shrinkage: str | float = "ledoit_wolf", device: DeviceLike = None,
                 chunk_size: int = 4096) -> None:
        super().__init__(device=device, chunk_size=chunk_size)
        self.shrinkage = _check_shrinkage(shrinkage)
        self.reset()

    def __repr__(self) -> str:
        return (f"MahalanobisDetector(shrinkage={self.shrinkage!r}, device={self.device}, "
                f"n_samples_seen_={self.n_samples_seen_}, n_features_in_={self.n_features_in_})")

    # ------------------------------------------------------------------ fitting
    def reset(self) -> None:
        """Forget all statistics and the cached factor."""
        self.statistics = GaussianStatistics(device=self._requested_device)
        self._invalidate()

    def _invalidate(self) -> None:
        self._cholesky: LowerTriangularPanels | None = None
        self._shrinkage_used: float | None = None
        self._jitter: float | None = None
        self._scoring_only = False

    def _check_statistics_kept(self, action: str) -> None:
        if self._scoring_only:
            raise OODStateError(f"cannot {action} the {self.name} detector: its statistics were released for "
                                "scoring (scoring_only()); load its state again to update, merge or save it")

    def scoring_only(self) -> MahalanobisDetector:
        """Factorise, then release the D x D scatter matrix and the higher moments: scoring reads only the mean and
        the Cholesky factor's lower half, so the detector then holds about D^2 / 2 float64 numbers instead of
        1.5 D^2 (92 MB instead of 276 MB at D = 4800). The covariance is formed in the scatter's own memory, so this
        never holds more than two D x D matrices at once."""
        self._check_fitted()
        statistics, factor = self.statistics, None
        if self._cholesky is None:
            shrinkage = self.shrinkage_  # from the scatter and the moments, before they go (kept for get_config)
            factor, jitter = self._regularized_cholesky(statistics.scatter.div_(statistics.count), shrinkage)
        # released before the factor's lower half is copied out of it: never more than two D x D matrices at once
        statistics.scatter = statistics.third = torch.empty(0, dtype=torch.float64, device=statistics.device)
        if factor is not None:
            self._keep_factor(factor, jitter)
        self._scoring_only = True
        return self

    def partial_fit(self, X: ArrayLike) -> MahalanobisDetector:
        """Stream the rows of ``X`` (N, D) into the statistics; non-finite rows are skipped."""
        self._check_statistics_kept("update")
        self.statistics.update(X)
        self._invalidate()
        return self

    def merge(self, other: MahalanobisDetector) -> MahalanobisDetector:
        """Add the statistics of ``other`` (fitted on other patches) exactly; returns ``self``.

        The shrinkage setting of ``self`` is kept; ``other`` is not modified.
        """
        if not isinstance(other, MahalanobisDetector):
            raise TypeError(f"can only merge another MahalanobisDetector, got {type(other).__name__}")
        self._check_statistics_kept("merge")
        other._check_statistics_kept("merge")
        self.statistics.merge(other.statistics)
        self._invalidate()
        return self

    @property
    def is_fitted(self) -> bool:
        """True once at least two finite feature vectors have been seen."""
        return self.statistics.count >= 2

    @property
    def device(self) -> torch.device:
        """Device of the statistics and of scoring."""
        return self.statistics.device

    @property
    def n_features_in_(self) -> int | None:
        """Number of features D (``None`` before any data)."""
        return self.statistics.dim

    @property
    def n_samples_seen_(self) -> int:
        """Number of finite training rows folded into the statistics."""
        return self.statistics.count

    @property
    def n_skipped_(self) -> int:
        """Number of training rows skipped because they contained NaN or Inf."""
        return self.statistics.n_skipped

    @property
    def location_(self) -> torch.Tensor:
        """Mean feature vector m (float64, (D,))."""
        self._check_fitted()
        return self.statistics.mean

    @property
    def shrinkage_(self) -> float:
        """Shrinkage intensity s actually used (Ledoit-Wolf estimate or the fixed value)."""
        self._check_fitted()
        if self._shrinkage_used is None:
            # Cheap (O(D^2)) compared with the factorisation, so no need to factorise here.
            self._shrinkage_used = (self.statistics.ledoit_wolf_shrinkage()
                                    if self.shrinkage == "ledoit_wolf" else float(self.shrinkage))
        return self._shrinkage_used

    @property
    def jitter_(self) -> float:
        """Diagonal jitter that was needed for the Cholesky factorisation (0.0 if none)."""
        self.factorize()
        assert self._jitter is not None
        return self._jitter

    def regularized_covariance(self) -> torch.Tensor:
        """Regularised covariance S' = (1 - s) S + s mu I + jitter I (float64, (D, D))."""
        self.factorize()
        assert self._cholesky is not None
        factor = self._cholesky.dense()
        return factor @ factor.mT

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise OODStateError(
                f"the {self.name} detector needs at least 2 finite training feature vectors, has "
                f"{self.statistics.count}; fit it on more training patches (nnUNetv2_fit_ood)"
            )

    # ------------------------------------------------------------------ factorisation
    def factorize(self) -> MahalanobisDetector:
        """Compute and cache the Cholesky factor of the regularised covariance; returns ``self``.

        Called lazily by :meth:`score`; call it explicitly to pay the O(D^3) cost up front.
        """
        if self._cholesky is not None:
            return self
        self._check_fitted()
        # the covariance is a new tensor, modified there
        return self._keep_factor(*self._regularized_cholesky(self.statistics.covariance(), self.shrinkage_))

    def _keep_factor(self, factor: torch.Tensor, jitter: float) -> MahalanobisDetector:
        """Cache the dense factor ``factor`` without its zero upper half (:class:`LowerTriangularPanels`: half the
        memory) and the jitter it needed."""
        self._cholesky = LowerTriangularPanels.from_dense(factor)
        self._jitter = jitter
        return self

    def _regularized_cholesky(self, cov: torch.Tensor, s: float) -> tuple[torch.Tensor, float]:
        """Regularise the covariance ``cov`` with shrinkage ``s`` in place and factorise it: ``(factor, jitter)``."""
        dim = cov.shape[0]
        mu = float(torch.trace(cov)) / dim
        if s > 0.0:
            cov.mul_(1.0 - s)
            cov.diagonal().add_(s * mu)
        factor, info = torch.linalg.cholesky_ex(cov)
        jitter = 0.0
        if int(info) != 0:
            # mu = 0 happens only for constant features; any positive scale then works.
            scale = mu if mu > 0.0 and math.isfinite(mu) else 1.0
            for attempt in range(_JITTER_TRIES):
                del factor
                new_jitter = _JITTER_START * scale * 10.0**attempt
                cov.diagonal().add_(new_jitter - jitter)
                jitter = new_jitter
                factor, info = torch.linalg.cholesky_ex(cov)
                if int(info) == 0:
                    break
            else:
                raise OODStateError(
                    f"the regularised covariance ({dim} features, {self.n_samples_seen_} samples, "
                    f"shrinkage {s:g}) is not positive definite even with jitter {jitter:.3g}; "
                    f"use shrinkage='ledoit_wolf' and re-run nnUNetv2_fit_ood"
                )
            warnings.warn(
                f"Mahalanobis covariance ({dim} features, {self.n_samples_seen_} samples, shrinkage "
                f"{s:g}) is not positive definite; added jitter {jitter:.3g} to its diagonal. "
                f"Use shrinkage='ledoit_wolf' or more training patches for a better-conditioned fit.",
                RuntimeWarning,
                stacklevel=2,
            )
        return factor, jitter

    def _prepare_scoring(self) -> None:
        self.factorize()

    def _score_finite(self, x: torch.Tensor) -> torch.Tensor:
        assert self._cholesky is not None
        centred = x - self.statistics.mean
        z = self._cholesky.solve(centred.mT)  # column i of Z = L^{-1}(x_i - m)
        return z.square().sum(dim=0)

    # ------------------------------------------------------------------ state
    def get_config(self) -> dict[str, Any]:
        """Constructor parameters plus fitted scalars.

        For a fitted detector this factorises the covariance (to report ``jitter_``), so a
        state that cannot be factorised fails when it is saved rather than at inference.
        """
        config: dict[str, Any] = {"shrinkage": self.shrinkage, "chunk_size": self.chunk_size}
        fitted = self.is_fitted
        config.update({
            "n_features_in_": self.n_features_in_,
            "n_samples_seen_": self.n_samples_seen_,
            "n_skipped_": self.n_skipped_,
            "shrinkage_": self.shrinkage_ if fitted else None,
            "jitter_": self.jitter_ if fitted else None,
        })
        return config

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The streamed statistics (count, n_skipped, mean, scatter, third, fourth)."""
        self._check_statistics_kept("save")
        return self.statistics.state_dict()

    @classmethod
    def _from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                    device: DeviceLike) -> MahalanobisDetector:
        detector = cls(shrinkage=config["shrinkage"], device=device,
                       chunk_size=int(config.get("chunk_size", 4096)))
        detector.statistics = GaussianStatistics.from_state_dict(
            tensors, device=device if device is not None else "cpu")
        detector._check_fitted()
        return detector

    def to(self, device: DeviceLike) -> MahalanobisDetector:
        """Move statistics (and the cached factor) to ``device`` in place; returns ``self``."""
        self._requested_device = torch.device(device) if device is not None else None
        self.statistics.to(device)
        if self._cholesky is not None:
            self._cholesky = self._cholesky.to(self.statistics.device)
        return self


class LatentMahalanobisDetector(MahalanobisDetector):
    """Latent Mahalanobis (Lennartz & Schultz): the same Gaussian fit, on latent vectors of the SD family.

    Identical statistics and scoring to :class:`MahalanobisDetector`; only the features differ (the dense latent
    of the SD family's shared model, :mod:`nnunet_ood.methods.sd`, instead of pooled U-Net activations), hence its
    own name and state file.
    """

    name: ClassVar[str] = "latent_mahalanobis"
