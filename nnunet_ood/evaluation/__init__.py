"""Evaluation: per-case Dice, the papers' metrics per method and domain, the plots and the summary.

:mod:`.metrics` (one definition per metric), :mod:`.table` (``nnUNetv2_evaluate_ood``'s reading, checks
and metric table), :mod:`.plots` and :mod:`.summary` (best methods and what their flags do per group).
"""

from nnunet_ood.evaluation.table import (
    EVALUATION_MD,
    Evaluation,
    build_group_specs,
    check_fail_below,
    check_output_folder,
    evaluate,
    format_markdown,
    render_outputs,
    resolve_label_setup,
    write_outputs,
)

__all__ = ["EVALUATION_MD", "Evaluation", "build_group_specs", "check_fail_below", "check_output_folder", "evaluate",
           "format_markdown", "render_outputs", "resolve_label_setup", "write_outputs"]
