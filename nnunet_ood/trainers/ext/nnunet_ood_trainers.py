"""Entry for nnU-Net's ``nnUNet_extTrainer`` search path.

nnU-Net imports this file as a top-level module and removes it again after the lookup, so it only
re-exports; the classes live in ``nnunet_ood.trainers`` where pickling can find them.
"""

from nnunet_ood.trainers.nnUNetTrainerOOD import *  # noqa: F401,F403
