"""The Segmentation Distortion family's methods and the autoencoder they share (Lennartz & Schultz 2023).

* ``sd``: the distortion the SD autoencoder's reconstruction of the bottleneck causes in the softmax output.
* ``latent_mahalanobis``: the Gaussian on the SD autoencoder's latent vectors.

Both require :data:`SD_AUTOENCODER`, one autoencoder per fold trained once for both (``FoldModels.shared``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nnunet_ood.methods.base import (
    NON_NEGATIVE,
    FoldModels,
    PatchFeatureMethod,
    PatchMapMethod,
    Requirements,
    SharedModel,
)
from nnunet_ood.methods.sd import AE_STATE_NAME, SDPredictConfig, SDTrainingConfig

if TYPE_CHECKING:
    from torch import Tensor

    from nnunet_ood.methods.context import FitContext


class SDAutoencoder(SharedModel):
    """The SD autoencoder as a shared model: trained through the frozen U-Net, ``sd_autoencoder.safetensors``."""

    name = AE_STATE_NAME
    provenance_key = "sd_training"
    description = "autoencoder"

    def train(self, context: FitContext) -> tuple[Any, dict[str, Any]]:
        from nnunet_ood.methods.sd.training import train_fold_autoencoder

        return train_fold_autoencoder(context)

    def save(self, model: Any, folder: str, history: Mapping[str, Any] | None) -> None:
        model.save(folder, history)

    def load(self, folder: str, device: Any) -> Any:
        from nnunet_ood.methods.sd.autoencoder import BottleneckAutoencoder

        return BottleneckAutoencoder.load(folder, device)


#: the autoencoder ``sd`` and ``latent_mahalanobis`` share
SD_AUTOENCODER = SDAutoencoder()


class SegmentationDistortion(PatchMapMethod):
    name = "sd"
    score_range = NON_NEGATIVE  # a squared difference of probabilities
    summary = ("how much the autoencoder's reconstruction of the bottleneck changes the softmax output, per voxel "
               "(Segmentation Distortion, Lennartz & Schultz)")
    requires = Requirements(shared=(SD_AUTOENCODER,))
    config = SDTrainingConfig
    predict_config = SDPredictConfig
    tap = "nnunet_ood.methods.sd.insertion:AutoencoderTap"

    def patch_map(self, tap: Any) -> Tensor:
        return tap.distortion

    def state_entry(self, models: FoldModels, folder: str) -> dict[str, Any]:
        autoencoder = models.shared[AE_STATE_NAME]
        return {"file": f"{AE_STATE_NAME}.safetensors", "class": type(autoencoder).__name__,
                "config": autoencoder.config}

    def load_state(self, entry: Any, folder: str, models: FoldModels, device: Any) -> None:
        """Nothing of its own: the autoencoder is loaded once for every method that requires it."""

    def case_record(self, case: Any) -> Mapping[str, Any] | None:
        """In the fit's validation pass: the Dice between the case's segmentations with and without the AE."""
        tap = case.taps.get(self.tap)
        agreement = tap.take_agreement() if tap is not None else None
        return None if agreement is None else {"agreement": agreement}

    def fit_report(self, context: FitContext, models: FoldModels) -> dict[str, Any]:
        """Dice between the validation cases' segmentations with and without the AE (should be close to 1), from the
        validation pass (:meth:`case_record`): sliding window and Gaussian weighting as at inference, un-mirrored."""
        agreement = {key: context.case_records[key][self.name]["agreement"] for key in context.val_keys}
        values = list(agreement.values())
        context.log(f"sd: Dice between the segmentations of the {len(values)} validation cases with and without the "
                    f"autoencoder: mean {sum(values) / len(values):.4f}, min {min(values):.4f} (the method assumes "
                    "this is close to 1)")
        return {"sd_val_dice_with_without_ae": agreement}


class LatentMahalanobis(PatchFeatureMethod):
    name = "latent_mahalanobis"
    score_range = NON_NEGATIVE
    summary = "Mahalanobis distance of the SD autoencoder's latent vectors (Lennartz & Schultz)"
    requires = Requirements(shared=(SD_AUTOENCODER,))
    config = SDTrainingConfig
    feature_source = "autoencoder latent"
    detector = "nnunet_ood.detectors.mahalanobis:LatentMahalanobisDetector"

    def features(self, bottleneck: Tensor, models: FoldModels) -> Tensor:
        return models.shared[AE_STATE_NAME].encode(bottleneck.float()).float()
