"""``nnUNetv2_calibrate_ood``: thresholds and normalisation from a site's own in-distribution images.

Predicts a folder of the site's ID images (no labels needed) with exactly the inference settings given
(the flags of ``nnUNetv2_predict_ood``), then stores per method the normalisation bounds and the
finite-sample threshold of their case scores as a named calibration in the model folder. Predict with
``nnUNetv2_predict_ood ... --calibration NAME`` and the same settings.

Methods that predict Dice (``Method.predicts_dice``, found through the registry) decide accept/review: with ``-l``
this command computes each case's Dice against the labels and the method object chooses its threshold
(``Method.labelled_calibration``, with the flags it added by ``Method.add_labelled_calibration_arguments``); the
command knows none of them by name.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Any

from nnunet_ood.cli.children import guard_if_spawned_worker
from nnunet_ood.cli.common import one_line_errors
from nnunet_ood.cli.predict import add_prediction_arguments, check_arguments, check_model_and_folders
from nnunet_ood.errors import OODInputError
from nnunet_ood.methods import REGISTRY
from nnunet_ood.methods.options import Range

guard_if_spawned_worker()  # nnU-Net's spawned workers import this module: they die with the command


#: what --false_alarm_rate takes: a share of the in-distribution cases, neither none nor all
FALSE_ALARM_RATE = Range(0, 1, open_low=True, open_high=True)


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
    p.add_argument("--false_alarm_rate", type=FALSE_ALARM_RATE.parser("--false_alarm_rate"), default=0.05,
                   help="share of in-distribution cases the ood flag may reject (default: 0.05; "
                        f"{FALSE_ALARM_RATE}); the threshold is the ceil((n + 1)(1 - rate))-th smallest of the n "
                        "calibration case scores")
    p.add_argument("-l", dest="labels", default=None, metavar="LABELS_FOLDER",
                   help="reference segmentations of the calibration cases (nnU-Net naming: CASE + file ending). With "
                        "them, methods that predict Dice (quality) get their accept/review threshold re-selected by "
                        "conformal risk control on these cases, so that the guarantee covers this site's data; "
                        "without them they keep the fit's threshold")
    # methods that predict Dice add the flags of their rule (quality: --fail_below, --max_silent_failures, ...)
    p.set_defaults(labelled_settings={m.name: m.add_labelled_calibration_arguments(p) for m in REGISTRY
                                      if m.predicts_dice})
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
    if args.num_parts > 1:
        raise OODInputError("the calibration cases are predicted in one run; drop -num_parts (or predict them in "
                            "parts with nnUNetv2_predict_ood and calibrate from a copy of the images on one machine)")
    rule_flags = [f"--{k}" for keys in args.labelled_settings.values() for k in keys if getattr(args, k) is not None]
    if args.labels is None and rule_flags:
        raise OODInputError(f"{', '.join(rule_flags)} re-select the accept/review threshold on labelled cases; give "
                            "the labels with -l LABELS_FOLDER")
    folds = parse_folds(args.f)
    model_folder = check_model_and_folders(args, folds, [(args.i, args.o)], save_ood_maps=False)
    if args.labels is not None:
        check_label_files(args, model_folder)
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
    from nnunet_ood.io.score_reader import read_score_rows
    from nnunet_ood.io.site_calibration import SiteCalibration, save_site_calibration

    predictor = make_predictor(args, model_folder, folds)
    run_prediction(predictor, args, args.i, output)
    case_scores: dict[str, dict[str, float]] = {m: {} for m in predictor.ood_methods}
    cases = _input_images(args.i, predictor.dataset_json["file_ending"])
    for row in read_score_rows(output):
        if row["case"] in cases:  # -o may hold earlier cases of the same settings: only -i's calibrate
            case_scores[row["method"]][row["case"]] = row["score"]
    aggregations = {m: c.aggregation for m, c in predictor.ood_calibration.items()}
    site = SiteCalibration.from_scores(args.name, predictor.model_identity(), predictor.score_settings(),
                                       case_scores, aggregations, args.false_alarm_rate)
    deciding = [m for m in predictor.ood_methods if REGISTRY.get(m).predicts_dice]
    for m in deciding:
        if args.labels is None:  # their threshold needs failures, i.e. labels: the fit's stays in force
            del site.calibration[m]
            print(f"{m}: keeps the fit's accept/review threshold (re-select it on this site's cases with -l LABELS)")
        else:
            site.calibration[m], site.labelled[m] = labelled_threshold(args, predictor, m, case_scores[m], output)
    save_site_calibration(model_folder, site)
    for method in deciding:  # what the decision now guarantees, in the words predict and the pages use
        fold_params = [state.method_params.get(method, {}) for state in predictor.ood_states]
        rule = REGISTRY.get(method).decision_rule(fold_params, predictor.ood_methods, site, args.name)
        if rule is not None:
            print(f"{method}: {rule.statement()}")
    n = site.n_cases
    for method, c in site.calibration.items():
        if method in deciding:
            continue
        unscored = sum(not math.isfinite(v) for v in case_scores[method].values())
        print(f"{method}: threshold {c.threshold:.4g} from {n} cases" + (f" ({unscored} unscored)" if unscored else "")
              + f", normalisation [{c.low:.4g}, {c.high:.4g}]")
    needed = min_cases_for(args.false_alarm_rate)
    if n < needed:
        print(f"warning: {n} calibration cases are too few for a false-alarm rate of {args.false_alarm_rate:g} "
              f"(needs {needed}): the thresholds are the largest scores and bound the rate by 1/{n + 1} only")



def _input_images(folder: str, file_ending: str) -> dict[str, str]:
    """The cases of an input folder (nnU-Net's naming) and the file of each one's first channel."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    return {os.path.basename(files[0])[:-(len(file_ending) + 5)]: files[0]
            for files in create_lists_from_splitted_dataset_folder(folder, file_ending)}


