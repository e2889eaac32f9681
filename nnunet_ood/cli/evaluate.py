"""``nnUNetv2_evaluate_ood``: compare the OOD methods per shifted domain, as in the papers' tables."""

from __future__ import annotations

import argparse
import sys

from nnunet_ood.cli.common import one_line_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate the OOD scores of nnUNetv2_predict_ood against ground-truth labels: one row per "
                    "method and shifted domain with AUROC, FPR/TPR/detection error at the ID-validation threshold, "
                    "ESCE, Spearman(score, 1 - Dice), AURC, e-AURC and mean Dice. Each group is a prediction folder "
                    "(with ood_scores.csv) and the folder of its reference labels.")
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
    parser.add_argument("--threshold_percentile", type=float, default=95.0,
                        help="percentile of the ID validation scores used as threshold (default: 95)")
    return parser


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``nnUNetv2_evaluate_ood``."""
    args = build_parser().parse_args(argv)

    from nnunet_ood.evaluation import (
        EVALUATION_MD,
        build_group_specs,
        check_output_folder,
        evaluate,
        render_outputs,
        resolve_label_setup,
        write_outputs,
    )

    check_output_folder(args.o)
    specs = build_group_specs(args.id_test, args.id_val, args.domain)
    setup = resolve_label_setup(specs, args.labels, args.file_ending)
    evaluation = evaluate(specs, setup, args.methods, args.threshold_percentile)
    for warning in evaluation.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    files = render_outputs(evaluation)
    write_outputs(args.o, files)
    print(files[EVALUATION_MD].decode())
    print(f"evaluation written to {args.o}: {', '.join(files)}")


if __name__ == "__main__":
    main()
