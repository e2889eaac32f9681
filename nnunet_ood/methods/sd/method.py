"""``sd``: the distortion the SD autoencoder's reconstruction of the bottleneck causes in the softmax output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nnunet_ood.methods.base import NON_NEGATIVE, FoldModels, PatchMapMethod, Requirements
from nnunet_ood.methods.sd import SDPredictConfig, SDTrainingConfig

if TYPE_CHECKING:
    from torch import Tensor

    from nnunet_ood.methods.context import FitContext


class SegmentationDistortion(PatchMapMethod):
    name = "sd"
    score_range = NON_NEGATIVE  # a squared difference of probabilities
    summary = ("how much the autoencoder's reconstruction of the bottleneck changes the softmax output, per voxel "
               "(Segmentation Distortion, Lennartz & Schultz)")
    requires = Requirements(autoencoder=True)
    config = SDTrainingConfig
    predict_config = SDPredictConfig
    tap = "nnunet_ood.methods.sd.insertion:AutoencoderTap"

    def patch_map(self, tap: Any) -> Tensor:
        return tap.distortion

    def state_entry(self, models: FoldModels, folder: str) -> dict[str, Any]:
        from nnunet_ood.methods.sd.autoencoder import AE_STATE_NAME

        return {"file": f"{AE_STATE_NAME}.safetensors", "class": type(models.autoencoder).__name__,
                "config": models.autoencoder.config}

    def load_state(self, entry: Any, folder: str, models: FoldModels, device: Any) -> None:
        """Nothing of its own: the autoencoder is loaded once for every method that requires it."""

    def fit_report(self, context: FitContext, models: FoldModels) -> dict[str, Any]:
        """Dice between the validation cases' segmentations with and without the AE (should be close to 1)."""
        from nnunet_ood.methods.sd.training import autoencoder_agreement

        agreement = {key: autoencoder_agreement(context.predictor, context.load_case(key), models.autoencoder,
                                                context.options.batch_size) for key in context.val_keys}
        values = list(agreement.values())
        context.log(f"sd: Dice between the segmentations of the {len(values)} validation cases with and without the "
                    f"autoencoder: mean {sum(values) / len(values):.4f}, min {min(values):.4f} (the method assumes "
                    "this is close to 1)")
        return {"sd_val_dice_with_without_ae": agreement}
