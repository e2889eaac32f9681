"""nnU-Net's sliding window, as the fit and the reports need it outside nnU-Net's own prediction.

The layout (padding and patch slicers) comes from nnU-Net's own functions, so patches are exactly the
ones ``nnUNetPredictor`` would run. :func:`window_batches` walks them in batches (the fit runs only
the encoder, or the network with a method's hooks, on several patches at once).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


@dataclass(frozen=True)
class SlidingWindowLayout:
    """Where nnU-Net's sliding window put its patches for one case (in the preprocessed, padded image).

    ``slicers`` are nnU-Net's own slicers (leading channel slice included); ``revert_padding`` crops
    the padded spatial shape back to the preprocessed image.
    """

    padded_shape: tuple[int, ...]
    slicers: tuple[tuple, ...]
    revert_padding: tuple[slice, ...]
    patch_size: tuple[int, ...]

    @property
    def num_patches(self) -> int:
        return len(self.slicers)


def revert_padding_slicer(spatial_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[slice, ...]:
    """The spatial slicer that undoes nnU-Net's ``pad_nd_image`` padding to the patch size.

    Computed by padding a zero-channel array with the same function, so it cannot drift from nnU-Net.
    """
    _, slicer = pad_nd_image(np.empty((0, *spatial_shape), dtype=np.uint8), patch_size, "constant", None, True, None)
    return tuple(slice(int(s.start), int(s.stop)) for s in slicer[1:])


def pad_and_layout(predictor: nnUNetPredictor, data: torch.Tensor) -> tuple[torch.Tensor, SlidingWindowLayout]:
    """nnU-Net's padding of a preprocessed case ``(C, *spatial)`` and the layout of its sliding window."""
    patch_size = tuple(predictor.configuration_manager.patch_size)
    padded, revert = pad_nd_image(data, patch_size, "constant", {"value": 0}, True, None)
    slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
    layout = SlidingWindowLayout(tuple(padded.shape[1:]), tuple(slicers),
                                 tuple(slice(int(s.start), int(s.stop)) for s in revert[1:]), patch_size)
    return padded, layout


def patch_count(predictor: nnUNetPredictor, spatial_shape: Sequence[int]) -> int:
    """Patches nnU-Net's sliding window puts on a case of this spatial shape, without touching its data
    (the padding of :func:`pad_and_layout` only grows the patch axes to at least the patch size)."""
    patch_size = tuple(predictor.configuration_manager.patch_size)
    leading = len(spatial_shape) - len(patch_size)  # 2d configurations: the slice axis is not padded
    padded = (*spatial_shape[:leading], *(max(int(s), p) for s, p in zip(spatial_shape[leading:], patch_size)))
    return len(predictor._internal_get_sliding_window_slicers(padded))


def window_batches(padded: torch.Tensor, layout: SlidingWindowLayout, batch_size: int,
                   device: torch.device) -> Iterator[tuple[int, tuple, torch.Tensor]]:
    """``(first patch index, slicers, patches (B, C, *patch) on device)`` in sliding-window order."""
    for start in range(0, layout.num_patches, batch_size):
        slicers = layout.slicers[start:start + batch_size]
        yield start, slicers, torch.stack([padded[sl] for sl in slicers]).to(device)


def autocast(device: torch.device) -> AbstractContextManager:
    """The mixed precision nnU-Net uses for its forward passes: autocast on CUDA, nothing elsewhere."""
    return torch.autocast(device.type, enabled=True) if device.type == "cuda" else nullcontext()
