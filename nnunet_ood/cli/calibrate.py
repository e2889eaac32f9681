"""``nnUNetv2_calibrate_ood``: thresholds and normalisation from a site's own in-distribution images.

Predicts a folder of the site's ID images (no labels needed) with exactly the inference settings given
(the flags of ``nnUNetv2_predict_ood``), then stores per method the normalisation bounds and the
finite-sample threshold of their case scores as a named calibration in the model folder. Predict with
``nnUNetv2_predict_ood ... --calibration NAME`` and the same settings.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

from nnunet_ood.cli.children import guard_if_spawned_worker
from nnunet_ood.cli.common import one_line_errors
from nnunet_ood.cli.predict import add_prediction_arguments, check_arguments, check_model_and_folders
from nnunet_ood.errors import OODInputError

guard_if_spawned_worker()  # nnU-Net's spawned workers import this module: they die with the command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Calibrate the OOD thresholds on a site's own in-distribution images: predicts them with the "
                    "given inference settings and stores, per method, the normalisation and the threshold for the "
                    "false-alarm rate as a named calibration in the model folder. Use it with nnUNetv2_predict_ood "
                    "--calibration NAME and the same settings. Calibrate on new patients, not on the training "
                    "patients' other images.")
    add_prediction_arguments(p, output_required=False,
                             output_help="folder for the calibration cases' segmentations and score tables (default: "
                                         "a temporary folder, removed at the end)")
    p.add_argument("--name", default="site", help="name of the calibration (default: site)")
    p.add_argument("--false_alarm_rate", type=float, default=0.05,
                   help="share of in-distribution cases the ood flag may reject (default: 0.05); the threshold is the "
                        "ceil((n + 1)(1 - rate))-th smallest of the n calibration case scores")
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration of the same name")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``nnUNetv2_calibrate_ood``."""
    from nnunet_ood.folds import parse_folds
    from nnunet_ood.io.site_calibration import calibration_path, check_name

    args = build_parser().parse_args(argv)
    check_arguments(args)
    check_name(args.name)
    if not 0 < args.false_alarm_rate < 1:
        raise OODInputError(f"--false_alarm_rate must be in (0, 1), got {args.false_alarm_rate}")
    if args.num_parts > 1:
        raise OODInputError("the calibration cases are predicted in one run; drop -num_parts (or predict them in "
                            "parts with nnUNetv2_predict_ood and calibrate from a copy of the images on one machine)")
    folds = parse_folds(args.f)
    model_folder = check_model_and_folders(args, folds, [(args.i, args.o)], save_ood_maps=False)
    path = calibration_path(model_folder, args.name)
    if os.path.exists(path) and not args.overwrite:
        raise OODInputError(f"a calibration named {args.name} exists ({path}); pass --overwrite or choose --name")
    if args.o is not None:
        calibrate(args, model_folder, folds, args.o)
    else:
        with tempfile.TemporaryDirectory(prefix="nnunet_ood_calibration_") as work:
            calibrate(args, model_folder, folds, os.path.join(work, "predictions"))
    print(f"calibration {args.name} written to {path}; predict with nnUNetv2_predict_ood ... --calibration "
          f"{args.name} and the same -f, -chk, -step_size and mirroring")


def calibrate(args: argparse.Namespace, model_folder: str, folds: list, output: str) -> None:
    """Predict the calibration cases into ``output`` and store the calibration from their score table."""
    from nnunet_ood.calibration import min_cases_for
    from nnunet_ood.cli.predict import make_predictor, run_prediction
    from nnunet_ood.io.scores import read_score_csv
    from nnunet_ood.io.site_calibration import SiteCalibration, save_site_calibration

    predictor = make_predictor(args, model_folder, folds)
    run_prediction(predictor, args, args.i, output)
    case_scores: dict[str, dict[str, float]] = {m: {} for m in predictor.ood_methods}
    for row in read_score_csv(os.path.join(output, "ood_scores.csv")):
        case_scores[row["method"]][row["case"]] = row["score"]
    aggregations = {m: c.aggregation for m, c in predictor.ood_calibration.items()}
    site = SiteCalibration.from_scores(args.name, predictor.model_identity(), predictor.score_settings(),
                                       case_scores, aggregations, args.false_alarm_rate)
    save_site_calibration(model_folder, site)
    n = site.n_cases
    for method, c in site.calibration.items():
        unscored = sum(not math.isfinite(v) for v in case_scores[method].values())
        print(f"{method}: threshold {c.threshold:.4g} from {n} cases" + (f" ({unscored} unscored)" if unscored else "")
              + f", normalisation [{c.low:.4g}, {c.high:.4g}]")
    needed = min_cases_for(args.false_alarm_rate)
    if n < needed:
        print(f"warning: {n} calibration cases are too few for a false-alarm rate of {args.false_alarm_rate:g} "
              f"(needs {needed}): the thresholds are the largest scores and bound the rate by 1/{n + 1} only")


if __name__ == "__main__":
    main()
