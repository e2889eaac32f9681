"""``nnUNetv2_ood_trainer_dir``: print the folder to put in ``nnUNet_extTrainer``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    """Print the ext-trainer folder, e.g. ``export nnUNet_extTrainer=$(nnUNetv2_ood_trainer_dir)``."""
    argparse.ArgumentParser(
        description="Print the directory to export as nnUNet_extTrainer so that nnUNetv2_train and "
                    "nnUNetv2_predict find nnUNetTrainerOOD: export nnUNet_extTrainer=$(nnUNetv2_ood_trainer_dir)"
    ).parse_args(argv)
    from nnunet_ood.trainers import EXT_TRAINER_DIR

    print(EXT_TRAINER_DIR)


if __name__ == "__main__":
    main()
