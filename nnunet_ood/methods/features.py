"""Feature-detector methods: a detector fitted per fold scores one feature vector per patch.

* ``mahalanobis``: Pooled Mahalanobis (González et al. 2022, METHODS.md §1): pooled bottleneck
  features, squared Mahalanobis distance to a Gaussian of the training patches.
* ``knn``: Euclidean distance of the same pooled features to the k-th nearest training patch
  (Woodland et al. 2024).

``latent_mahalanobis``, a Gaussian on features of the Segmentation Distortion family's shared model, lives with its
family (:mod:`nnunet_ood.methods.sd.method`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from nnunet_ood.errors import OODInputError, OODStateError
from nnunet_ood.methods.base import FIT_COMMAND, NON_NEGATIVE, FoldModels, PatchFeatureMethod
from nnunet_ood.methods.options import Range, option

if TYPE_CHECKING:
    from torch import Tensor

    from nnunet_ood.detectors.base import FeatureDetector


class PooledBottleneckMethod(PatchFeatureMethod):
    """Features: the bottleneck average-pooled until it has fewer than 1e4 entries (METHODS.md §1)."""

    feature_source = "pooled bottleneck"

    def features(self, bottleneck: Tensor, models: FoldModels) -> Tensor:
        from nnunet_ood.features import pool_features

        return pool_features(bottleneck)

    def state_entry(self, models: FoldModels, folder: str) -> dict[str, Any]:
        from nnunet_ood.features import FEATURE_FORMAT

        return {**super().state_entry(models, folder), "feature_format": FEATURE_FORMAT}

    def load_state(self, entry: Any, folder: str, models: FoldModels, device: Any) -> None:
        from nnunet_ood.features import FEATURE_FORMAT

        found = entry.get("feature_format", 1)  # states written before the format was recorded pooled in floor mode
        if found != FEATURE_FORMAT:
            raise OODStateError(f"{self.name} was fitted on pooled features of format {found} (floor-mode pooling, "
                                "which left out the last slice of odd bottleneck axes); this version pools every "
                                f"voxel (format {FEATURE_FORMAT}): re-fit it with {FIT_COMMAND} --ood {self.name}")
        super().load_state(entry, folder, models, device)


class Mahalanobis(PooledBottleneckMethod):
    name = "mahalanobis"
    score_range = NON_NEGATIVE  # a squared distance
    summary = ("distance of pooled bottleneck features to the Gaussian of training patches (Pooled Mahalanobis, "
               "González et al.)")
    detector = "nnunet_ood.detectors.mahalanobis:MahalanobisDetector"


@dataclass
class KNNConfig:
    """Options of the k-nearest-neighbour detector (``nnUNetv2_fit_ood --knn_*``)."""

    key: ClassVar[str] = "knn"
    title: ClassVar[str] = "k-nearest neighbours"

    k: int = option(1, "--knn_k", "knn: distance to the k-th nearest training patch feature", type=int,
                    range=Range(1, 1000, integer=True))
    # a cap (the training patches bound it too); 10^6 rows of D = 8192 features are 33 GB already
    bank: int = option(50_000, "--knn_bank", "knn: at most this many training patch features are kept, a uniform "
                       "random sample (memory 4 bytes x D per row)", type=int, range=Range(1, 1_000_000, integer=True))

    def __post_init__(self) -> None:
        if self.k < 1 or self.bank < self.k:
            raise OODInputError(f"--knn_k must be at least 1 and --knn_bank at least --knn_k, got {self.k} and "
                                f"{self.bank}")


class KNN(PooledBottleneckMethod):
    name = "knn"
    score_range = NON_NEGATIVE
    summary = ("Euclidean distance of the pooled bottleneck features to the k-th nearest training patch "
               "(Woodland et al. 2024)")
    config = KNNConfig
    detector = "nnunet_ood.detectors.knn:KNNDetector"

    def new_detector(self, options: Any, device: Any) -> FeatureDetector:
        from nnunet_ood.detectors.knn import KNNDetector

        config = options.config(KNNConfig)
        return KNNDetector(k=config.k, max_bank_size=config.bank, device=device)

    def can_score(self, detector: FeatureDetector) -> bool:
        return detector.is_fitted and detector.bank_size_ >= detector.k

