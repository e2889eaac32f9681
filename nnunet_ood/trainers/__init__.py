"""nnU-Net trainer subclasses that fit the OOD detectors at the end of training.

nnU-Net finds trainers outside its own package through ``nnUNet_extTrainer``; point it at
``nnUNetv2_ood_trainer_dir`` (the ``ext`` folder, whose module only re-exports the classes defined here,
so that they stay importable and picklable under their real module name).
"""

from nnunet_ood.ext_trainer import trainer_dir
from nnunet_ood.trainers.nnUNetTrainerOOD import *  # noqa: F401,F403

EXT_TRAINER_DIR = trainer_dir()
