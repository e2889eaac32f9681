"""``nnUNetTrainerOOD``: trains exactly like ``nnUNetTrainer``, then fits the fold's OOD detectors."""

from __future__ import annotations

import dataclasses
import os
import platform
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ood.errors import OODError
from nnunet_ood.fitting.options import FitOptions
from nnunet_ood.methods.quality import QualityConfig
from nnunet_ood.methods.sd import SDTrainingConfig

__all__ = ["nnUNetTrainerOOD", "nnUNetTrainerOOD_1epoch", "nnUNetTrainerOOD_5epochs", "nnUNetTrainerOOD_10epochs",
           "nnUNetTrainerOOD_20epochs", "nnUNetTrainerOOD_50epochs", "nnUNetTrainerOOD_100epochs",
           "nnUNetTrainerOOD_250epochs", "nnUNetTrainerOOD_500epochs", "nnUNetTrainerOOD_demo",
           "nnUNetTrainerOOD_demo_full", "nnUNetTrainerOOD_smoke"]


class nnUNetTrainerOOD(nnUNetTrainer):
    """nnU-Net's default trainer plus, after ``checkpoint_final.pth`` is written, ``nnUNetv2_fit_ood``'s fit.

    Training itself is untouched. The fit uses the same code as ``nnUNetv2_fit_ood`` and stores its
    state in ``fold_X/ood``. If it fails on bad input, training still counts as done and the log says
    how to fit afterwards. Subclasses set ``ood_fit_options`` (every option ``nnUNetv2_fit_ood`` has, e.g.
    ``FitOptions(methods=("mahalanobis",))``); its ``device`` is replaced by the trainer's.
    """

    ood_fit_options: FitOptions = FitOptions()
    #: seed for Python, numpy and torch before training starts; None keeps nnU-Net's unseeded behaviour
    training_seed: int | None = None
    #: CPU threads of a seeded training (None: nnU-Net's choice, all cores)
    training_threads: int | None = None

    def on_train_start(self) -> None:
        if self.training_seed is not None:  # reproducible short schedules (demo, tests) on the CPU
            pin_cpu_numerics(self.training_threads)
            random.seed(self.training_seed)
            np.random.seed(self.training_seed)
            torch.manual_seed(self.training_seed)
        super().on_train_start()

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("OOD: checkpointing is disabled, so no checkpoint_final.pth to fit on; "
                                   "run nnUNetv2_fit_ood after saving a checkpoint")
            return
        from nnunet_ood.fitting import fit_fold  # late import: the fit pulls in the predictor

        options = dataclasses.replace(self.ood_fit_options, device=self.device, checkpoint="checkpoint_final.pth")
        self.print_to_log_file(f"OOD: fitting {', '.join(options.methods)} for fold {self.fold}")
        try:
            fit_fold(self.output_folder_base, self.fold, options)
        except OODError as e:
            self.print_to_log_file(f"OOD: fitting failed: {e}. Training is complete; fit later with "
                                   f"nnUNetv2_fit_ood -d {self.plans_manager.dataset_name} -c "
                                   f"{self.configuration_name} -f {self.fold} -tr {type(self).__name__}")
            return
        self.print_to_log_file("OOD: detectors stored in " + self.output_folder + "/ood")


def pin_cpu_numerics(threads: int | None) -> None:
    """Make CPU training repeat bit for bit across machines: a fixed thread count and instruction set.

    Seeds alone are not enough: oneDNN's convolutions sum in a different order with another number of
    threads or with AVX-512 instead of AVX2 kernels (measured: the first steps' losses of the demo differ in
    the 7th digit, and the difference grows over training). oneDNN reads ``ONEDNN_MAX_CPU_ISA`` when it
    creates its first primitive, so setting it here, before the first convolution of this process, works;
    a value the user set is kept.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def _with_epochs(name: str, epochs: int) -> type[nnUNetTrainerOOD]:
    """nnUNetTrainerOOD with nnU-Net's usual shorter-schedule naming (``nnUNetTrainer_Xepochs``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        nnUNetTrainerOOD.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs

    return type(name, (nnUNetTrainerOOD,), {"__init__": __init__, "__module__": __name__,
                                            "__doc__": f"nnUNetTrainerOOD with {epochs} epoch(s)."})


nnUNetTrainerOOD_1epoch = _with_epochs("nnUNetTrainerOOD_1epoch", 1)
nnUNetTrainerOOD_5epochs = _with_epochs("nnUNetTrainerOOD_5epochs", 5)
nnUNetTrainerOOD_10epochs = _with_epochs("nnUNetTrainerOOD_10epochs", 10)
nnUNetTrainerOOD_20epochs = _with_epochs("nnUNetTrainerOOD_20epochs", 20)
nnUNetTrainerOOD_50epochs = _with_epochs("nnUNetTrainerOOD_50epochs", 50)
nnUNetTrainerOOD_100epochs = _with_epochs("nnUNetTrainerOOD_100epochs", 100)
nnUNetTrainerOOD_250epochs = _with_epochs("nnUNetTrainerOOD_250epochs", 250)
nnUNetTrainerOOD_500epochs = _with_epochs("nnUNetTrainerOOD_500epochs", 500)


class nnUNetTrainerOOD_demo(nnUNetTrainerOOD):
    """The CPU demo's schedule (``nnunet_ood_demo``): 20 epochs of 20 iterations and a short AE schedule, about
    2.5 minutes on 2 cores, seeded."""

    training_seed = 0
    training_threads = 2
    num_demo_epochs = 20
    # 12 validation cases in fold 0: a tolerated rate of 0.1 needs 9 of them (0.05 would need 19)
    ood_fit_options = FitOptions(method_configs={
        "sd": SDTrainingConfig(batch_size=8, iterations_per_epoch=20, max_epochs=8, patience=2, val_batches=4),
        "quality": QualityConfig(max_silent_failures=0.1, corruptions_per_case=4, corruptions_per_version=2)})

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.num_demo_epochs
        self.num_iterations_per_epoch = 20
        self.num_val_iterations_per_epoch = 5


class nnUNetTrainerOOD_demo_full(nnUNetTrainerOOD_demo):
    """``nnunet_ood_demo --full``: 30 epochs of 20 iterations and a longer AE schedule (about 4 minutes), seeded."""

    num_demo_epochs = 30
    ood_fit_options = FitOptions(method_configs={
        "sd": SDTrainingConfig(batch_size=8, iterations_per_epoch=20, max_epochs=15, patience=3, val_batches=4),
        "quality": QualityConfig(max_silent_failures=0.1, corruptions_per_case=4, corruptions_per_version=2)})


class nnUNetTrainerOOD_smoke(nnUNetTrainerOOD):
    """Smoke-test schedule (3 epochs of 20 iterations), seeded: exercises the whole pipeline, learns little."""

    training_seed = 0
    training_threads = 2
    ood_fit_options = FitOptions(method_configs={"sd": SDTrainingConfig(latent_dim=16, iterations_per_epoch=10,
                                                                        max_epochs=4, patience=2, val_batches=2)})

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3
        self.num_iterations_per_epoch = 20
        self.num_val_iterations_per_epoch = 2
