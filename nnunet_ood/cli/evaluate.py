"""``nnUNetv2_evaluate_ood``: compare the OOD methods per shifted domain, as in the papers' tables."""

from __future__ import annotations

import argparse
import sys

from nnunet_ood.cli.common import one_line_errors
from nnunet_ood.evaluation.groups import FAILURE_DICE  # light: numpy, no torch or nnU-Net
from nnunet_ood.methods.options import Range

#: the values of the numeric flags (checked when parsing): a percentile, a Dice, a number of cases shown (a cap)
PERCENTILE = Range(0, 100, open_low=True)
FAIL_BELOW = Range(0, 1, open_low=True)
REPORT_CASES = Range(1, 10_000, integer=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate the OOD scores of nnUNetv2_predict_ood against ground-truth labels: one row per "
                    "method and shifted domain with AUROC, FPR/TPR/detection error at the ID-validation threshold, "
                    "ESCE, Spearman(score, 1 - Dice), AURC, e-AURC and mean Dice, plus what each method's "
                    "prediction-time accept/review flag did (coverage, silent-failure rates) and, for methods that "
                    "predict the Dice, that prediction's error; an id_test row per method. Each group is a "
                    "prediction folder (with ood_scores.csv) and the folder of its reference labels.")
    parser.add_argument("--id_test", nargs=2, required=True, metavar=("PRED_FOLDER", "LABEL_FOLDER"),
                        help="in-distribution test cases (the negatives of the AUROC)")
    parser.add_argument("--id_val", nargs=2, default=None, metavar=("PRED_FOLDER", "LABEL_FOLDER"),
                        help="in-distribution validation cases; their --threshold_percentile-th score percentile is "
                             "the threshold of FPR, TPR and detection error (without it those are undefined)")
    parser.add_argument("--domain", nargs=3, action="append", required=True,
                        metavar=("NAME", "PRED_FOLDER", "LABEL_FOLDER"),
                        help="a shifted domain (positives); repeat for several domains")
    parser.add_argument("-o", required=True, metavar="OUTPUT_FOLDER",
                        help="folder for ood_evaluation.csv/.md, ood_cases.csv and the plots (created if needed)")
    parser.add_argument("--file_ending", default=None,
                        help="file ending of segmentations and labels (default: from dataset.json of the "
                             "prediction folder)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="foreground labels to evaluate, a region as comma-separated labels like 1,2 (default: "
                             "the labels or regions of dataset.json)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="methods to evaluate; each must be in every folder (default: the methods present in "
                             "every folder)")
    parser.add_argument("--threshold_percentile", type=PERCENTILE.parser("--threshold_percentile"), default=95.0,
                        help=f"percentile of the ID validation scores used as threshold (default: 95; {PERCENTILE})")
    parser.add_argument("--fail_below", type=FAIL_BELOW.parser("--fail_below"), default=FAILURE_DICE, metavar="DICE",
                        help="a segmentation with a Dice below this is a failure: the silent-failure rates, the "
                             "failure counts of the summary and the report's silent failures (default: "
                             f"{FAILURE_DICE:g}; {FAIL_BELOW})")
    parser.add_argument("--images", nargs=2, action="append", default=None, metavar=("GROUP", "IMAGE_FOLDER"),
                        help="input images (CASE_0000<ending>) of a group (id_test, id_val or a domain's name) for "
                             "report.html's thumbnails; repeat per group (default: the images* folder next to the "
                             "group's labels* folder, as in nnU-Net's raw data, e.g. imagesTs next to labelsTs)")
    parser.add_argument("--no_report", action="store_true",
                        help="do not write report.html and report_files/ (the page with the headline, the tables, "
                             "the plots and thumbnails of the silent failures and most uncertain cases)")
    parser.add_argument("--report_cases", type=REPORT_CASES.parser("--report_cases"), default=12, metavar="N",
                        help="report.html shows at most N silent failures and the N most uncertain cases "
                             f"(default: 12; {REPORT_CASES})")
    return parser


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``nnUNetv2_evaluate_ood``."""
    args = build_parser().parse_args(argv)

    from nnunet_ood.evaluation import (
        build_group_specs,
        check_fail_below,
        check_output_folder,
        evaluate,
        format_markdown,
        render_outputs,
        resolve_label_setup,
        write_outputs,
    )
    from nnunet_ood.reports.evaluation_report import check_gallery_size, write_evaluation_report
    from nnunet_ood.reports.image_sources import resolve_image_sources

    check_output_folder(args.o)
    check_gallery_size(args.report_cases)
    check_fail_below(args.fail_below)
    specs = build_group_specs(args.id_test, args.id_val, args.domain)
    image_sources = resolve_image_sources(specs, args.images)  # checked before any work, like the other folders
    setup = resolve_label_setup(specs, args.labels, args.file_ending)
    evaluation = evaluate(specs, setup, args.methods, args.threshold_percentile, args.fail_below)
    for warning in evaluation.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    files = render_outputs(evaluation)
    write_outputs(args.o, files)
    print(format_markdown(evaluation.rows, evaluation.console_notes))  # the warnings above are not repeated
    print(f"evaluation written to {args.o}: {', '.join(files)}")
    if not args.no_report:
        page = write_evaluation_report(args.o, evaluation, setup, image_sources, list(files), args.report_cases)
        print(f"report: {page} (open it in a web browser; it works offline)")


if __name__ == "__main__":
    main()
