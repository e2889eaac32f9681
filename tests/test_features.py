"""Pooling of bottleneck features and the bottleneck hook, against numpy and a manual encoder walk."""

import math

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_ood.errors import OODInputError
from nnunet_ood.features import (
    MAX_POOLED_FEATURES,
    BottleneckCapture,
    bottleneck_module,
    pool_features,
    pooled_shape,
    pooling_kernels,
)


def numpy_pool2(x: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """Average pooling with kernel == stride by loops over output cells; a window cut by the border is
    averaged over the voxels it has (independent of torch)."""
    b, c, *spatial = x.shape
    out_shape = [math.ceil(s / k) for s, k in zip(spatial, kernel)]
    out = np.zeros((b, c, *out_shape))
    for cell in np.ndindex(*out_shape):
        window = tuple(slice(i * k, min((i + 1) * k, s)) for i, k, s in zip(cell, kernel, spatial))
        out[(slice(None), slice(None), *cell)] = x[(slice(None), slice(None), *window)].reshape(b, c, -1).mean(-1)
    return out


@pytest.mark.parametrize("channels,spatial,expected", [
    (512, (4, 4), (4, 4)),            # 8192 < 1e4: untouched (default 2D nnU-Net)
    (320, (8, 8, 8), (2, 2, 2)),      # 163840 -> 20480 -> 2560
    (320, (4, 8, 8), (1, 2, 2)),      # 81920 -> 10240 (still >= 1e4) -> 1280
    (320, (1, 8, 8), (1, 4, 4)),      # size-1 axis keeps kernel 1
    (320, (5, 7, 9), (2, 2, 3)),      # odd sizes round up: 100800 -> 19200 -> 3840
    (20000, (1, 1), (1, 1)),          # channels alone exceed the limit: never pool channels
])
def test_pooling_dimensions(channels, spatial, expected):
    assert pooled_shape(channels, spatial) == expected
    x = torch.randn(2, channels if channels < 5000 else 3, *spatial)
    if channels < 5000:
        pooled = pool_features(x)
        assert pooled.shape == (2, channels * math.prod(expected))
        if channels * math.prod(spatial) >= MAX_POOLED_FEATURES and any(s >= 2 for s in spatial):
            assert pooled.shape[1] < MAX_POOLED_FEATURES


def test_pooling_values_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 320, 6, 8, 10)).astype(np.float32)
    reference = x.astype(np.float64)
    for kernel in pooling_kernels(320, (6, 8, 10)):
        reference = numpy_pool2(reference, kernel)
    got = pool_features(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(got, reference.reshape(3, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial", [(4, 5, 5), (5, 7, 7), (3, 6, 6), (7, 4, 4), (5, 7), (3, 9), (9, 4)])
def test_every_bottleneck_voxel_reaches_the_features(spatial):
    """An activation on any single voxel, edges of odd axes included, changes the pooled features."""
    limit = 2 * math.prod(spatial)  # 2 channels reach the limit: at least one pooling step
    assert pooling_kernels(2, spatial, limit)
    for voxel in np.ndindex(*spatial):
        x = torch.zeros(1, 2, *spatial)
        x[(0, 1, *voxel)] = 1.0
        assert float(pool_features(x, max_features=limit).abs().sum()) > 0, voxel
    # activations on the last slice of every axis only (floor-mode pooling gave exactly 0): as numpy pools
    x = torch.zeros(1, 2, *spatial)
    for axis, size in enumerate(spatial):
        index = [slice(None)] * len(spatial)
        index[axis] = slice(size - 1, size)
        x[(slice(None), slice(None), *index)] = 2.0
    reference = x.double().numpy()
    for kernel in pooling_kernels(2, spatial, limit):
        reference = numpy_pool2(reference, kernel)
    got = pool_features(x, max_features=limit).double().numpy()
    np.testing.assert_allclose(got, reference.reshape(1, -1), rtol=1e-6)
    assert got.max() > 0


def _networks():
    common = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=nn.Conv2d,
                  kernel_sizes=3, strides=[1, 2, 2], num_classes=2, norm_op=nn.InstanceNorm2d,
                  nonlin=nn.LeakyReLU)
    yield PlainConvUNet(n_conv_per_stage=2, n_conv_per_stage_decoder=2, **common)
    yield ResidualEncoderUNet(n_blocks_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1], **common)


@pytest.mark.parametrize("network", list(_networks()), ids=["PlainConvUNet", "ResidualEncoderUNet"])
def test_hook_captures_last_encoder_stage_once(network):
    network.eval()
    x = torch.randn(2, 1, 16, 16)
    # manual walk through the encoder: stem (if any), then all stages
    h = x if getattr(network.encoder, "stem", None) is None else network.encoder.stem(x)
    for stage in network.encoder.stages:
        h = stage(h)
    capture = BottleneckCapture(network)
    with torch.no_grad():
        capture.arm()
        network(x)
        network(torch.flip(x, (2,)))  # a second (mirrored) pass must not overwrite the capture
    got = capture.take()
    assert got.shape == (2, 16, 4, 4)
    torch.testing.assert_close(got, h.detach())
    capture.remove()
    assert bottleneck_module(network) is network.encoder.stages[-1]


def test_unsupported_network_says_so():
    with pytest.raises(OODInputError, match="encoder.stages"):
        BottleneckCapture(nn.Sequential(nn.Conv2d(1, 1, 3)))
