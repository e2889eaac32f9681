"""``nnUNetv2_ood_trainer_dir``: print the folder to put in ``nnUNet_extTrainer`` (no torch, no nnU-Net: instant)."""

from __future__ import annotations

import argparse
import os

import nnunet_ood


def trainer_dir() -> str:
    """The ``ext`` folder next to :mod:`nnunet_ood.trainers`, found without importing that package."""
    return os.path.join(os.path.dirname(os.path.abspath(nnunet_ood.__file__)), "trainers", "ext")


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        description="Print the directory to export as nnUNet_extTrainer so that nnUNetv2_train and "
                    "nnUNetv2_predict find nnUNetTrainerOOD: export nnUNet_extTrainer=$(nnUNetv2_ood_trainer_dir)")


def main(argv: list[str] | None = None) -> None:
    """Print the ext-trainer folder, e.g. ``export nnUNet_extTrainer=$(nnUNetv2_ood_trainer_dir)``."""
    build_parser().parse_args(argv)
    print(trainer_dir())


if __name__ == "__main__":
    main()
