"""Train the Segmentation Distortion autoencoder through a frozen nnU-Net (METHODS.md §2).

The U-Net's parameters never change (their gradients are off and the optimiser only sees the AE);
the AE's reconstruction replaces the bottleneck through hooks and the decoder runs on it. Loss (paper
eq. 1-3, equal weights): sum of squared errors between the logits with and without the AE plus the sum
of squared reconstruction errors, per patch. Adam with the learning rate halved on plateaus; patches
from nnU-Net's own sampler on the fold's training cases (randomly mirrored, or through the model's
trainer's own augmentation); the kept epoch is chosen on fixed patches of the fold's validation cases
by the validation loss among epochs whose segmentations with and without the AE agree (Dice >= 0.99).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from torch import nn
from tqdm import tqdm

from nnunet_ood.methods.sd import SDTrainingConfig
from nnunet_ood.methods.sd.autoencoder import BottleneckAutoencoder
from nnunet_ood.methods.sd.insertion import AutoencoderInsertion, DistortionPass, segmentation_agreement
from nnunet_ood.sliding_window import autocast

if TYPE_CHECKING:
    from nnunet_ood.methods.context import FitContext

__all__ = ["agreement_warning", "distortion_loss", "patch_batches", "train_autoencoder", "train_fold_autoencoder",
           "trainer_augmented_batches", "trainer_training_transforms"]


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


def distortion_loss(result: DistortionPass, reduction: str = "sum") -> torch.Tensor:
    """The paper's loss: squared error of the logits (with vs without the AE) plus that of the reconstruction.

    ``sum`` (the paper): sums of squared errors over each patch's elements, equal weights, averaged over the
    batch. ``mean``: each term averaged over its elements, so the reconstruction term weighs
    (logit elements / bottleneck elements) times more than in the paper (about 24x for a 512 x 512 2D patch).
    """
    logits = (result.logits_ae.float() - result.logits.detach().float()).square().flatten(1)
    reconstruction = (result.reconstruction.float() - result.bottleneck.detach().float()).square().flatten(1)
    if reduction == "mean":
        return logits.mean() + reconstruction.mean()
    return logits.sum(1).mean() + reconstruction.sum(1).mean()


def _evaluate(network: nn.Module, insertion: AutoencoderInsertion, batches: list[torch.Tensor],
              device: torch.device, region_based: bool, reduction: str) -> tuple[float, float]:
    losses, dice = [], []
    with torch.no_grad(), autocast(device):
        for x in batches:
            insertion.arm()
            network(x.to(device, non_blocking=True))
            result = insertion.take()
            losses.append(float(distortion_loss(result, reduction)))
            dice.append(segmentation_agreement(result.logits.float(), result.logits_ae.float(), region_based))
    return float(np.mean(losses)), float(torch.cat(dice).mean())


class _BestEpoch:
    """The stopping rule: among the epochs whose validation Dice with and without the AE reaches
    ``min_agreement``, the lowest validation loss; while none does, the highest Dice."""

    def __init__(self, min_agreement: float) -> None:
        self.min_agreement = min_agreement
        self.epoch, self.loss, self.dice, self.weights = -1, math.inf, -math.inf, None

    def better(self, loss: float, dice: float) -> bool:
        if dice >= self.min_agreement:
            return self.dice < self.min_agreement or loss < self.loss
        return self.dice < self.min_agreement and (dice > self.dice or (dice == self.dice and loss < self.loss))

    def update(self, epoch: int, loss: float, dice: float, weights: dict) -> bool:
        if not self.better(loss, dice):
            return False
        self.epoch, self.loss, self.dice, self.weights = epoch, loss, dice, copy.deepcopy(weights)
        return True


@contextlib.contextmanager
def _frozen(network: nn.Module) -> Iterator[None]:
    """``network`` in eval mode with its parameters' gradients off; both restored afterwards."""
    requires_grad = [p.requires_grad for p in network.parameters()]
    for p in network.parameters():
        p.requires_grad_(False)
    was_training = network.training
    network.eval()  # nnU-Net predicts in eval mode; the AE must learn those activations
    try:
        yield
    finally:
        for p, flag in zip(network.parameters(), requires_grad):
            p.requires_grad_(flag)
        network.train(was_training)


class _Optimiser:
    """Adam on the AE's parameters, the learning rate halved on plateaus of the validation loss, gradients scaled
    on CUDA (mixed precision)."""

    def __init__(self, autoencoder: BottleneckAutoencoder, config: SDTrainingConfig, device: torch.device) -> None:
        self.adam = torch.optim.Adam(autoencoder.parameters(), lr=config.learning_rate)
        self.schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(self.adam, "min", factor=0.5,
                                                                   patience=config.lr_patience)
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

    @property
    def learning_rate(self) -> float:
        return self.adam.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.adam)
            self.scaler.update()
        else:
            loss.backward()
            self.adam.step()


