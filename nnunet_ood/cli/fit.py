"""``nnUNetv2_fit_ood``: fit OOD detectors post hoc for an already trained nnU-Net model (any trainer)."""

from __future__ import annotations

import argparse

from nnunet_ood.cli.common import default_device, locate_model_folder, one_line_errors, parse_folds, resolve_device


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("-device", default=default_device(),
                        help="cpu, cuda or mps (default: cuda if available, else cpu)")
    parser.add_argument("--ood", nargs="+", default=None, metavar="METHOD",
                        help="methods to fit (default: all available: mahalanobis)")
    parser.add_argument("--calibration_parts", type=int, default=5,
                        help="training scores for the normalisation are cross-fitted over this many parts of the "
                             "training cases (default: 5; 1 = in-sample, as in the paper; memory grows with it)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--disable_progress_bar", action="store_true", help="no progress bars (for HPC logs)")
    return parser


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``nnUNetv2_fit_ood``."""
    args = build_parser().parse_args(argv)

    from nnunet_ood.errors import OODInputError
    from nnunet_ood.fitting import FITTABLE_METHODS, fit_fold

    methods = args.ood or list(FITTABLE_METHODS)
    unknown = [m for m in methods if m not in FITTABLE_METHODS]
    if unknown:
        raise OODInputError(f"cannot fit {', '.join(unknown)}: fittable methods are {', '.join(FITTABLE_METHODS)}")
    folds = parse_folds(args.f)
    if args.calibration_parts < 1:
        raise OODInputError(f"--calibration_parts must be at least 1, got {args.calibration_parts}")
    device = resolve_device(args.device)
    model_folder = locate_model_folder(args.d, args.tr, args.p, args.c)
    for fold in folds:
        fit_fold(model_folder, fold, args.chk, methods, device=device, seed=args.seed,
                 progress=not args.disable_progress_bar, calibration_parts=args.calibration_parts)


if __name__ == "__main__":
    main()
