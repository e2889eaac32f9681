"""Shared pieces of the command-line entry points: device choice and one-line errors."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from nnunet_ood.errors import OODError, OODInputError

F = TypeVar("F", bound=Callable[..., object])


def default_device() -> str:
    """nnU-Net defaults to ``cuda``; we fall back to ``cpu`` where no GPU exists instead of crashing."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str) -> torch.device:
    """Turn ``-device cpu|cuda|mps`` into a torch device and set threads the way nnU-Net's CLI does."""
    if name not in ("cpu", "cuda", "mps"):
        raise OODInputError(f"-device must be cpu, cuda or mps, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise OODInputError("-device cuda was requested but PyTorch sees no CUDA GPU; use -device cpu")
    if name == "cpu":
        import multiprocessing

        torch.set_num_threads(multiprocessing.cpu_count())
    elif name == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    return torch.device(name)


def parse_folds(values: list) -> list[int | str]:
    """Turn ``-f`` values into nnU-Net fold identifiers (integers or ``'all'``), with a one-line error."""
    try:
        return [v if v == "all" else int(v) for v in values]
    except ValueError:
        raise OODInputError(f"-f takes fold numbers or 'all', got {' '.join(map(str, values))}") from None


def locate_model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's ``Trainer__Plans__Configuration`` folder of a trained model, or a one-line error."""
    from batchgenerators.utilities.file_and_folder_operations import isdir
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    try:
        model_folder = get_output_folder(dataset, trainer, plans, configuration)
    except (RuntimeError, KeyError, TypeError) as e:
        raise OODInputError(f"cannot locate the trained model for dataset {dataset} ({e}); check -d and "
                            "nnUNet_results") from None
    if not isdir(model_folder):
        raise OODInputError(f"no trained model in {model_folder}; check -d/-tr/-p/-c and nnUNet_results")
    return model_folder


def one_line_errors(main: F) -> F:
    """Run a CLI main so that bad input ends with ``error: <one line>`` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except OODError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
