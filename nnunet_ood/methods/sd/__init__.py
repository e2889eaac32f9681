"""Segmentation Distortion (Lennartz & Schultz 2023, METHODS.md §2): an autoencoder on the bottleneck.

The family: the autoencoder built from the bottleneck's shape (:mod:`.autoencoder`), the hooks that put
its reconstruction into the U-Net's forward pass (:mod:`.insertion`) and its training through the
frozen network (:mod:`.training`). ``sd`` is the distortion the reconstruction causes in the softmax
output; ``latent_mahalanobis`` (:mod:`nnunet_ood.methods.features`) scores the AE's latent vectors.
Both share one autoencoder per fold, trained once with :class:`SDTrainingConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from nnunet_ood.errors import OODInputError
from nnunet_ood.methods.base import FoldModels, PatchMapMethod, Requirements
from nnunet_ood.methods.options import option

if TYPE_CHECKING:
    from torch import Tensor

    from nnunet_ood.methods.context import FitContext

#: dense bottleneck size: the paper uses 64 (brain, CC-359) and 128 (heart, M&Ms)
DEFAULT_LATENT_DIM = 128


@dataclass
class SDTrainingConfig:
    """How the SD autoencoder is trained (``nnUNetv2_fit_ood --sd_*``; trainers set it in their FitOptions)."""

    key: ClassVar[str] = "sd"
    title: ClassVar[str] = "Segmentation Distortion autoencoder"

    latent_dim: int = option(DEFAULT_LATENT_DIM, "--sd_latent", "size of the dense latent", type=int,
                             default_text="128, the paper's value for the heart task; 64 for brain")
    hidden_channels: int | None = option(None, "--sd_channels", "channels of the AE's convolutions", type=int,
                                         default_text="min(bottleneck channels, 128)")
    learning_rate: float = option(1e-3, "--sd_lr", "Adam learning rate", type=float)
    batch_size: int | None = option(None, "--sd_batch_size", "patches per step", type=int,
                                    default_text="the configuration's batch size")
    iterations_per_epoch: int = option(250, "--sd_iterations", "training steps per epoch", type=int)
    max_epochs: int = option(100, "--sd_max_epochs", "at most this many epochs", type=int)
    patience: int = option(10, "--sd_patience", "stop after this many epochs without a lower validation loss",
                           type=int)
    val_batches: int = option(10, "--sd_val_batches", "fixed validation batches evaluated after each epoch",
                              type=int)
    loss: str = option("sum", "--sd_loss", "sum: the paper's loss, the sums of squared errors of the logits and of "
                       "the bottleneck with equal weights (per patch); mean: each term averaged over its elements, "
                       "which weights the reconstruction by (logit elements / bottleneck elements)", type=str,
                       choices=("sum", "mean"))
    augmentation: str = option("mirror", "--sd_augmentation", "patches the AE is trained on: mirror (nnU-Net's "
                               "sampler, random mirroring) or nnunet (the model's trainer's own training augmentation)",
                               type=str, choices=("mirror", "nnunet"))
    min_agreement: float = option(0.99, "--sd_min_agreement", "the AE must keep the validation segmentations: epochs "
                                  "whose Dice with and without it is lower are not kept (unless none reaches it)",
                                  type=float)
    lr_patience: int = option(5, "--sd_lr_patience", "halve the learning rate after this many epochs without a lower "
                              "validation loss", type=int)
    foreground_oversampling: float = option(0.33, None, "nnU-Net's default share of foreground-centred patches")

    def __post_init__(self) -> None:
        for name in ("latent_dim", "iterations_per_epoch", "max_epochs", "val_batches"):
            if int(getattr(self, name)) < 1:
                raise OODInputError(f"SD training: {name} must be at least 1, got {getattr(self, name)}")
        if self.patience < 1 or self.lr_patience < 1 or not 0 < self.learning_rate < math.inf:
            raise OODInputError("SD training: --sd_patience and --sd_lr_patience must be at least 1 and the learning "
                                f"rate (--sd_lr) positive and finite, got {self.patience}, {self.lr_patience} and "
                                f"{self.learning_rate}")
        if not 0 <= self.min_agreement <= 1:
            raise OODInputError(f"--sd_min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.loss not in ("sum", "mean") or self.augmentation not in ("mirror", "nnunet"):
            raise OODInputError(f"--sd_loss must be sum or mean and --sd_augmentation mirror or nnunet, got "
                                f"{self.loss!r} and {self.augmentation!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise OODInputError(f"--sd_batch_size must be at least 1, got {self.batch_size}")
        if self.hidden_channels is not None and self.hidden_channels < 1:
            raise OODInputError(f"--sd_channels must be at least 1, got {self.hidden_channels}")


@dataclass
class SDPredictConfig:
    """How ``sd`` runs at inference (``nnUNetv2_predict_ood --sd_batched_decoder``)."""

    key: ClassVar[str] = "sd_predict"
    title: ClassVar[str] = "Segmentation Distortion at inference"

    batched_decoder: bool = option(False, "--sd_batched_decoder", "sd: run the decoder once on [x; r(x)] instead "
                                   "of twice (faster on a GPU; the logits then equal stock nnU-Net's only up to "
                                   "float rounding, so a voxel at an exact tie may differ)", type=bool)


class SegmentationDistortion(PatchMapMethod):
    name = "sd"
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
