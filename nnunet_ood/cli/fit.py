"""``nnUNetv2_fit_ood``: fit OOD detectors post hoc for an already trained nnU-Net model (any trainer)."""

from __future__ import annotations

import argparse
import os

from nnunet_ood.cli.common import DEVICE_HELP, check_device_name, locate_model_folder, one_line_errors
from nnunet_ood.io.inputs import check_checkpoint
from nnunet_ood.io.model_files import read_model_files


def build_parser() -> argparse.ArgumentParser:
    from nnunet_ood.fitting.options import FitOptions

    parser = argparse.ArgumentParser(
        description="Fit the OOD detectors of trained nnU-Net folds from each fold's own training cases and "
                    "store them in fold_X/ood. Works for models of any trainer, including stock nnUNetTrainer.")
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"],
                        help="folds to fit (default: 0 1 2 3 4); 'all' for a fold_all model")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer the model was trained with "
                        "(default: nnUNetTrainer)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint to fit on "
                        "(default: checkpoint_final.pth); predict with the same -chk")
    parser.add_argument("-device", default=None, help=DEVICE_HELP)
    parser.add_argument("--disable_progress_bar", action="store_true", help="no progress bars (for HPC logs)")
    FitOptions.add_arguments(parser)
    return parser


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``nnUNetv2_fit_ood``."""
    from nnunet_ood.fitting.options import FitOptions
    from nnunet_ood.folds import parse_folds

    args = build_parser().parse_args(argv)
    check_device_name(args.device)
    folds = parse_folds(args.f)
    options = FitOptions.from_args(args)  # every argument is checked before the heavy imports

    import dataclasses

    from nnunet_ood.cli.common import add_trainer_path, resolve_device
    from nnunet_ood.fitting import fit_fold

    add_trainer_path()
    options = dataclasses.replace(options, device=resolve_device(args.device))
    model_folder = locate_model_folder(args.d, args.tr, args.p, args.c)
    read_model_files(model_folder, args.c)  # damaged plans.json/dataset.json: one line before anything loads
    for fold in folds:  # every checkpoint before the first fold's fit
        check_checkpoint(os.path.join(model_folder, f"fold_{fold}", args.chk))
    for fold in folds:
        fit_fold(model_folder, fold, options)


if __name__ == "__main__":
    main()