def _label_file(args: argparse.Namespace, case: str, file_ending: str) -> str:
    return os.path.join(args.labels, case + file_ending)


def check_label_files(args: argparse.Namespace, model_folder: str) -> None:
    """Every calibration case needs its reference segmentation in ``-l``, holding only the dataset's label values
    (checked before predicting)."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json

    from nnunet_ood.evaluation.dice import make_reader
    from nnunet_ood.io.inputs import check_reference_sizes
    from nnunet_ood.io.labels import check_references, dataset_label_values

    if not os.path.isdir(args.labels):
        raise OODInputError(f"-l {args.labels} is not a folder; give the folder of the calibration cases' reference "
                            "segmentations")
    dataset_json = load_json(join(model_folder, "dataset.json"))
    ending = dataset_json["file_ending"]
    images = _input_images(args.i, ending)
    cases = list(images)
    missing = [c for c in cases if not os.path.isfile(_label_file(args, c, ending))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise OODInputError(f"-l {args.labels} has no reference segmentation for {shown} (expected "
                            f"{missing[0]}{ending}); add them or remove those images from -i")
    files = [_label_file(args, c, ending) for c in cases]
    plans = load_json(join(model_folder, "plans.json"))
    check_reference_sizes({c: (images[c], f) for c, f in zip(cases, files)}, plans.get("image_reader_writer"))
    check_references(files, make_reader(ending, files[0]), dataset_label_values(dataset_json["labels"]),
                     f"the model's dataset.json ({join(model_folder, 'dataset.json')})")


def labelled_threshold(args: argparse.Namespace, predictor: Any, method: str, risks: dict[str, float],
                       output: str) -> tuple[Any, dict[str, Any]]:
    """``(calibration, what the labelled rule records)``: the accept/review threshold of ``method`` chosen on the
    labelled calibration cases by the method object (:meth:`~nnunet_ood.methods.base.Method.labelled_calibration`;
    quality: :func:`nnunet_ood.quality.risk_control.choose_threshold`, the fit's function) from their case scores
    and the Dice of the segmentations just written against ``-l``."""
    from nnunet_ood.evaluation.dice import case_dice, make_reader

    ending = predictor.dataset_json["file_ending"]
    manager = predictor.label_manager
    classes = list(manager.foreground_regions) if manager.has_regions else list(manager.foreground_labels)
    cases = sorted(risks)
    reader = make_reader(ending, _label_file(args, cases[0], ending))
    dice = {c: case_dice(_label_file(args, c, ending), os.path.join(output, c + ending), reader, classes,
                         manager.ignore_label) for c in cases}
    fold_params = [state.method_params.get(method, {}) for state in predictor.ood_states]
    settings = {k: getattr(args, k) for k in args.labelled_settings[method]}
    return REGISTRY.get(method).labelled_calibration(fold_params, risks, dice, settings)


if __name__ == "__main__":
    main()
