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
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from torch import nn
from tqdm import tqdm

from nnunet_ood.aggregation import PatchMapAccumulator, importance_weights
from nnunet_ood.methods.sd import SDTrainingConfig
from nnunet_ood.methods.sd.autoencoder import BottleneckAutoencoder
from nnunet_ood.methods.sd.insertion import AutoencoderInsertion, DistortionPass
from nnunet_ood.segmentation import dice
from nnunet_ood.sliding_window import autocast, pad_and_layout, window_batches

if TYPE_CHECKING:
    from nnunet_ood.fitting.passes import FitContext

__all__ = ["autoencoder_agreement", "distortion_loss", "patch_batches", "segmentation_agreement", "train_autoencoder",
           "train_fold_autoencoder"]


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
    return dice(a, b, a.ndim - 2).mean(1)


def _evaluate(network: nn.Module, insertion: AutoencoderInsertion, batches: list[torch.Tensor],
              device: torch.device, region_based: bool) -> tuple[float, float]:
    losses, dice = [], []
    with torch.no_grad(), autocast(device):
        for x in batches:
            insertion.arm()
            network(x.to(device, non_blocking=True))
            result = insertion.take()
            losses.append(float(distortion_loss(result)))
            dice.append(segmentation_agreement(result.logits.float(), result.logits_ae.float(), region_based))
    return float(np.mean(losses)), float(torch.cat(dice).mean())


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
                    with autocast(device):
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


def train_fold_autoencoder(context: FitContext) -> tuple[BottleneckAutoencoder, dict]:
    """Build the SD autoencoder for this network's bottleneck and train it through the frozen U-Net.

    Patches come from nnU-Net's sampler on the fold's training cases (random mirroring along the
    model's mirror axes); the fixed validation batches from its validation cases.
    """
    predictor, config, seed = context.predictor, context.options.config(SDTrainingConfig), context.seed
    channels, *spatial = predictor.bottleneck_shape()
    torch.manual_seed(seed)
    autoencoder = BottleneckAutoencoder(channels, spatial, config.latent_dim, config.hidden_channels)
    generator = torch.Generator().manual_seed(seed)
    np.random.seed(seed)  # nnU-Net's sampler draws from numpy's global generator
    patch_size = predictor.configuration_manager.patch_size
    batch_size = config.batch_size or predictor.configuration_manager.batch_size
    mirror_axes = predictor.allowed_mirroring_axes or ()

    def batches(keys: Sequence[str], axes: Sequence[int]) -> Iterator[torch.Tensor]:
        return patch_batches(context.dataset_class(context.data_folder, list(keys)), predictor.label_manager,
                             patch_size, batch_size, axes, config.foreground_oversampling, generator)

    train = batches(context.train_keys, mirror_axes)
    val_source = batches(context.val_keys, ())
    val = [next(val_source) for _ in range(config.val_batches)]  # fixed: comparable from epoch to epoch
    started = time.time()
    history = train_autoencoder(predictor.network, autoencoder, train, val, config, context.device,
                                predictor.label_manager.has_regions, context.progress,
                                f"fold {context.fold}: training SD autoencoder")
    history["seconds"] = round(time.time() - started, 2)
    best = history["best_epoch"]
    context.log(f"sd: autoencoder trained for {history['epochs_run']} epochs ({history['seconds']:.0f} s), best "
                f"validation loss {history['best_val_loss']:.4g} at epoch {best}; Dice between validation patches "
                f"segmented with and without it: {history['val_dice_with_without_ae'][best]:.3f}")
    return autoencoder, history


@torch.inference_mode()
def autoencoder_agreement(predictor, data: torch.Tensor, autoencoder: BottleneckAutoencoder,
                          batch_size: int = 4) -> float:
    """Dice between the segmentations of a preprocessed case with and without the AE (the fit's report).

    Same sliding window and Gaussian weighting as at inference (no mirroring); the segmentations are
    the argmax (or region thresholds) of the Gaussian-averaged logits. The SD scores themselves come
    from the inference path.
    """
    device = predictor.device
    network = predictor.network.to(device)
    network.eval()
    padded, layout = pad_and_layout(predictor, data)
    weights = importance_weights(layout.patch_size, predictor.use_gaussian, device)
    heads = predictor.label_manager.num_segmentation_heads
    logits = PatchMapAccumulator(2 * heads, layout.padded_shape, weights)
    insertion = AutoencoderInsertion(network, autoencoder.to(device).eval(), batched=True)
    try:
        with autocast(device):
            for _, slicers, batch in window_batches(padded, layout, batch_size, device):
                insertion.arm()
                network(batch)
                result = insertion.take()
                both = torch.cat((result.logits, result.logits_ae), dim=1).float()
                for i, sl in enumerate(slicers):
                    logits.add(both[i], sl)
    finally:
        insertion.remove()
    merged = logits.result(layout.revert_padding)[None]
    return float(segmentation_agreement(merged[:, :heads], merged[:, heads:], predictor.label_manager.has_regions)[0])
