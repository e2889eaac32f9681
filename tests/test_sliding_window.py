"""nnU-Net's sliding-window layout: the patch count from a shape alone against padding the data."""

from types import SimpleNamespace

import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_ood.sliding_window import pad_and_layout, patch_count


@pytest.mark.parametrize("patch, shape", [
    ((16, 16), (1, 40, 23)),  # 2d configuration, one slice
    ((16, 16), (5, 9, 70)),  # 2d, slices, an axis smaller than the patch
    ((8, 16, 16), (13, 33, 16)),  # 3d
    ((8, 16, 16), (3, 5, 7)),  # 3d, smaller than the patch everywhere
])
@pytest.mark.parametrize("step", [0.5, 0.25, 1.0])
def test_patch_count_equals_the_padded_layout(patch, shape, step):
    predictor = nnUNetPredictor(tile_step_size=step, device=torch.device("cpu"), allow_tqdm=False)
    predictor.configuration_manager = SimpleNamespace(patch_size=list(patch))
    _, layout = pad_and_layout(predictor, torch.zeros(1, *shape))
    assert patch_count(predictor, shape) == layout.num_patches
