"""Evaluation: per-case Dice, the papers' metrics per method and domain, the plots and the summary.

``nnUNetv2_evaluate_ood`` in the order it runs: :mod:`.groups` (the groups of cases and the result),
:mod:`.label_setup` (what to evaluate), :mod:`.score_tables` (each prediction folder's scores),
:mod:`.dice` (per-case Dice), :mod:`.metric_rows` (the table's rows, from :mod:`.metrics`, one definition per
metric, and :mod:`.decisions`), :mod:`.notes`, :mod:`.pipeline` (:func:`evaluate`: all of the above, writing
nothing), then :mod:`.outputs` (every file in memory, then written) with :mod:`.formatting` (the tables as text),
:mod:`.risk_coverage`, :mod:`.plots` and :mod:`.summary` (best methods and what their flags do per group).
"""

from nnunet_ood.evaluation.formatting import EVALUATION_MD, format_markdown
from nnunet_ood.evaluation.groups import Evaluation, build_group_specs
from nnunet_ood.evaluation.label_setup import resolve_label_setup
from nnunet_ood.evaluation.outputs import check_output_folder, render_outputs, write_outputs
from nnunet_ood.evaluation.pipeline import check_fail_below, evaluate

__all__ = ["EVALUATION_MD", "Evaluation", "build_group_specs", "check_fail_below", "check_output_folder", "evaluate",
           "format_markdown", "render_outputs", "resolve_label_setup", "write_outputs"]
