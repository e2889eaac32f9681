"""What a method's fit hooks are given: :class:`FitContext`, one fold's fit (its predictor, cases and options).

The fit (:mod:`nnunet_ood.fitting`) builds it and runs its passes with it; methods read it in
``fit_parameters``, ``fit_report`` and ``fit_on_failure_table``. It lives with the methods that read it, below
the fit and the predictor (docs/architecture.md#layers), so the predictor and the options it holds are typed by
what is used of them (nnU-Net's predictor, :class:`FitSettings`), not by classes of those higher layers.

Only the fit imports this module at run time (it imports torch); method modules name it for type checkers.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch

from nnunet_ood.folds import Fold

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

P = TypeVar("P", bound="nnUNetPredictor")


class FitSettings(Protocol):
    """What the fit context and the methods' fit hooks read of the fit's options
    (:class:`nnunet_ood.fitting.options.FitOptions`, which checks method names against the registry)."""

    @property
    def seed(self) -> int: ...

    @property
    def progress(self) -> bool: ...

    @property
    def batch_size(self) -> int: ...

    def config(self, config_class: type) -> Any:
        """The options instance of a method's ``config_class`` (its defaults unless given)."""


def as_tensor(data: Any) -> torch.Tensor:
    """A preprocessed case's image array (possibly memory-mapped) as a float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(data[:], dtype=np.float32)))


@contextmanager
def mirroring(predictor: P, on: bool = True) -> Iterator[P]:
    """Predict with nnU-Net's test-time mirroring on (as default inference) or off, inside the block."""
    previous, predictor.use_mirroring = predictor.use_mirroring, on
    try:
        yield predictor
    finally:
        predictor.use_mirroring = previous


@dataclass
class FitContext:
    """One fold's fit: the predictor of the fold, its cases and the options. Passed to methods' fit hooks."""

    predictor: nnUNetPredictor  # the fold's nnunet_ood.inference.predictor.nnUNetOODPredictor
    options: FitSettings  # the fit's nnunet_ood.fitting.options.FitOptions
    fold: Fold
    dataset_class: Any  # nnU-Net's dataset class of the preprocessed data
    data_folder: str
    train_keys: list[str]
    val_keys: list[str]
    dataset: Any = field(init=False)
    _logits: Any = field(init=False, default=None)  # TemporaryDirectory with the validation cases' logits
    _logit_files: dict[str, str] = field(init=False, default_factory=dict)
    #: what methods recorded of each validation case for their fit reports (Method.case_record): key -> method ->
    #: record, filled by the validation pass
    case_records: dict[str, dict[str, Any]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.dataset = self.dataset_class(self.data_folder, sorted(set(self.train_keys) | set(self.val_keys)))

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def seed(self) -> int:
        return self.options.seed

    @property
    def progress(self) -> bool:
        return self.options.progress

    @property
    def label_manager(self) -> Any:
        return self.predictor.label_manager

    def log(self, message: str) -> None:
        print(f"fold {self.fold} {message}", flush=True)

    def load_case(self, key: str) -> torch.Tensor:
        """The preprocessed image of a case ``(C, *spatial)``."""
        return self.load_case_with_labels(key)[0]

    def load_case_with_labels(self, key: str) -> tuple[torch.Tensor, np.ndarray]:
        """The preprocessed image and nnU-Net's preprocessed segmentation of a case."""
        data, seg, _, _ = self.dataset.load_case(key)
        return as_tensor(data), seg

    def predict_logits(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's own prediction of a preprocessed case (sliding window, mirroring as at default inference)."""
        with mirroring(self.predictor):
            return self.predictor.predict_logits_from_preprocessed_data(data)

    def keep_validation_logits(self, key: str, logits: torch.Tensor) -> None:
        """Keep a validation case's final logits (nnU-Net's float16) for :meth:`validation_logits`."""
        if self._logits is None:
            self._logits = tempfile.TemporaryDirectory(prefix="nnunet_ood_fit_")
        path = os.path.join(self._logits.name, f"{len(self._logit_files)}.npy")
        np.save(path, logits.cpu().half().numpy())
        self._logit_files[key] = path

    def validation_logits(self, key: str) -> torch.Tensor:
        """The final logits of a validation case: those kept by the validation pass, or a new prediction."""
        if key not in self._logit_files:
            return self.predict_logits(self.load_case(key))
        return torch.from_numpy(np.load(self._logit_files[key]))

    def close(self) -> None:
        """Remove the kept logits."""
        if self._logits is not None:
            self._logits.cleanup()
            self._logits, self._logit_files = None, {}
