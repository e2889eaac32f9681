"""What identifies the model a predictor runs: configuration, fingerprints, settings, bottleneck shape."""

from __future__ import annotations

import os
from typing import Any

from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

from nnunet_ood.errors import OODStateError
from nnunet_ood.features import bottleneck_shape
from nnunet_ood.fold_state import model_fingerprint
from nnunet_ood.inference.heap import return_freed_heap
from nnunet_ood.io.site_calibration import model_identity, score_settings


class ModelIdentity:
    """Mixin of :class:`~nnunet_ood.inference.predictor.nnUNetOODPredictor` (reads nnU-Net's predictor state)."""

    def score_settings(self) -> dict[str, Any]:
        """The prediction settings that change the scale of OOD scores (checked against calibrations)."""
        return score_settings(self.tile_step_size, bool(self.use_mirroring and self.allowed_mirroring_axes),
                              self.use_gaussian)

    def model_identity(self) -> dict[str, Any]:
        """Configuration, plans, folds, checkpoint and weights in use (what a named calibration must match)."""
        return model_identity(self.configuration_name, self.plans_manager.plans_name, self.use_folds,
                              self.checkpoint_name, [s.fingerprint["weights_sha256"] for s in self.ood_states])

    def bottleneck_shape(self) -> tuple[int, ...]:
        """``(C, *spatial)`` of the bottleneck for one patch, from a dry run of the encoder on zeros."""
        self.network = self.network.to(self.device)
        shape = bottleneck_shape(self.network, self.num_input_channels, self.configuration_manager.patch_size,
                                 self.device)
        # the dry run's activations (a patch's encoder pass: over 100 MB in 3D) are freed into the C heap, whose
        # pages glibc would otherwise keep for the whole prediction
        return_freed_heap()
        return shape

    @property
    def num_input_channels(self) -> int:
        return determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)

    def fingerprint_for(self, fold_index: int) -> dict[str, Any]:
        """The model fingerprint of the ``fold_index``-th loaded fold (what its OOD state must match)."""
        return model_fingerprint(self.plans_manager.plans, self.configuration_name, self.use_folds[fold_index],
                                 self.num_input_channels, self.label_manager.num_segmentation_heads,
                                 self.checkpoint_name, self.list_of_parameters[fold_index])

    @property
    def configuration_name(self) -> str:
        """Name of the configuration in use (nnU-Net keeps only its resolved dict)."""
        candidates = [name for name in self.plans_manager.plans["configurations"]
                      if self.plans_manager.get_configuration(name).configuration ==
                      self.configuration_manager.configuration]
        if not candidates:
            raise OODStateError("cannot tell which configuration of the plans this model uses")
        # identical configurations can only be told apart by nnU-Net's folder name Trainer__Plans__Configuration
        from_folder = os.path.basename(self.model_folder or "").split("__")[-1]
        return from_folder if from_folder in candidates else candidates[0]