def _train_epoch(network: nn.Module, insertion: AutoencoderInsertion, train_batches: Iterator[torch.Tensor],
                 optimiser: _Optimiser, config: SDTrainingConfig, device: torch.device) -> float:
    """``config.iterations_per_epoch`` steps on batches of ``train_batches``; the mean training loss."""
    losses = []
    for _ in range(config.iterations_per_epoch):
        x = next(train_batches).to(device, non_blocking=True)
        optimiser.adam.zero_grad(set_to_none=True)
        with autocast(device):
            insertion.arm()
            network(x)
            loss = distortion_loss(insertion.take(), config.loss)
        optimiser.step(loss)
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def train_autoencoder(network: nn.Module, autoencoder: BottleneckAutoencoder, train_batches: Iterator[torch.Tensor],
                      val_batches: list[torch.Tensor], config: SDTrainingConfig, device: torch.device,
                      region_based: bool, progress: bool = True, description: str = "SD autoencoder") -> dict:
    """Train ``autoencoder`` in place through the frozen ``network``; returns the training history.

    Adam with the learning rate halved after ``lr_patience`` epochs without a lower validation loss;
    the weights of the best epoch (:class:`_BestEpoch`) are kept, and training stops after ``patience``
    epochs without a new best. ``network`` is left exactly as it was (parameters untouched; their
    ``requires_grad`` flags restored).
    """
    history: dict = {"config": asdict(config), "train_loss": [], "val_loss": [], "val_dice_with_without_ae": [],
                     "learning_rate": []}
    best = _BestEpoch(config.min_agreement)
    with _frozen(network):
        autoencoder.to(device)
        insertion = AutoencoderInsertion(network, autoencoder, batched=True)  # the segmentation is not used here
        optimiser = _Optimiser(autoencoder, config, device)
        try:
            with tqdm(range(config.max_epochs), desc=description, disable=not progress) as bar:
                for epoch in bar:
                    autoencoder.train()
                    train_loss = _train_epoch(network, insertion, train_batches, optimiser, config, device)
                    autoencoder.eval()
                    val_loss, val_dice = _evaluate(network, insertion, val_batches, device, region_based, config.loss)
                    history["train_loss"].append(train_loss)
                    history["val_loss"].append(val_loss)
                    history["val_dice_with_without_ae"].append(val_dice)
                    history["learning_rate"].append(optimiser.learning_rate)
                    optimiser.schedule.step(val_loss)
                    bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", dice_ae=f"{val_dice:.3f}")
                    if not best.update(epoch, val_loss, val_dice, autoencoder.state_dict()) and \
                            epoch - best.epoch >= config.patience:
                        break
        finally:
            insertion.remove()
    autoencoder.load_state_dict(best.weights)
    autoencoder.eval()
    history.update(best_epoch=best.epoch, best_val_loss=best.loss, best_val_dice=best.dice,
                   epochs_run=len(history["val_loss"]))
    return history


@contextlib.contextmanager
def _scratch_nnunet_folders() -> Iterator[None]:
    """nnU-Net's folders (read from the environment when used) pointed at a scratch directory, loggers off.

    Building a trainer creates its output folder and log files under ``nnUNet_results``; for borrowing
    its augmentation nothing of that may land in the user's model folders.
    """
    names = ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_wandb_enabled")
    saved = {n: os.environ.get(n) for n in names}
    with tempfile.TemporaryDirectory(prefix="nnunet_ood_trainer_") as scratch:
        os.environ.update(nnUNet_results=scratch, nnUNet_preprocessed=scratch, nnUNet_wandb_enabled="0")
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def trainer_training_transforms(predictor, fold) -> tuple[Any, list[int]]:
    """The model's trainer's own training augmentation (its ``get_training_transforms``, not a copy), without
    deep supervision, and the larger patch size it crops from before rotating and scaling."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer_class = recursive_find_trainer_class_by_name(predictor.trainer_name)
    plans = {**copy.deepcopy(predictor.plans_manager.plans), "continue_training": True}
    with _scratch_nnunet_folders(), contextlib.redirect_stdout(io.StringIO()):  # it prints its device
        trainer = trainer_class(plans=plans, configuration=predictor.configuration_name, fold=fold,
                                dataset_json=predictor.dataset_json, device=torch.device("cpu"))
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    labels, configuration = predictor.label_manager, predictor.configuration_manager
    transforms = trainer.get_training_transforms(
        configuration.patch_size, rotation, None, mirror_axes, dummy_2d,
        use_mask_for_norm=configuration.use_mask_for_norm, is_cascaded=False,
        foreground_labels=labels.foreground_labels,
        regions=labels.foreground_regions if labels.has_regions else None, ignore_label=labels.ignore_label)
    return transforms, list(initial_patch_size)


def trainer_augmented_batches(context: FitContext, keys: Sequence[str], batch_size: int,
                              foreground_oversampling: float) -> Iterator[torch.Tensor]:
    """Endless batches of training patches through the model's trainer's own training augmentation."""
    predictor = context.predictor
    transforms, initial_patch_size = trainer_training_transforms(predictor, context.fold)
    loader = nnUNetDataLoader(context.dataset_class(context.data_folder, list(keys)), batch_size, initial_patch_size,
                              predictor.configuration_manager.patch_size, predictor.label_manager,
                              oversample_foreground_percent=foreground_oversampling, transforms=transforms)
    while True:
        yield torch.as_tensor(loader.generate_train_batch()["data"]).float()


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

    if config.augmentation == "nnunet":
        random.seed(seed)  # the trainer's transforms draw from Python's, numpy's and torch's generators
        train = trainer_augmented_batches(context, context.train_keys, batch_size, config.foreground_oversampling)
    else:
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
    warning = agreement_warning(context.fold, history, config)
    if warning:
        print(warning)
    return autoencoder, history


def agreement_warning(fold, history: dict, config: SDTrainingConfig) -> str | None:
    """One line when the kept AE changes the validation segmentations more than ``min_agreement`` allows."""
    if history["best_val_dice"] >= config.min_agreement:
        return None
    return (f"warning: fold {fold} sd: the autoencoder changes the validation segmentations (Dice with and without "
            f"it {history['best_val_dice']:.3f} < {config.min_agreement:g}); train it longer (--sd_max_epochs, "
            "--sd_iterations) or with a larger latent (--sd_latent)")
