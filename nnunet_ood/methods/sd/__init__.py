"""Segmentation Distortion (Lennartz & Schultz 2023, METHODS.md §2): an autoencoder on the bottleneck.

The family: the options of its training and inference (here), the method (:mod:`.method`), the autoencoder
built from the bottleneck's shape (:mod:`.autoencoder`), the hooks that put its reconstruction into the U-Net's
forward pass (:mod:`.insertion`) and its training through the frozen network (:mod:`.training`); the modules
import the options from here, this package imports none of them. ``sd`` is the distortion the reconstruction
causes in the softmax output; ``latent_mahalanobis`` scores the AE's latent vectors (both in :mod:`.method`). Both
share one autoencoder per fold (``SD_AUTOENCODER``, a shared model: ``FoldModels.shared[AE_STATE_NAME]``), trained
once with :class:`SDTrainingConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from nnunet_ood.errors import OODInputError
from nnunet_ood.methods.options import Range, option

#: dense bottleneck size: the paper uses 64 (brain, CC-359) and 128 (heart, M&Ms)
DEFAULT_LATENT_DIM = 128
#: the autoencoder's name: its key in ``FoldModels.shared``, its file ``sd_autoencoder.safetensors`` in a fold's state
AE_STATE_NAME = "sd_autoencoder"


@dataclass
class SDTrainingConfig:
    """How the SD autoencoder is trained (``nnUNetv2_fit_ood --sd_*``; trainers set it in their FitOptions)."""

    key: ClassVar[str] = "sd"
    title: ClassVar[str] = "Segmentation Distortion autoencoder"

    # ranges: what a fit may ask for (nnUNetv2_fit_ood checks them when parsing, FitOptions for trainers); the
    # upper ends are far above the paper's values and nnU-Net's (bottlenecks of at most 320-512 channels, batch
    # sizes of 2-50), below what would run for days or exhaust any GPU's memory
    latent_dim: int = option(DEFAULT_LATENT_DIM, "--sd_latent", "size of the dense latent", type=int,
                             default_text="128, the paper's value for the heart task; 64 for brain",
                             range=Range(1, 4096, integer=True))
    hidden_channels: int | None = option(None, "--sd_channels", "channels of the AE's convolutions", type=int,
                                         default_text="min(bottleneck channels, 128)",
                                         range=Range(1, 1024, integer=True))
    learning_rate: float = option(1e-3, "--sd_lr", "Adam learning rate", type=float,
                                  range=Range(0, 1, open_low=True))
    batch_size: int | None = option(None, "--sd_batch_size", "patches per step", type=int,
                                    default_text="the configuration's batch size", range=Range(1, 1024, integer=True))
    iterations_per_epoch: int = option(250, "--sd_iterations", "training steps per epoch", type=int,
                                       range=Range(1, 100_000, integer=True))
    max_epochs: int = option(100, "--sd_max_epochs", "at most this many epochs", type=int,
                             range=Range(1, 10_000, integer=True))
    patience: int = option(10, "--sd_patience", "stop after this many epochs without a lower validation loss",
                           type=int, range=Range(1, 10_000, integer=True))
    val_batches: int = option(10, "--sd_val_batches", "fixed validation batches evaluated after each epoch",
                              type=int, range=Range(1, 1000, integer=True))
    loss: str = option("sum", "--sd_loss", "sum: the paper's loss, the sums of squared errors of the logits and of "
                       "the bottleneck with equal weights (per patch); mean: each term averaged over its elements, "
                       "which weights the reconstruction by (logit elements / bottleneck elements)", type=str,
                       choices=("sum", "mean"))
    augmentation: str = option("mirror", "--sd_augmentation", "patches the AE is trained on: mirror (nnU-Net's "
                               "sampler, random mirroring) or nnunet (the model's trainer's own training augmentation)",
                               type=str, choices=("mirror", "nnunet"))
    min_agreement: float = option(0.99, "--sd_min_agreement", "the AE must keep the validation segmentations: epochs "
                                  "whose Dice with and without it is lower are not kept (unless none reaches it)",
                                  type=float, range=Range(0, 1))
    lr_patience: int = option(5, "--sd_lr_patience", "halve the learning rate after this many epochs without a lower "
                              "validation loss", type=int, range=Range(1, 10_000, integer=True))
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
