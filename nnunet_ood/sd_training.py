"""Train the Segmentation Distortion autoencoder through a frozen nnU-Net (METHODS.md §2).

The U-Net's parameters never change (their gradients are off and the optimiser only sees the AE);
the AE's reconstruction replaces the bottleneck through hooks and the decoder runs on it. Loss (paper
eq. 1-3, equal weights): mean squared error between the logits with and without the AE plus the mean
squared reconstruction error. Adam; patches from nnU-Net's own sampler on the fold's training cases;
early stopping on the same loss over fixed patches of the fold's validation cases, with the Dice
between the segmentations with and without the AE reported along the way.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from torch import nn
from tqdm import tqdm

from nnunet_ood.autoencoder import DEFAULT_LATENT_DIM, BottleneckAutoencoder
from nnunet_ood.distortion import AutoencoderInsertion, DistortionPass
from nnunet_ood.errors import OODInputError

__all__ = ["SDTrainingConfig", "distortion_loss", "patch_batches", "segmentation_agreement", "train_autoencoder"]


@dataclass
class SDTrainingConfig:
    """How the SD autoencoder is trained (``nnUNetv2_fit_ood --sd_*`` flags; trainers override it)."""

    latent_dim: int = DEFAULT_LATENT_DIM
    hidden_channels: int | None = None  # None: min(bottleneck channels, 128)
    learning_rate: float = 1e-3  # Adam with default betas, as in the paper
    batch_size: int | None = None  # None: the configuration's batch size
    iterations_per_epoch: int = 250
    max_epochs: int = 100
    patience: int = 10  # epochs without a lower validation loss before stopping
    val_batches: int = 10  # fixed validation batches evaluated after every epoch
    foreground_oversampling: float = 0.33  # nnU-Net's default share of foreground-centred patches

    def __post_init__(self) -> None:
        for name in ("latent_dim", "iterations_per_epoch", "max_epochs", "val_batches"):
            if int(getattr(self, name)) < 1:
                raise OODInputError(f"SD training: {name} must be at least 1, got {getattr(self, name)}")
        if self.patience < 1 or not self.learning_rate > 0:
            raise OODInputError("SD training: patience must be at least 1 and the learning rate positive")


def patch_batches(dataset, label_manager, patch_size: Sequence[int], batch_size: int, mirror_axes: Sequence[int],
                  foreground_oversampling: float, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches ``(B, C, *patch)`` from nnU-Net's own sampler (random crops, some foreground-centred),
    each patch mirrored at random along nnU-Net's mirror axes (spatial axis indices)."""
    loader = nnUNetDataLoader(dataset, batch_size, list(patch_size), list(patch_size), label_manager,
                              oversample_foreground_percent=foreground_oversampling)
    while True:
        x = loader.generate_train_batch()["data"]
        for axis in mirror_axes:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            if bool(flip.any()):
                x[flip] = torch.flip(x[flip], dims=(axis + 2,))  # +2: batch and channel axes come first
        yield x


def distortion_loss(result: DistortionPass) -> torch.Tensor:
    """The paper's loss: squared logit error (with vs without the AE) plus squared reconstruction error."""
    logits_term = F.mse_loss(result.logits_ae.float(), result.logits.detach().float())
    reconstruction_term = F.mse_loss(result.reconstruction.float(), result.bottleneck.detach().float())
    return logits_term + reconstruction_term


def segmentation_agreement(logits: torch.Tensor, logits_ae: torch.Tensor, region_based: bool) -> torch.Tensor:
    """Mean foreground Dice ``(B,)`` between the segmentations with and without the AE (both empty = 1)."""
    if region_based:
        a, b = logits > 0, logits_ae > 0  # per-region masks, channel = region
    else:
        n = logits.shape[1]
        a = F.one_hot(logits.argmax(1), n).movedim(-1, 1)[:, 1:].bool()
        b = F.one_hot(logits_ae.argmax(1), n).movedim(-1, 1)[:, 1:].bool()
    dims = tuple(range(2, a.ndim))
    intersection = (a & b).sum(dims).double()
    total = a.sum(dims).double() + b.sum(dims).double()
    dice = torch.where(total > 0, 2 * intersection / total.clamp_min(1), torch.ones_like(total))
    return dice.mean(1)


def _evaluate(network: nn.Module, insertion: AutoencoderInsertion, batches: list[torch.Tensor],
              device: torch.device, region_based: bool) -> tuple[float, float]:
    losses, dice = [], []
    with torch.no_grad(), _autocast(device):
        for x in batches:
            insertion.arm()
            network(x.to(device, non_blocking=True))
            result = insertion.take()
            losses.append(float(distortion_loss(result)))
            dice.append(segmentation_agreement(result.logits.float(), result.logits_ae.float(), region_based))
    return float(np.mean(losses)), float(torch.cat(dice).mean())


def _autocast(device: torch.device):
    # the same mixed precision nnU-Net uses for its forward passes on the GPU
    return torch.autocast(device.type, enabled=True) if device.type == "cuda" else nullcontext()


def train_autoencoder(network: nn.Module, autoencoder: BottleneckAutoencoder, train_batches: Iterator[torch.Tensor],
                      val_batches: list[torch.Tensor], config: SDTrainingConfig, device: torch.device,
                      region_based: bool, progress: bool = True, description: str = "SD autoencoder") -> dict:
    """Train ``autoencoder`` in place through the frozen ``network``; returns the training history.

    The weights of the epoch with the lowest validation loss are kept. ``network`` is left exactly as
    it was (parameters untouched; their ``requires_grad`` flags restored).
    """
    requires_grad = [p.requires_grad for p in network.parameters()]
    for p in network.parameters():
        p.requires_grad_(False)
    was_training = network.training
    network.eval()  # nnU-Net predicts in eval mode; the AE must learn those activations
    autoencoder.to(device)
    insertion = AutoencoderInsertion(network, autoencoder, batched=True)  # the segmentation is not used here
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=config.learning_rate)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    history: dict = {"config": asdict(config), "train_loss": [], "val_loss": [], "val_dice_with_without_ae": []}
    best = (math.inf, -1, copy.deepcopy(autoencoder.state_dict()))
    try:
        with tqdm(range(config.max_epochs), desc=description, disable=not progress) as bar:
            for epoch in bar:
                autoencoder.train()
                epoch_losses = []
                for _ in range(config.iterations_per_epoch):
                    x = next(train_batches).to(device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    with _autocast(device):
                        insertion.arm()
                        network(x)
                        loss = distortion_loss(insertion.take())
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    epoch_losses.append(float(loss.detach()))
                autoencoder.eval()
                val_loss, val_dice = _evaluate(network, insertion, val_batches, device, region_based)
                history["train_loss"].append(float(np.mean(epoch_losses)))
                history["val_loss"].append(val_loss)
                history["val_dice_with_without_ae"].append(val_dice)
                bar.set_postfix(train=f"{history['train_loss'][-1]:.4g}", val=f"{val_loss:.4g}",
                                dice_ae=f"{val_dice:.3f}")
                if val_loss < best[0]:
                    best = (val_loss, epoch, copy.deepcopy(autoencoder.state_dict()))
                elif epoch - best[1] >= config.patience:
                    break
    finally:
        insertion.remove()
        for p, flag in zip(network.parameters(), requires_grad):
            p.requires_grad_(flag)
        network.train(was_training)
    autoencoder.load_state_dict(best[2])
    autoencoder.eval()
    history.update(best_epoch=best[1], best_val_loss=best[0], epochs_run=len(history["val_loss"]))
    return history
