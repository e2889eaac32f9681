"""``nnUNetv2_predict_ood``: ``nnUNetv2_predict`` with OOD scores (same flags and defaults, plus ``--ood``/maps)."""

from __future__ import annotations

import argparse
import os

from nnunet_ood.cli.children import guard_if_spawned_worker, guard_worker_processes
from nnunet_ood.cli.common import (
    DEVICE_HELP,
    add_trainer_path,
    check_device_name,
    locate_model_folder,
    one_line_errors,
    resolve_device,
)
from nnunet_ood.errors import OODError, OODInputError
from nnunet_ood.folds import parse_folds
from nnunet_ood.io.inputs import (
    check_checkpoint,
    check_images_for_model,
    check_map_collisions,
    check_output_folder,
    check_step_size,
    count_channels,
    input_cases,
)
from nnunet_ood.io.map_dtypes import MAP_DTYPES
from nnunet_ood.io.model_files import read_model_files
from nnunet_ood.io.site_calibration import check_name
from nnunet_ood.methods import REGISTRY
from nnunet_ood.reports.ranking import check_report_arguments, check_report_method

guard_if_spawned_worker()  # nnU-Net's spawned workers import this module: they die with the command


#: at most this many -npp/-nps processes (each imports torch; -nps 10000 exhausted the machine's memory)
MAX_PROCESSES = max(32, 4 * (os.cpu_count() or 1))


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def add_prediction_arguments(p: argparse.ArgumentParser, output_required: bool = True,
                             output_help: str = "output folder (created if missing)",
                             several_folders: bool = False) -> None:
    """Every flag of ``nnUNetv2_predict`` under the same name and default, plus ``--ood`` and the methods' options.

    ``several_folders``: ``-i`` and ``-o`` take paired lists of folders, predicted in one run with one model load.
    """
    nargs = "+" if several_folders else None
    p.add_argument("-i", required=True, nargs=nargs,
                   help="input folder (files named CASE_XXXX<ending>, as for nnUNetv2_predict)" +
                        ("; several folders are predicted in one run, each into the -o folder at its position"
                         if several_folders else ""))
    p.add_argument("-o", required=output_required, default=None, nargs=nargs, help=output_help)
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer used for training (default: nnUNetTrainer)")
    p.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    p.add_argument("-f", nargs="+", default=(0, 1, 2, 3, 4), help="folds to use (default: 0 1 2 3 4)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step size (default: 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring (feature scores and sd do not change: "
                   "they come from the un-mirrored pass)")
    p.add_argument("--verbose", action="store_true", help="talk a lot")
    p.add_argument("--save_probabilities", action="store_true", help="also export class probabilities (.npz)")
    p.add_argument("--continue_prediction", action="store_true",
                   help="continue an aborted run: skip cases whose segmentation, OOD record and maps exist")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint (default: checkpoint_final.pth)")
    p.add_argument("-npp", type=int, default=_env_int("nnUNet_npp", 3), help="preprocessing processes (default: 3)")
    p.add_argument("-nps", type=int, default=_env_int("nnUNet_nps", 3), help="export processes (default: 3); "
                   "-npp 0 -nps 0 runs sequentially without multiprocessing")
    p.add_argument("-prev_stage_predictions", default=None, help="previous stage predictions (cascade)")
    p.add_argument("-num_parts", type=int, default=1, help="number of parallel calls splitting the input "
                   "(default: 1)")
    p.add_argument("-part_id", type=int, default=0, help="which part this call is (0 .. num_parts-1)")
    p.add_argument("-device", default=None, help=DEVICE_HELP)
    p.add_argument("--disable_progress_bar", action="store_true", help="no progress bars")
    p.add_argument("--not_on_device", action="store_true", help="keep result arrays in CPU memory")
    p.add_argument("--ood", nargs="+", default=None, metavar="METHOD",
                   help="OOD methods to compute (default: every method fitted for the model, plus the fold-ensemble "
                        f"methods with several folds); known: {' '.join(REGISTRY.names)}")
    REGISTRY.add_config_arguments(p, "predict")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="nnUNetv2_predict plus out-of-distribution scores: writes the same segmentations and, in "
                    "the output folder, ood_scores.csv / ood_scores.json (and maps with --save_ood_maps).")
    add_prediction_arguments(p, output_help="output folder (created if missing); one per -i folder, in the same order",
                             several_folders=True)
    p.add_argument("--save_ood_maps", nargs="*", default=None, metavar="METHOD",
                   help="write one map per case and method, <case>_ood_<method>, in the input geometry (float32 "
                        "unless --ood_maps_dtype): of the methods named (e.g. --save_ood_maps mahalanobis), or of "
                        "every method with a map when none is named. Each float32 map of a 512 x 512 x 300 volume is "
                        "about 300 MB on disk before compression")
    p.add_argument("--ood_maps_dtype", choices=MAP_DTYPES, default="float32",
                   help="how maps are stored (default: float32). NIfTI has no float16, so the smaller types are "
                        "NIfTI (.nii/.nii.gz) integers with scl_slope/scl_inter, read back as floats by every "
                        "reader: int16 = the map, scaled per map from its min/max (error <= (max - min) / 131068); "
                        "uint8 = the normalised map in [0, 1] (the calibration bounds of ood_scores.csv's "
                        "normalized column; error <= 1/510)")
    p.add_argument("--calibration", default=None, metavar="NAME",
                   help="flag with the named calibration made by nnUNetv2_calibrate_ood on the site's own cases "
                        "(default: the folds' own calibration from the fit)")
    p.add_argument("--report", action="store_true",
                   help="also write review.html (with review_files/) and review.csv into each output folder: the "
                        "cases from least to most trustworthy with thumbnails of image, segmentation and uncertainty "
                        "map (maps need --save_ood_maps), scores and flags; no labels needed")
    p.add_argument("--report_method", default=None, metavar="METHOD",
                   help="rank review.html by this method's normalised score and show its map (default: by the "
                        "number of methods flagging a case, then the mean normalised score; the map of the method "
                        "with the highest normalised score)")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model is loaded (and before torch is imported)."""
    check_device_name(args.device)
    if not 0 < args.step_size <= 1:
        raise OODInputError(f"-step_size must be in (0, 1] (a fraction of the patch size), got {args.step_size}")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise OODInputError(f"-num_parts must be at least 1 and -part_id in 0..num_parts-1, got -num_parts "
                            f"{args.num_parts} -part_id {args.part_id}")
    if not (0 <= args.npp <= MAX_PROCESSES and 0 <= args.nps <= MAX_PROCESSES):
        raise OODInputError(f"-npp and -nps must be in 0..{MAX_PROCESSES} (worker processes; -npp 0 -nps 0 runs "
                            f"without workers), got -npp {args.npp} -nps {args.nps}")
    if args.nps == 0 and args.npp == 0 and args.num_parts > 1:
        raise OODInputError("-num_parts needs multiprocessing mode in nnU-Net; drop -npp 0 -nps 0")
    for name in args.ood or ():
        REGISTRY.get(name)
    if getattr(args, "calibration", None) is not None:
        check_name(args.calibration, "--calibration")
    for name in getattr(args, "save_ood_maps", None) or ():
        REGISTRY.get(name)
    if getattr(args, "ood_maps_dtype", "float32") != "float32" and getattr(args, "save_ood_maps", None) is None:
        raise OODInputError(f"--ood_maps_dtype {args.ood_maps_dtype} sets how maps are stored but no maps are "
                            "written; add --save_ood_maps")
    check_report_arguments(getattr(args, "report", False), getattr(args, "report_method", None), REGISTRY.names)


def folder_pairs(inputs: list[str], outputs: list[str]) -> list[tuple[str, str]]:
    """``-i`` and ``-o`` of ``nnUNetv2_predict_ood`` as (input, output) pairs; outputs must be distinct."""
    if len(inputs) != len(outputs):
        raise OODInputError(f"-i has {len(inputs)} folder(s) but -o has {len(outputs)}; give one output folder per "
                            "input folder, in the same order")
    real = [os.path.realpath(o) for o in outputs]
    for k, out in enumerate(real):
        if out in real[:k]:
            raise OODInputError(f"output folder {outputs[k]} is given twice in -o; each input folder needs its own "
                                "output folder")
        if out in {os.path.realpath(i) for j, i in enumerate(inputs) if j != k}:  # its own: check_output_folder
            raise OODInputError(f"output folder {outputs[k]} is one of the input folders; write predictions to "
                                "another -o (nnU-Net would mix its outputs with the inputs)")
    return list(zip(inputs, outputs))


def check_model_and_folders(args: argparse.Namespace, folds: list, pairs: list[tuple[str, str | None]],
                            save_ood_maps: bool | list[str]) -> str:
    """The model's folds, the input images and output folder of each (input, output) pair; returns the model
    folder."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, join

    model_folder = locate_model_folder(args.d, args.tr, args.p, args.c)
    for fold in folds:
        if not isfile(join(model_folder, f"fold_{fold}", args.chk)):
            raise OODInputError(f"fold {fold} has no {args.chk} in {model_folder}; choose folds with -f")
        check_checkpoint(join(model_folder, f"fold_{fold}", args.chk))
    dataset_json, plans = read_model_files(model_folder, args.c)  # checked: one-line errors for damaged files
    check_step_size(args.step_size, plans, args.c)
    num_channels = count_channels(dataset_json)
    for input_folder, output in pairs:
        cases = input_cases(input_folder, dataset_json["file_ending"], num_channels)
        if output is not None:
            check_output_folder(output, input_folder)
        if save_ood_maps:
            check_map_collisions(cases, REGISTRY.names if save_ood_maps is True else save_ood_maps)
        check_images_for_model(cases, plans, args.c, num_channels)
    return model_folder


