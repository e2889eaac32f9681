"""``tta``: the disagreement of nnU-Net's mirrored passes, against flips run by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ood.methods.base import FoldModels, TapContext
from nnunet_ood.methods.tta import MirroredPassTap, ProbabilitySpread, mirror_axes_combinations


def test_mirror_combinations_follow_nnunet_order():
    assert mirror_axes_combinations((0, 1)) == [(2,), (3,), (2, 3)]
    assert mirror_axes_combinations((0, 1, 2)) == [(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    assert mirror_axes_combinations(()) == []


def test_probability_spread_is_the_population_std_over_predictions():
    rng = np.random.default_rng(0)
    predictions = rng.dirichlet(np.ones(3), size=(5, 2, 4, 6)).transpose(0, 1, 4, 2, 3)  # (passes, B, C, X, Y)
    spread = ProbabilitySpread()
    for p in predictions:
        spread.add(torch.from_numpy(p))
    expected = predictions.std(axis=0).mean(axis=1)
    np.testing.assert_allclose(spread.std_over_predictions().numpy(), expected, rtol=1e-6, atol=1e-9)


def test_probability_spread_keeps_float32_passes_that_agree_closely():
    """Passes that differ by about 1e-4 in float32 (where E[p^2] - E[p]^2 in float32 is off by more than 100%): the
    streamed spread matches the float64 standard deviation of the same float32 values."""
    rng = np.random.default_rng(1)
    base = rng.dirichlet(np.ones(3), size=(2, 16, 16)).transpose(0, 3, 1, 2)  # (B, C, X, Y)
    predictions = (base[None] + rng.normal(0, 1e-4, (8, *base.shape))).astype(np.float32)
    spread = ProbabilitySpread()
    for p in predictions:
        spread.add(torch.from_numpy(p))
    result = spread.std_over_predictions()
    expected = predictions.astype(np.float64).std(axis=0).mean(axis=1)
    assert result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-3)
    naive = torch.from_numpy(predictions)  # the cancelling formula, for contrast: the test can tell them apart
    naive = ((naive * naive).mean(0) - naive.mean(0) ** 2).clamp_min(0).sqrt().mean(1).numpy()
    assert np.max(np.abs(naive - expected) / expected) > 0.1


class _TinyNet(nn.Module):
    """Not mirror-invariant: a position-dependent bias makes mirrored passes disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(1, 3, 6, 8))

    def forward(self, x):
        return self.conv(x) + self.bias


def test_tap_streams_nnunets_mirrored_passes():
    torch.manual_seed(0)
    net = _TinyNet().eval()
    x = torch.randn(1, 1, 6, 8)
    context = TapContext(network=net, folds=[FoldModels()], fold_names=["0"], region_based=False, mirror_axes=(0, 1),
                         device=torch.device("cpu"), method_params={}, predict_options={},
                         shape_of_bottleneck=lambda: ())
    tap = MirroredPassTap(context)
    try:
        with torch.no_grad():
            tap.before_patch(0)
            outputs = [net(x)] + [torch.flip(net(torch.flip(x, f)), f) for f in mirror_axes_combinations((0, 1))]
            tap.after_patch(x, 0)
            net(x)  # passes after the patch are not counted
        probs = np.stack([torch.softmax(o, 1).double().numpy() for o in outputs])
        np.testing.assert_allclose(tap.spread.numpy(), probs.std(axis=0).mean(axis=1), rtol=1e-5, atol=1e-8)
        assert tap.spread.mean() > 0
        tap.before_patch(0)
        net(x)
        with pytest.raises(RuntimeError, match="mirrored passes"):
            tap.after_patch(x, 1)  # only one pass: no mirroring
    finally:
        tap.remove()
    assert not net._forward_hooks


def test_tta_map_equals_brute_force_over_mirrored_passes(preprocessed_case):
    """tta from the predictor against flips run by hand (std over passes of the softmax, mean over classes)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    predictor, data = preprocessed_case(["tta"], "shift_strong")
    predictor.predict_logits_from_preprocessed_data(data)
    got = predictor.ood_results[-1].maps["tta"]

    patch = tuple(predictor.configuration_manager.patch_size)
    padded, revert = pad_nd_image(data.numpy(), patch, "constant", {"value": 0}, True, None)
    weights = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    weights = weights.double().numpy()
    numerator, denominator = np.zeros(padded.shape[1:]), np.zeros(padded.shape[1:])
    axes = [a + 2 for a in predictor.allowed_mirroring_axes]
    flips = [()] + [(a,) for a in axes] + ([tuple(axes)] if len(axes) == 2 else [])
    for sl in predictor._internal_get_sliding_window_slicers(padded.shape[1:]):
        x = torch.from_numpy(padded[sl][None])
        with torch.no_grad():
            probs = [torch.softmax(torch.flip(predictor.network(torch.flip(x, f)), f) if f else predictor.network(x),
                                   1).double().numpy() for f in flips]
        disagreement = np.stack(probs).std(axis=0).mean(axis=1)[0]
        numerator[sl[1:]] += disagreement * weights
        denominator[sl[1:]] += weights
    expected = (numerator / denominator)[tuple(revert[1:])]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert expected.mean() > 0


