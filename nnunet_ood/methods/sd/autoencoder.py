"""The Segmentation Distortion autoencoder, built from the shape of a U-Net's bottleneck (METHODS.md §2).

Lennartz & Schultz use, for 2D activation maps, an encoder of two blocks of four 3x3 convolutions
(stride 1, LayerNorm, LeakyReLU), each block ending in a stride-2 reduction, a dense bottleneck and a
mirrored decoder. Their AE is tied to one input size; this one is built for any bottleneck shape:

* LayerNorm over channels and space is ``GroupNorm`` with one group, which does not fix the size.
* Reduction rule: each of the two blocks halves (stride 2) every axis that still has at least 4
  voxels, so no axis drops below 2; axes that are smaller keep stride 1. A 4x4 bottleneck is reduced
  once (to 2x2), 4x5x5 once (to 2x3x3), 8x8 twice (to 2x2), 2x2 never (both blocks keep stride 1).
* The decoder upsamples to the exact encoder-side sizes, so odd and anisotropic shapes come back
  unchanged, then runs four convolutions per block; a final 1x1 convolution restores the channels.

The state is saved as safetensors (weights) with the architecture as JSON metadata; nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from nnunet_ood.errors import OODStateError
from nnunet_ood.io.atomic import atomic_save_tensors
from nnunet_ood.methods.sd import AE_STATE_NAME, DEFAULT_LATENT_DIM

__all__ = ["AE_STATE_NAME", "DEFAULT_LATENT_DIM", "BottleneckAutoencoder", "reduction_strides"]

#: the paper's encoder: two blocks of four convolutions, each block ending in a reduction
N_BLOCKS = 2
CONVS_PER_BLOCK = 4
#: the AE's convolutions use at most this many channels (the bottleneck itself can have 320-512)
DEFAULT_MAX_HIDDEN_CHANNELS = 128
FORMAT_VERSION = 1


def reduction_strides(spatial_shape: Sequence[int], n_blocks: int = N_BLOCKS) -> list[tuple[int, ...]]:
    """Per block, the stride of its reduction: 2 on axes with at least 4 voxels, else 1 (module docstring)."""
    shape = [int(s) for s in spatial_shape]
    strides = []
    for _ in range(n_blocks):
        stride = tuple(2 if s >= 4 else 1 for s in shape)
        strides.append(stride)
        shape = [math.ceil(s / st) for s, st in zip(shape, stride)]
    return strides


def _conv(ndim: int, c_in: int, c_out: int, kernel: int = 3, stride: Sequence[int] | int = 1) -> nn.Module:
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    return conv(c_in, c_out, kernel, stride=stride, padding=kernel // 2)


def _norm_act(channels: int) -> list[nn.Module]:
    return [nn.GroupNorm(1, channels), nn.LeakyReLU(0.01, inplace=True)]


def _block(ndim: int, c_in: int, c_out: int, n_convs: int, last_stride: Sequence[int] | None) -> nn.Sequential:
    """``n_convs`` 3x3 convolutions with LayerNorm + LeakyReLU; the optional last one has ``last_stride``."""
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers += [_conv(ndim, c_in if i == 0 else c_out, c_out), *_norm_act(c_out)]
    if last_stride is not None:
        layers += [_conv(ndim, c_out, c_out, stride=tuple(last_stride)), *_norm_act(c_out)]
    return nn.Sequential(*layers)


class BottleneckAutoencoder(nn.Module):
    """Autoencoder for bottleneck activations ``(B, C, *spatial)``; ``forward`` returns ``(r(x), z)``.

    Args:
        in_channels: bottleneck channels C.
        spatial_shape: bottleneck spatial shape (2 or 3 axes) for the network's patch size.
        latent_dim: size of the dense bottleneck (the latent vector z used by latent Mahalanobis).
        hidden_channels: channels of the AE's convolutions (default ``min(C, 128)``).
    """

    def __init__(self, in_channels: int, spatial_shape: Sequence[int], latent_dim: int = DEFAULT_LATENT_DIM,
                 hidden_channels: int | None = None) -> None:
        super().__init__()
        spatial_shape = tuple(int(s) for s in spatial_shape)
        if len(spatial_shape) not in (2, 3) or min(spatial_shape) < 1 or in_channels < 1 or latent_dim < 1:
            raise OODStateError(f"cannot build an autoencoder for a bottleneck of {in_channels} channels and shape "
                                f"{spatial_shape} with latent size {latent_dim}")
        hidden = int(hidden_channels or min(in_channels, DEFAULT_MAX_HIDDEN_CHANNELS))
        self.config = {"in_channels": int(in_channels), "spatial_shape": list(spatial_shape),
                       "latent_dim": int(latent_dim), "hidden_channels": hidden}
        ndim = len(spatial_shape)
        self.strides = reduction_strides(spatial_shape)
        self.sizes = [spatial_shape]  # encoder-side sizes before each reduction, then the reduced size
        for stride in self.strides:
            self.sizes.append(tuple(math.ceil(s / st) for s, st in zip(self.sizes[-1], stride)))
        self.encoder_blocks = nn.ModuleList(
            _block(ndim, in_channels if i == 0 else hidden, hidden, CONVS_PER_BLOCK, stride)
            for i, stride in enumerate(self.strides))
        flat = hidden * math.prod(self.sizes[-1])
        self.to_latent = nn.Linear(flat, latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        self.decoder_blocks = nn.ModuleList(_block(ndim, hidden, hidden, CONVS_PER_BLOCK, None) for _ in self.strides)
        self.head = _conv(ndim, hidden, in_channels, kernel=1)
        self._hidden = hidden

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.config["spatial_shape"])

    @property
    def in_channels(self) -> int:
        return self.config["in_channels"]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent vectors ``(B, latent_dim)`` of bottleneck activations ``x``."""
        for block in self.encoder_blocks:
            x = block(x)
        return self.to_latent(x.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructed activations ``(B, C, *spatial)`` from latent vectors."""
        x = self.from_latent(z).view(z.shape[0], self._hidden, *self.sizes[-1])
        for block, size in zip(self.decoder_blocks, reversed(self.sizes[:-1])):
            x = block(F.interpolate(x, size=size, mode="nearest"))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(x.shape[1:]) != (self.in_channels, *self.spatial_shape):
            raise OODStateError(f"the SD autoencoder was built for bottlenecks of shape "
                                f"{(self.in_channels, *self.spatial_shape)} but got {tuple(x.shape[1:])}; "
                                "re-fit sd with nnUNetv2_fit_ood --ood sd")
        z = self.encode(x)
        return self.decode(z), z

    # ------------------------------------------------------------------ state
    def save(self, directory: str | os.PathLike[str], training: dict[str, Any] | None = None) -> str:
        """Write ``<directory>/sd_autoencoder.safetensors`` atomically (weights + JSON architecture)."""
        path = os.path.join(os.fspath(directory), f"{AE_STATE_NAME}.safetensors")
        metadata = {"format_version": str(FORMAT_VERSION), "name": AE_STATE_NAME,
                    "config": json.dumps(self.config, sort_keys=True), "training": json.dumps(training or {})}
        atomic_save_tensors(path, self.state_dict(), metadata)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str], device: torch.device | str | None = None) \
            -> BottleneckAutoencoder:
        """Load what :meth:`save` wrote; a one-line :class:`OODStateError` if missing or invalid."""
        path = os.path.join(os.fspath(directory), f"{AE_STATE_NAME}.safetensors")
        if not os.path.isfile(path):
            raise OODStateError(f"no SD autoencoder at {path}; fit it with nnUNetv2_fit_ood --ood sd")
        try:
            with safe_open(path, framework="pt") as fh:
                metadata = fh.metadata() or {}
            tensors = load_file(path, device="cpu")
            if metadata.get("name") != AE_STATE_NAME or metadata.get("format_version") != str(FORMAT_VERSION):
                raise ValueError(f"not an SD autoencoder of format {FORMAT_VERSION}")
            config = json.loads(metadata["config"])
            model = cls(config["in_channels"], config["spatial_shape"], config["latent_dim"],
                        config["hidden_channels"])
            model.load_state_dict(tensors, strict=True)
        except Exception as exc:  # safetensors, json and load_state_dict raise many types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise OODStateError(f"cannot read the SD autoencoder {path} ({first}); re-fit it with "
                                "nnUNetv2_fit_ood --ood sd") from None
        return model.to(device if device is not None else "cpu").eval()
