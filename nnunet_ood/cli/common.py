"""Shared pieces of the command lines: device choice, model lookup, one-line errors.

Nothing here imports torch or nnU-Net at module level: the command lines parse and check their
arguments first, so a wrong flag is reported at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from nnunet_ood.errors import OODError, OODInputError, one_line_errors  # noqa: F401 (the commands import it here)

F = TypeVar("F", bound=Callable[..., object])

DEVICES = ("cpu", "cuda", "mps")
DEVICE_HELP = "cpu, cuda or mps (default: cuda if PyTorch sees a GPU, else cpu; nnU-Net's default is cuda)"


def check_device_name(name: str | None) -> None:
    """``-device`` must be one of :data:`DEVICES` (checked before torch is imported)."""
    if name is not None and name not in DEVICES:
        raise OODInputError(f"-device must be cpu, cuda or mps, got {name!r}")


def resolve_device(name: str | None) -> Any:
    """``-device`` (``None``: cuda if available, else cpu) as a torch device; threads set as nnU-Net's CLI does."""
    import torch

    check_device_name(name)
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise OODInputError("-device cuda was requested but PyTorch sees no CUDA GPU; use -device cpu")
    if name == "cpu":
        import multiprocessing

        torch.set_num_threads(multiprocessing.cpu_count())
    elif name == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    return torch.device(name)


def add_trainer_path() -> None:
    """Let nnU-Net find nnUNetTrainerOOD and its variants without an exported ``nnUNet_extTrainer``."""
    from nnunet_ood.ext_trainer import trainer_dir

    folders = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if trainer_dir() not in folders:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([*folders, trainer_dir()])


def locate_model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's ``Trainer__Plans__Configuration`` folder of a trained model, or a one-line error."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    try:
        model_folder = get_output_folder(dataset, trainer, plans, configuration)
    except (RuntimeError, KeyError, TypeError) as e:
        raise OODInputError(f"cannot locate the trained model for dataset {dataset} ({e}); check -d and "
                            "nnUNet_results") from None
    if not os.path.isdir(model_folder):
        raise OODInputError(f"no trained model in {model_folder}; check -d/-tr/-p/-c and nnUNet_results")
    return model_folder