def make_predictor(args: argparse.Namespace, model_folder: str, folds: list, save_ood_maps: bool | list[str] = False,
                   calibration: str | None = None):
    """An nnUNetOODPredictor with the command's settings, its folds and OOD state loaded."""
    guard_worker_processes()
    add_trainer_path()
    from nnunet_ood.inference.predictor import nnUNetOODPredictor

    device = resolve_device(args.device)
    predictor = nnUNetOODPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                   use_mirroring=not args.disable_tta,
                                   perform_everything_on_device=not args.not_on_device, device=device,
                                   verbose=args.verbose, verbose_preprocessing=args.verbose,
                                   allow_tqdm=not args.disable_progress_bar, ood_methods=args.ood,
                                   save_ood_maps=save_ood_maps, calibration=calibration,
                                   ood_maps_dtype=getattr(args, "ood_maps_dtype", "float32"),
                                   predict_options=REGISTRY.configs_from_args(args, "predict"))
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    return predictor


def run_prediction(predictor, args: argparse.Namespace, input_folder: str, output: str) -> None:
    """nnU-Net's prediction of the files in ``input_folder`` into ``output`` (sequential with ``-npp 0 -nps 0``);
    a case that fails inside nnU-Net is named, and the score tables of the cases done are written."""
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise OODInputError(f"cannot create output folder {output} ({e.strerror}); choose a writable -o") from None
    try:
        if args.nps == 0 and args.npp == 0:
            print("Running in non-multiprocessing mode")
            predictor.predict_from_files_sequential(input_folder, output, save_probabilities=args.save_probabilities,
                                                    overwrite=not args.continue_prediction,
                                                    folder_with_segs_from_prev_stage=args.prev_stage_predictions)
        else:
            predictor.predict_from_files(input_folder, output, save_probabilities=args.save_probabilities,
                                         overwrite=not args.continue_prediction,
                                         num_processes_preprocessing=max(1, args.npp),
                                         num_processes_segmentation_export=max(1, args.nps),
                                         folder_with_segs_from_prev_stage=args.prev_stage_predictions,
                                         num_parts=args.num_parts, part_id=args.part_id)
    except OODError:
        raise
    except Exception as e:
        case = predictor.outputs.unfinished_case
        if case is None:
            raise
        raise OODInputError(f"prediction stopped at case {case} ({type(e).__name__}: {' '.join(str(e).split())[:200]});"
                            f" the score tables list the cases done; fix or remove {case} and re-run with "
                            "--continue_prediction") from e


