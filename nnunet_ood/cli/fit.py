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
                        help="methods to fit (default: all: mahalanobis knn sd latent_mahalanobis max_softmax "
                             "entropy energy kl_uniform temperature tta; mc_dropout only when named, it "
                             "multiplies inference cost); sd and "
                             "latent_mahalanobis share one autoencoder and are always fitted together. Methods "
                             "fitted earlier and not named here are kept")
    parser.add_argument("--calibration_parts", type=int, default=5,
                        help="training scores for the normalisation are cross-fitted over this many parts of the "
                             "training cases (default: 5; 1 = in-sample, as in the paper; memory grows with it)")
    sd = parser.add_argument_group("Segmentation Distortion autoencoder (sd, latent_mahalanobis)")
    sd.add_argument("--sd_latent", type=int, default=128, help="size of the dense latent (default: 128, the "
                    "paper's value for the heart task; 64 for brain)")
    sd.add_argument("--sd_channels", type=int, default=None,
                    help="channels of the AE's convolutions (default: min(bottleneck channels, 128))")
    sd.add_argument("--sd_lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    sd.add_argument("--sd_batch_size", type=int, default=None,
                    help="patches per step (default: the configuration's batch size)")
    sd.add_argument("--sd_iterations", type=int, default=250, help="training steps per epoch (default: 250)")
    sd.add_argument("--sd_max_epochs", type=int, default=100, help="at most this many epochs (default: 100)")
    sd.add_argument("--sd_patience", type=int, default=10,
                    help="stop after this many epochs without a lower validation loss (default: 10)")
    sd.add_argument("--sd_val_batches", type=int, default=10,
                    help="fixed validation batches evaluated after each epoch (default: 10)")
    parser.add_argument("--knn_k", type=int, default=1,
                        help="knn: distance to the k-th nearest training patch feature (default: 1)")
    parser.add_argument("--knn_bank", type=int, default=50_000,
                        help="knn: at most this many training patch features are kept, a uniform random sample "
                             "(default: 50000; memory 4 bytes x D per row)")
    mc = parser.add_argument_group("MC dropout (mc_dropout, off unless named in --ood)")
    mc.add_argument("--mc_dropout_rate", type=float, default=0.1, help="dropout rate (default: 0.1)")
    mc.add_argument("--mc_dropout_passes", type=int, default=10,
                    help="forward passes with dropout per patch (default: 10)")
    mc.add_argument("--mc_dropout_stages", type=int, nargs="+", default=None,
                    help="decoder stages (0 = lowest resolution) whose input gets dropout (default: all)")
    parser.add_argument("--ood_aggregation", nargs="+", default=[], metavar="METHOD=HOW",
                        help="how a method's voxel map becomes its case score: mean (default, METHODS.md), "
                             "foreground_mean (over nnU-Net's predicted foreground) or max_patch (largest patch "
                             "mean), e.g. entropy=foreground_mean mahalanobis=max_patch; fixed at fit time")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--disable_progress_bar", action="store_true", help="no progress bars (for HPC logs)")
    return parser


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``nnUNetv2_fit_ood``."""
    args = build_parser().parse_args(argv)

    from nnunet_ood.errors import OODInputError
    from nnunet_ood.fitting import fit_fold
    from nnunet_ood.mc_dropout import MCDropoutConfig
    from nnunet_ood.methods import DEFAULT_FIT_METHODS, resolve_fit_methods
    from nnunet_ood.sd_training import SDTrainingConfig

    methods = resolve_fit_methods(args.ood or DEFAULT_FIT_METHODS)
    mc_config = MCDropoutConfig(rate=args.mc_dropout_rate, passes=args.mc_dropout_passes,
                                stages=args.mc_dropout_stages, seed=args.seed)
    sd_config = SDTrainingConfig(latent_dim=args.sd_latent, hidden_channels=args.sd_channels,
                                 learning_rate=args.sd_lr, batch_size=args.sd_batch_size,
                                 iterations_per_epoch=args.sd_iterations, max_epochs=args.sd_max_epochs,
                                 patience=args.sd_patience, val_batches=args.sd_val_batches)
    pairs = [item.split("=", 1) for item in args.ood_aggregation]
    if any(len(p) != 2 for p in pairs):
        raise OODInputError(f"--ood_aggregation takes METHOD=HOW pairs, got {' '.join(args.ood_aggregation)}")
    aggregations = dict(pairs)
    if args.knn_k < 1 or args.knn_bank < args.knn_k:
        raise OODInputError(f"--knn_k must be at least 1 and --knn_bank at least --knn_k, got {args.knn_k} and "
                            f"{args.knn_bank}")
    if args.sd_batch_size is not None and args.sd_batch_size < 1:
        raise OODInputError(f"--sd_batch_size must be at least 1, got {args.sd_batch_size}")
    folds = parse_folds(args.f)
    if args.calibration_parts < 1:
        raise OODInputError(f"--calibration_parts must be at least 1, got {args.calibration_parts}")
    device = resolve_device(args.device)
    model_folder = locate_model_folder(args.d, args.tr, args.p, args.c)
    for fold in folds:
        fit_fold(model_folder, fold, args.chk, methods, device=device, seed=args.seed,
                 progress=not args.disable_progress_bar, calibration_parts=args.calibration_parts,
                 sd_config=sd_config, knn_k=args.knn_k, knn_bank=args.knn_bank, aggregations=aggregations,
                 mc_dropout_config=mc_config)


if __name__ == "__main__":
    main()
