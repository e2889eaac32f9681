"""Bottleneck features of an nnU-Net: where to hook them and how to pool them (METHODS.md §1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ood.errors import OODInputError

#: González et al. pool until the flattened feature vector of a patch has fewer entries than this.
MAX_POOLED_FEATURES = 10_000
#: Version of the pooled features. 1: floor-mode pooling (the last slice of odd axes was dropped);
#: 2: partial windows at the borders averaged over their valid voxels, so that every voxel contributes.
FEATURE_FORMAT = 2


def unwrap_network(network: nn.Module) -> nn.Module:
    """Return the plain module behind ``torch.compile`` and DistributedDataParallel wrappers."""
    while True:
        if hasattr(network, "_orig_mod"):  # torch._dynamo.OptimizedModule
            network = network._orig_mod
        elif isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        else:
            return network


def bottleneck_module(network: nn.Module) -> nn.Module:
    """The last encoder stage (``network.encoder.stages[-1]``), whose output is the bottleneck.

    This is where dynamic_network_architectures' PlainConvUNet, ResidualEncoderUNet and ResidualUNet
    keep it. Any other network must expose the same attribute path to be supported.
    """
    net = unwrap_network(network)
    stages = getattr(getattr(net, "encoder", None), "stages", None)
    if not isinstance(stages, (nn.Sequential, nn.ModuleList)) or len(stages) == 0:
        raise OODInputError(
            f"cannot hook the bottleneck of {type(net).__name__}: it has no `encoder.stages`; nnunet-ood supports "
            "U-Nets from dynamic_network_architectures (PlainConvUNet, ResidualEncoderUNet)"
        )
    return stages[-1]


def pooling_kernels(channels: int, spatial_shape: Sequence[int],
                    max_features: int = MAX_POOLED_FEATURES) -> list[tuple[int, ...]]:
    """Kernels of the repeated 2-stride-2 average poolings that bring C * prod(spatial) below ``max_features``.

    Axes already of size 1 get kernel 1 (pooling them would be undefined); if every spatial axis is 1
    and the channel count alone exceeds ``max_features``, pooling stops there (channels are never pooled).
    An odd axis of size s pools to ceil(s / 2): its last window is partial (see :func:`pool_features`).
    """
    shape = list(spatial_shape)
    kernels: list[tuple[int, ...]] = []
    while channels * math.prod(shape) >= max_features and any(s >= 2 for s in shape):
        kernel = tuple(2 if s >= 2 else 1 for s in shape)
        kernels.append(kernel)
        shape = [math.ceil(s / k) for s, k in zip(shape, kernel)]
    return kernels


def pooled_shape(channels: int, spatial_shape: Sequence[int],
                 max_features: int = MAX_POOLED_FEATURES) -> tuple[int, ...]:
    """Spatial shape after :func:`pooling_kernels` has been applied."""
    shape = list(spatial_shape)
    for kernel in pooling_kernels(channels, spatial_shape, max_features):
        shape = [math.ceil(s / k) for s, k in zip(shape, kernel)]
    return tuple(shape)


def pool_features(bottleneck: torch.Tensor, max_features: int = MAX_POOLED_FEATURES) -> torch.Tensor:
    """Project bottleneck activations ``(B, C, *spatial)`` to flat per-patch vectors ``(B, D)`` in float32.

    Average pooling with kernel 2 and stride 2 over the spatial axes only, repeated until
    D = C * prod(spatial) < ``max_features`` (METHODS.md §1). On an odd axis the last window is partial
    and averaged over the voxels it has (``ceil_mode``, no padding), so every voxel of the bottleneck
    contributes (:data:`FEATURE_FORMAT` 2; floor-mode pooling dropped the last slice of odd axes).
    """
    if bottleneck.ndim not in (4, 5):
        raise OODInputError("expected bottleneck activations of shape (B, C, X, Y[, Z]), "
                            f"got {tuple(bottleneck.shape)}")
    x = bottleneck.float()
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    for kernel in pooling_kernels(x.shape[1], x.shape[2:], max_features):
        x = pool(x, kernel_size=kernel, stride=kernel, ceil_mode=True)
    return x.flatten(1)


class BottleneckCapture:
    """Forward hook on the bottleneck that keeps the output of the next forward call once armed.

    Arming before nnU-Net's un-mirrored forward pass and disarming on the first capture means the
    mirrored passes that follow are never seen, so OOD scores do not depend on ``--disable_tta``.
    """

    def __init__(self, network: nn.Module) -> None:
        self._armed = False
        self._captured: torch.Tensor | None = None
        self._handle = bottleneck_module(network).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._armed:
            self._captured = output.detach()
            self._armed = False

    def arm(self) -> None:
        """Capture the output of the next forward pass through the bottleneck."""
        self._captured = None
        self._armed = True

    def take(self) -> torch.Tensor:
        """Return (and forget) the captured activations."""
        if self._captured is None:
            raise RuntimeError("the bottleneck hook captured nothing: the network did not run its encoder")
        out, self._captured = self._captured, None
        return out

    def remove(self) -> None:
        """Detach the hook from the network."""
        self._handle.remove()
        self._armed = False
        self._captured = None


def bottleneck_shape(network: nn.Module, num_input_channels: int, patch_size: Sequence[int],
                     device: torch.device) -> tuple[int, ...]:
    """``(C, *spatial)`` of the bottleneck of one patch, from a dry run of the encoder on zeros."""
    network.eval()
    capture = BottleneckCapture(network)
    try:
        with torch.inference_mode():
            capture.arm()
            unwrap_network(network).encoder(torch.zeros((1, num_input_channels, *patch_size), device=device))
            return tuple(capture.take().shape[1:])
    finally:
        capture.remove()