def write_review_report(input_folder: str, output: str, method: str | None) -> None:
    """``review.html``/``review.csv`` of one output folder, from the files the prediction wrote."""
    from nnunet_ood.io.folder_lock import folder_lock
    from nnunet_ood.reports.review import write_review

    with folder_lock(output):  # -num_parts runs each rewrite the folder's report: one at a time
        page, _ = write_review(input_folder, output, method)
    print(f"review: {page} (open it in a web browser; it works offline)")


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``nnUNetv2_predict_ood``."""
    args = build_parser().parse_args(argv)
    check_arguments(args)
    folds = parse_folds(args.f)
    pairs = folder_pairs(args.i, args.o)
    maps = False if args.save_ood_maps is None else (args.save_ood_maps or True)  # bare flag: every method's map
    model_folder = check_model_and_folders(args, folds, pairs, maps)
    predictor = make_predictor(args, model_folder, folds, maps, args.calibration)
    check_report_method(args.report_method, predictor.ood_methods)  # before any case is predicted
    for input_folder, output in pairs:  # one model load for every folder
        done = len(predictor.ood_results)
        run_prediction(predictor, args, input_folder, output)
        results = predictor.ood_results[done:]
        flagged = sum(1 for r in results for s in r.scores.values() if s["ood"])
        print(f"OOD: {len(results)} case(s) of {input_folder} scored in this run, {flagged} method flag(s) raised; "
              f"see {os.path.join(output, 'ood_scores.csv')}")
        if args.report:
            write_review_report(input_folder, output, args.report_method)


if __name__ == "__main__":
    main()
