"""``nnUNetv2_ood_trainer_dir``: print the folder to put in ``nnUNet_extTrainer`` (no torch, no nnU-Net: instant)."""

from __future__ import annotations

import argparse

from nnunet_ood.ext_trainer import trainer_dir


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
