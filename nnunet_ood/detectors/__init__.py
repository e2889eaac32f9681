"""Detectors that score per-patch feature vectors (scikit-learn style: ``fit``/``partial_fit``, then ``score``).

Each stores its fitted state as one safetensors file (tensors plus JSON metadata; never a pickle) and
streams its statistics, so detectors fitted on separate parts merge exactly
(:mod:`nnunet_ood.detectors.cross_fitting`).
"""

from nnunet_ood.detectors.base import FeatureDetector
from nnunet_ood.detectors.knn import KNNDetector
from nnunet_ood.detectors.mahalanobis import LatentMahalanobisDetector, MahalanobisDetector
from nnunet_ood.detectors.statistics import GaussianStatistics

__all__ = ["FeatureDetector", "GaussianStatistics", "KNNDetector", "LatentMahalanobisDetector", "MahalanobisDetector"]
