"""Where nnU-Net finds the plugin's trainers: the folder to export as ``nnUNet_extTrainer``.

Found from this file's location, without importing :mod:`nnunet_ood.trainers` (which imports torch and
nnU-Net), so that ``nnUNetv2_ood_trainer_dir`` answers instantly; the trainers, the demo and the tests use it too.
"""

from __future__ import annotations

import os


def trainer_dir() -> str:
    """The ``ext`` folder of :mod:`nnunet_ood.trainers`, whose one module re-exports the trainer classes."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainers", "ext")
