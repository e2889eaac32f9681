"""Segmentation Distortion pieces against independent references, on a small real U-Net class.

The U-Net is dynamic_network_architectures' PlainConvUNet (what nnU-Net builds), with random weights;
references are plain calls of its encoder and decoder, numpy, and scikit-learn.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from torch import nn

from nnunet_ood.detectors.mahalanobis import LatentMahalanobisDetector
from nnunet_ood.errors import OODInputError, OODStateError
from nnunet_ood.methods.sd import SDTrainingConfig
from nnunet_ood.methods.sd.autoencoder import BottleneckAutoencoder, reduction_strides
from nnunet_ood.methods.sd.insertion import AutoencoderInsertion, segmentation_distortion
from nnunet_ood.methods.sd.training import train_autoencoder

SHAPES = [(16, 4, 4), (16, 2, 2), (8, 1, 1), (12, 5, 7), (8, 8, 8), (32, 3, 16),
          (16, 4, 5, 5), (8, 2, 3, 3), (8, 1, 4, 4), (4, 8, 8, 8), (4, 3, 1, 6), (6, 1, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reconstruction_has_the_input_shape(shape):
    ae = BottleneckAutoencoder(shape[0], shape[1:], latent_dim=8)
    x = torch.randn(3, *shape)
    r, z = ae(x)
    assert r.shape == x.shape and z.shape == (3, 8)


@pytest.mark.parametrize("spatial, reduced", [((4, 4), (2, 2)), ((8, 8), (2, 2)), ((4, 5, 5), (2, 3, 3)),
                                              ((2, 2), (2, 2)), ((16, 3), (4, 3)), ((6, 6), (3, 3))])
def test_reduction_rule(spatial, reduced):
    # the documented rule: per block, halve every axis with at least 4 voxels (ceil), at most two blocks
    shape = list(spatial)
    for stride in reduction_strides(spatial):
        assert all(st == (2 if s >= 4 else 1) for s, st in zip(shape, stride))
        shape = [-(-s // st) for s, st in zip(shape, stride)]
    assert tuple(shape) == reduced
    assert BottleneckAutoencoder(4, spatial).sizes[-1] == reduced


def test_autoencoder_state_round_trip_and_refusals(tmp_path):
    ae = BottleneckAutoencoder(8, (4, 5, 5), latent_dim=6).eval()
    ae.save(tmp_path)
    loaded = BottleneckAutoencoder.load(tmp_path)
    x = torch.randn(2, 8, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], ae(x)[0], rtol=0, atol=0)
        with pytest.raises(OODStateError, match="re-fit sd"):
            loaded(torch.randn(2, 8, 4, 4, 4))  # a bottleneck of another shape
    path = tmp_path / "sd_autoencoder.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(OODStateError, match="cannot read the SD autoencoder"):
        BottleneckAutoencoder.load(tmp_path)
    with pytest.raises(OODStateError, match="no SD autoencoder"):
        BottleneckAutoencoder.load(tmp_path / "missing")


@pytest.mark.parametrize("ndim, patch, residual", [(2, (16, 20), False), (3, (8, 12, 16), False),
                                                   (2, (16, 16), True), (3, (8, 8, 12), True)])
def test_single_pass_decoder_equals_two_decoder_calls(ndim, patch, residual, tiny_unet):
    net = tiny_unet(ndim, residual=residual)
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        skips = net.encoder(x)
        ae = BottleneckAutoencoder(skips[-1].shape[1], skips[-1].shape[2:], latent_dim=8).eval()
        reference = net.decoder(skips)
        reference_ae = net.decoder(list(skips[:-1]) + [ae(skips[-1])[0]])
        for batched in (True, False):
            insertion = AutoencoderInsertion(net, ae, batched=batched)
            insertion.arm()
            returned = net(x)
            result = insertion.take()
            insertion.remove()
            returned_copy = returned.clone()
            returned += 1  # nnU-Net adds its mirrored passes into the returned logits in place
            torch.testing.assert_close(result.logits, returned_copy, rtol=0, atol=0)
            returned = returned_copy
            torch.testing.assert_close(result.logits_ae, reference_ae, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(returned, reference, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(result.latent, ae.encode(skips[-1]), rtol=1e-6, atol=1e-6)
            if not batched:  # the network's own decoder call is untouched: bit-identical logits
                assert torch.equal(returned, reference)
        assert torch.equal(net(x), reference)  # hooks removed: the network is as before


def test_segmentation_distortion_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 4, 5, 6)), rng.normal(size=(2, 4, 5, 6))

    def softmax(v):
        e = np.exp(v - v.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    expected = ((softmax(a) - softmax(b)) ** 2).mean(1)
    got = segmentation_distortion(torch.from_numpy(a), torch.from_numpy(b), region_based=False)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-9)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    got = segmentation_distortion(torch.from_numpy(a), torch.from_numpy(b), region_based=True)
    np.testing.assert_allclose(got.numpy(), ((sig(a) - sig(b)) ** 2).mean(1), rtol=1e-5, atol=1e-9)


def test_training_leaves_the_unet_bit_identical_and_lowers_the_loss(tiny_unet):
    net = tiny_unet(2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    torch.manual_seed(1)
    dataset = [torch.randn(4, 1, 16, 16) for _ in range(4)]  # a tiny dataset, cycled
    with torch.no_grad():
        shape = net.encoder(dataset[0])[-1].shape[1:]
    ae = BottleneckAutoencoder(shape[0], shape[1:], latent_dim=8)
    config = SDTrainingConfig(iterations_per_epoch=8, max_epochs=6, patience=6, val_batches=1)
    history = train_autoencoder(net, ae, itertools.cycle(dataset), dataset[:1], config, torch.device("cpu"),
                                region_based=False, progress=False)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in net.parameters()] == flags
    assert history["train_loss"][-1] < 0.8 * history["train_loss"][0]
    assert min(history["val_loss"]) < history["val_loss"][0]
    assert history["best_val_loss"] == min(history["val_loss"])


def test_latent_mahalanobis_agrees_with_sklearn():
    torch.manual_seed(0)
    ae = BottleneckAutoencoder(8, (4, 4), latent_dim=6).eval()
    with torch.no_grad():
        train = ae.encode(torch.randn(400, 8, 4, 4)).double()
        test = ae.encode(torch.randn(20, 8, 4, 4) * 3).double()
    detector = LatentMahalanobisDetector().fit(train)
    reference = LedoitWolf().fit(train.numpy()).mahalanobis(test.numpy())
    np.testing.assert_allclose(detector.score(test).numpy(), reference, rtol=1e-6)


def test_network_without_encoder_stages_is_refused_clearly():
    with pytest.raises(OODInputError, match="cannot hook the bottleneck"):
        AutoencoderInsertion(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_distortion_loss_is_the_papers_sum_of_squared_errors():
    """``sum``: per patch, SSE of the logits plus SSE of the bottleneck (equal weights), averaged over the batch;
    ``mean``: each term averaged over its elements (what F.mse_loss gives)."""
    from nnunet_ood.methods.sd.insertion import DistortionPass
    from nnunet_ood.methods.sd.training import distortion_loss

    rng = np.random.default_rng(3)
    logits, logits_ae = rng.normal(size=(2, 3, 2, 16, 16))  # batch 3, 2 classes
    bottleneck, reconstruction = rng.normal(size=(2, 3, 8, 2, 2))
    result = DistortionPass(*(torch.from_numpy(a) for a in (logits, logits_ae, bottleneck, reconstruction)),
                            latent=torch.zeros(3, 4))
    sse = [((logits_ae[b] - logits[b]) ** 2).sum() + ((reconstruction[b] - bottleneck[b]) ** 2).sum() for b in range(3)]
    assert float(distortion_loss(result, "sum")) == pytest.approx(np.mean(sse), rel=1e-6)
    mean = ((logits_ae - logits) ** 2).mean() + ((reconstruction - bottleneck) ** 2).mean()
    assert float(distortion_loss(result, "mean")) == pytest.approx(mean, rel=1e-6)


def best_epoch_by_brute_force(losses: list[float], dice: list[float], min_agreement: float) -> int:
    faithful = [e for e in range(len(losses)) if dice[e] >= min_agreement]
    if faithful:
        return min(faithful, key=lambda e: (losses[e], e))
    return max(range(len(losses)), key=lambda e: (dice[e], -losses[e], -e))


@pytest.mark.parametrize("seed", range(20))
def test_best_epoch_rule_against_brute_force(seed):
    from nnunet_ood.methods.sd.training import _BestEpoch

    rng = np.random.default_rng(seed)
    losses = rng.integers(0, 5, 12).astype(float).tolist()  # ties on purpose
    dice = rng.choice([0.9, 0.95, 0.99, 0.995, 1.0], 12, p=[.3, .3, .1, .2, .1]).tolist()
    best = _BestEpoch(0.99)
    for epoch, (loss, d) in enumerate(zip(losses, dice)):
        best.update(epoch, loss, d, {"epoch": torch.tensor(epoch)})
    expected = best_epoch_by_brute_force(losses, dice, 0.99)
    assert best.epoch == expected and int(best.weights["epoch"]) == expected


@pytest.mark.parametrize("min_agreement", [0.0, 1.0])
def test_training_keeps_the_epoch_of_the_stopping_rule(tiny_unet, min_agreement):
    """All epochs run (patience = max_epochs): the kept weights are the rule's epoch, re-evaluated here."""
    from nnunet_ood.methods.sd.training import _evaluate

    net = tiny_unet(2, seed=2)
    torch.manual_seed(4)
    dataset = [torch.randn(4, 1, 16, 16) for _ in range(3)]
    with torch.no_grad():
        shape = net.encoder(dataset[0])[-1].shape[1:]
    ae = BottleneckAutoencoder(shape[0], shape[1:], latent_dim=4)
    config = SDTrainingConfig(iterations_per_epoch=3, max_epochs=5, patience=5, lr_patience=1, val_batches=1,
                              min_agreement=min_agreement)
    history = train_autoencoder(net, ae, itertools.cycle(dataset), dataset[:1], config, torch.device("cpu"),
                                region_based=False, progress=False)
    expected = best_epoch_by_brute_force(history["val_loss"], history["val_dice_with_without_ae"], min_agreement)
    assert history["epochs_run"] == 5 and history["best_epoch"] == expected
    insertion = AutoencoderInsertion(net, ae, batched=True)
    try:
        loss, agreement = _evaluate(net, insertion, dataset[:1], torch.device("cpu"), False, "sum")
    finally:
        insertion.remove()
    assert loss == pytest.approx(history["val_loss"][expected], rel=1e-5)
    assert agreement == pytest.approx(history["val_dice_with_without_ae"][expected], rel=1e-6)
    # ReduceLROnPlateau(factor 0.5, patience 1) simulated: halve after more than one epoch without a new low
    lr, low, waited = config.learning_rate, np.inf, 0
    for loss_e, lr_e in zip(history["val_loss"], history["learning_rate"]):
        assert lr_e == pytest.approx(lr)
        if loss_e < low * (1 - 1e-4):
            low, waited = loss_e, 0
        else:
            waited += 1
            if waited > 1:
                lr, waited = lr / 2, 0


