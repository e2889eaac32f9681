"""Abstract base class of detectors that score per-patch feature vectors.

A detector maps features of shape (N, D) to N uncertainties, higher meaning more
out-of-distribution. The interface follows scikit-learn (``fit``/``partial_fit`` then
``score``) but works on torch tensors on any device. Fitted state is stored as one
safetensors file per detector: tensors plus a JSON config in the file's metadata; never
pickle, so loading a state file cannot execute code.
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nnunet_ood.detectors.statistics import as_feature_tensor
from nnunet_ood.errors import OODError, OODInputError, OODStateError
from nnunet_ood.io.atomic import atomic_save_tensors

__all__ = ["FORMAT_VERSION", "FeatureDetector"]

#: Version of the on-disk layout written by :meth:`FeatureDetector.save`.
FORMAT_VERSION = 1

_REFIT_HINT = "re-run nnUNetv2_fit_ood"

DeviceLike = torch.device | str | None
ArrayLike = torch.Tensor | np.ndarray
_Det = TypeVar("_Det", bound="FeatureDetector")


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """First line of an exception message, shortened, so our own messages stay one line."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


class FeatureDetector(ABC):
    """Scores per-patch feature vectors (N, D) -> (N,) uncertainties, higher = more OOD.

    Subclasses set :attr:`name` and implement :meth:`reset`, :meth:`partial_fit`,
    :meth:`_score_finite`, :attr:`is_fitted`, :attr:`n_features_in_`, :meth:`get_config`,
    :meth:`state_dict`, :meth:`_from_saved` and :meth:`to`. The base class provides
    :meth:`fit`, chunked :meth:`score` with NaN for non-finite rows, and :meth:`save` /
    :meth:`load`.

    Args:
        device: where fitted state lives and scoring runs; ``None`` lets the subclass decide
            (typically the device of the first training batch).
        chunk_size: number of rows scored at once, bounding temporary memory.
    """

    name: ClassVar[str]

    def __init__(self, device: DeviceLike = None, chunk_size: int = 4096) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise OODInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self._requested_device = torch.device(device) if device is not None else None

    # ------------------------------------------------------------------ fitting
    @abstractmethod
    def reset(self) -> None:
        """Forget everything learnt so far."""

    def fit(self: _Det, X: ArrayLike) -> _Det:
        """Fit from scratch on the rows of ``X`` (N, D): :meth:`reset`, then :meth:`partial_fit`."""
        self.reset()
        return self.partial_fit(X)

    @abstractmethod
    def partial_fit(self: _Det, X: ArrayLike) -> _Det:
        """Add the rows of ``X`` (N, D) to what was fitted so far; returns ``self``."""

    @property
    @abstractmethod
    def is_fitted(self) -> bool:
        """Whether :meth:`score` can be called."""

    @property
    @abstractmethod
    def n_features_in_(self) -> int | None:
        """Number of features D seen during fitting (``None`` before any data)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device on which the fitted state lives and scoring runs."""

    def _check_fitted(self) -> None:
        """Raise a one-line error saying why the detector cannot score yet."""
        if not self.is_fitted:
            raise OODStateError(
                f"the {self.name} detector is not fitted; fit it or load a fitted state "
                f"(run nnUNetv2_fit_ood) before scoring"
            )

    def scoring_only(self: _Det) -> _Det:
        """Release what only fitting, merging and saving need, keeping what :meth:`score` reads; returns ``self``.

        Scores stay exactly the same; afterwards the detector can no longer be updated, merged or saved. The
        predictor calls this on every detector it loads (a prediction never refits). Nothing to release by default.
        """
        return self

    # ------------------------------------------------------------------ scoring
    def _prepare_scoring(self) -> None:
        """Hook run once per :meth:`score` call before the chunks (e.g. to factorise lazily)."""
        return None

    @abstractmethod
    def _score_finite(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of finite float64 rows ``x`` (n, D) on :attr:`device`; returns (n,) float64."""

    def score(self, X: ArrayLike) -> torch.Tensor:
        """Uncertainty of each row of ``X`` (N, D); returns float64 (N,) on :attr:`device`.

        Higher means more out-of-distribution. Rows containing NaN or Inf score NaN, so one
        broken patch is visible instead of silently skewing a case score.
        """
        X = as_feature_tensor(X)
        self._check_fitted()
        if X.shape[1] != self.n_features_in_:
            raise OODStateError(
                f"features have {X.shape[1]} columns but the {self.name} detector was fitted on "
                f"{self.n_features_in_}; the fitted state belongs to another model or pooling, "
                f"{_REFIT_HINT} for this model"
            )
        self._prepare_scoring()
        device = self.device
        out = torch.full((X.shape[0],), math.nan, dtype=torch.float64, device=device)
        for start in range(0, X.shape[0], self.chunk_size):
            chunk = X[start:start + self.chunk_size].to(device=device, dtype=torch.float64)
            finite = torch.isfinite(chunk).all(dim=1)
            if bool(finite.all()):
                out[start:start + chunk.shape[0]] = self._score_finite(chunk)
            elif bool(finite.any()):
                index = torch.nonzero(finite).squeeze(1) + start
                out[index] = self._score_finite(chunk[finite])
        return out

    # ------------------------------------------------------------------ state
    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """JSON-able constructor parameters plus fitted scalars (keys ending in ``_``)."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that, with :meth:`get_config`, fully describe the fitted detector."""

    @classmethod
    @abstractmethod
    def _from_saved(cls: type[_Det], config: dict[str, Any], tensors: dict[str, torch.Tensor],
                    device: DeviceLike) -> _Det:
        """Rebuild a detector from a saved config and tensors (raise OODError if invalid)."""

    @abstractmethod
    def to(self: _Det, device: DeviceLike) -> _Det:
        """Move the fitted state to ``device`` in place; returns ``self``."""

    @classmethod
    def state_path(cls, directory: str | os.PathLike[str], state_name: str | None = None) -> str:
        """Path of the state file ``<state_name>.safetensors`` (default: the detector's name) inside ``directory``."""
        return os.path.join(os.fspath(directory), f"{state_name or cls.name}.safetensors")

    def save(self, directory: str | os.PathLike[str], state_name: str | None = None) -> str:
        """Write ``<directory>/<state_name>.safetensors`` atomically and return its path.

        ``state_name`` (default: the detector's ``name``) names the file and is recorded in it: a method that uses an
        existing detector class on features of its own passes its own name, so its state has a file of its own
        without a detector subclass. The file holds :meth:`state_dict` tensors and, in its metadata, the JSON
        :meth:`get_config` under ``"config"``, the ``"format_version"`` and the ``"name"``. It is written under a
        temporary name in the same directory and renamed, so a crash never leaves a half-written state file behind
        the real name.
        """
        if not self.is_fitted:
            raise OODStateError(f"cannot save the {self.name} detector before it is fitted; fit it first")
        path = self.state_path(directory, state_name)
        from nnunet_ood import __version__

        metadata = {
            "format_version": str(FORMAT_VERSION),
            "name": state_name or self.name,
            "config": json.dumps(self.get_config(), sort_keys=True),
            "nnunet_ood_version": __version__,
        }
        atomic_save_tensors(path, self.state_dict(), metadata)
        return path

    @classmethod
    def load(cls: type[_Det], directory: str | os.PathLike[str], device: DeviceLike = None,
             state_name: str | None = None) -> _Det:
        """Load a detector written by :meth:`save` (with the same ``state_name``, default the detector's name).

        ``directory`` is the folder passed to :meth:`save` (or the state file itself).
        Raises :class:`OODStateError` with a one-line message naming the file if it is
        missing, truncated or corrupt, belongs to another detector, or lacks tensors.
        """
        if not isinstance(getattr(cls, "name", None), str):
            raise TypeError("call load() on a concrete detector class, e.g. MahalanobisDetector.load(...)")
        directory = os.fspath(directory)
        expected = state_name or cls.name
        path = directory if os.path.isfile(directory) else cls.state_path(directory, state_name)
        if not os.path.isfile(path):
            raise OODStateError(f"no fitted {expected} state at {path}; run nnUNetv2_fit_ood to create it")
        try:
            with safe_open(path, framework="pt") as fh:
                metadata = fh.metadata() or {}
            tensors = load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises several types for bad files
            raise OODStateError(
                f"cannot read {path} ({_one_line(exc)}); the file is truncated or corrupt, "
                f"{_REFIT_HINT}"
            ) from exc
        version = metadata.get("format_version")
        if version != str(FORMAT_VERSION):
            raise OODStateError(
                f"{path} has format version {version!r} but this nnunet_ood reads "
                f"{FORMAT_VERSION!r}; {_REFIT_HINT}"
            )
        saved_name = metadata.get("name")
        if saved_name != expected:
            raise OODStateError(
                f"{path} holds a {saved_name!r} detector, not {expected!r}; {_REFIT_HINT} "
                f"or load it with the matching detector class"
            )
        try:
            config = json.loads(metadata.get("config", ""))
            if not isinstance(config, dict):
                raise ValueError("config is not a JSON object")
        except ValueError as exc:
            raise OODStateError(f"{path} has an unreadable config ({_one_line(exc)}); {_REFIT_HINT}") from exc
        try:
            return cls._from_saved(config, tensors, device)
        except (OODError, KeyError, TypeError, ValueError) as exc:
            raise OODStateError(
                f"{path} is not a valid {cls.name} state ({_one_line(exc)}); {_REFIT_HINT}"
            ) from exc