def test_agreement_warning_names_the_flags():
    from nnunet_ood.methods.sd.training import agreement_warning

    config = SDTrainingConfig()
    assert agreement_warning(0, {"best_val_dice": 0.995}, config) is None
    line = agreement_warning(0, {"best_val_dice": 0.95}, config)
    assert line.startswith("warning: fold 0 sd:") and "0.950 < 0.99" in line and "--sd_max_epochs" in line


def test_sd_training_options_are_checked():
    for bad in (dict(loss="l1"), dict(augmentation="none"), dict(min_agreement=1.5), dict(lr_patience=0)):
        with pytest.raises(OODInputError):
            SDTrainingConfig(**bad)
    for rate in (float("inf"), float("nan"), 0.0):  # --sd_lr inf trained to NaN weights, silently
        with pytest.raises(OODInputError, match="--sd_lr"):
            SDTrainingConfig(learning_rate=rate)


def test_trainer_augmentation_is_the_models_own_and_leaves_no_files(fit_context, tiny_project):
    """Batches come from the trainer's get_training_transforms (spatial + intensity transforms), at the
    configuration's patch size; building the trainer writes nothing under nnUNet_results."""
    import os

    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    from nnunet_ood.methods.sd.training import trainer_augmented_batches, trainer_training_transforms

    context = fit_context()
    before = sorted(p for p in tiny_project.results.rglob("*"))
    environment = dict(os.environ)
    transforms, initial = trainer_training_transforms(context.predictor, 0)
    assert any(isinstance(t, SpatialTransform) for t in transforms.transforms)
    patch = list(context.predictor.configuration_manager.patch_size)
    assert all(i >= p for i, p in zip(initial, patch))
    np.random.seed(0)
    batches = trainer_augmented_batches(context, context.train_keys, 3, 0.33)
    first, second = next(batches), next(batches)
    channels = len(context.predictor.dataset_json["channel_names"])
    assert first.shape == (3, channels, *patch) and first.dtype == torch.float32
    assert not torch.equal(first, second) and torch.isfinite(first).all()
    assert sorted(p for p in tiny_project.results.rglob("*")) == before and dict(os.environ) == environment
