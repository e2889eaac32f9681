"""Per-case Dice of ``nnUNetv2_evaluate_ood``: the segmentation and reference file of every case, the label
values in the references, nnU-Net's reader and its ``compute_metrics``, and a group's aligned arrays."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnunet_ood.errors import OODInputError
from nnunet_ood.evaluation.groups import PREDICT_COMMAND, Group, GroupSpec, short_list
from nnunet_ood.evaluation.label_setup import LabelSetup
from nnunet_ood.evaluation.score_tables import ScoreTable
from nnunet_ood.io.labels import LabelOrRegion, check_references
from nnunet_ood.io.scores import CSV_NAME


def check_case_files(spec: GroupSpec, cases: Sequence[str], file_ending: str) -> None:
    """Every case needs a segmentation in the prediction folder and a reference label file in the label folder."""
    no_reference = [c for c in cases if not os.path.isfile(os.path.join(spec.label_folder, c + file_ending))]
    if len(no_reference) == len(cases):
        raise OODInputError(
            f"label folder {spec.label_folder} of {spec.name} contains none of its {len(cases)} case(s) "
            f"({short_list(list(cases))}, as <case>{file_ending}); pass the folder with these cases' reference "
            "labels (e.g. labelsTs) or check --file_ending")
    no_prediction = [c for c in cases if not os.path.isfile(os.path.join(spec.prediction_folder, c + file_ending))]
    if no_prediction:
        raise OODInputError(
            f"case(s) {short_list(no_prediction)} of {spec.name} are in {CSV_NAME} but have no segmentation "
            f"<case>{file_ending} in {spec.prediction_folder}; re-run {PREDICT_COMMAND} into that folder")
    if no_reference:
        raise OODInputError(
            f"case(s) {short_list(no_reference)} of {spec.name} have no reference label file <case>{file_ending} "
            f"in {spec.label_folder}; add their labels or predict without them")


def check_reference_labels(specs: Sequence[GroupSpec], tables: Sequence[ScoreTable], setup: LabelSetup,
                           reader: Any) -> None:
    """Every reference holds only the dataset's label values; without a dataset.json, every ``--labels`` value
    occurs in some reference (a Dice of labels that are absent everywhere is 1 and says nothing)."""
    paths = [os.path.join(s.label_folder, c + setup.file_ending) for s, t in zip(specs, tables) for c in t.cases]
    found = check_references(paths, reader, None if setup.label_values is None else set(setup.label_values),
                             setup.label_source)
    if setup.label_values is None:
        seen = set().union(*found.values())
        members = {m for item in setup.labels_or_regions for m in (item if isinstance(item, tuple) else (item,))}
        absent = sorted(m for m in members if float(m) not in seen)
        if absent:
            raise OODInputError(f"--labels value(s) {', '.join(map(str, absent))} occur in none of the {len(paths)} "
                                f"reference segmentations (their values: "
                                f"{', '.join(f'{v:g}' for v in sorted(seen))}); pass existing labels")


def make_reader(file_ending: str, example_file: str) -> Any:
    """nnU-Net's image reader/writer for the file ending (tried on one example file)."""
    import contextlib
    import io as _io

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    if os.path.isfile(example_file) and os.path.getsize(example_file) == 0:
        raise OODInputError(f"{example_file} is empty (0 bytes); replace it with the case's label file")
    try:  # nnU-Net prints a traceback for each reader that fails on the example, even with verbose=False
        with contextlib.redirect_stderr(_io.StringIO()), contextlib.redirect_stdout(_io.StringIO()):
            return determine_reader_writer_from_file_ending(file_ending, example_file, verbose=False)()
    except RuntimeError:
        raise OODInputError(f"nnU-Net has no reader for {file_ending} files that can open {example_file} (a "
                            "truncated or damaged file, or another format); replace the file or check "
                            "--file_ending") from None


def case_dice(reference_file: str, prediction_file: str, reader: Any, labels_or_regions: Sequence[LabelOrRegion],
              ignore_label: int | None = None) -> float:
    """Mean Dice over foreground labels/regions with nnU-Net's ``compute_metrics``; empty in both counts as 1."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics

    try:
        result = compute_metrics(reference_file, prediction_file, reader, list(labels_or_regions), ignore_label)
    except Exception as e:  # any reader or shape error means these two files cannot be compared
        message = " ".join(str(e).split())
        raise OODInputError(f"cannot compare segmentation {prediction_file} with reference {reference_file} "
                            f"({type(e).__name__}: {message}); check that both belong to the same case") from None
    dices = [result["metrics"][r]["Dice"] for r in labels_or_regions]
    return float(np.mean([1.0 if np.isnan(d) else d for d in dices]))


def load_group(spec: GroupSpec, table: ScoreTable, methods: Sequence[str], setup: LabelSetup, reader: Any) -> Group:
    """Per-case Dice and scores of one group (a method without a row for a case gives NaN: unscored)."""
    dice = np.array([case_dice(os.path.join(spec.label_folder, c + setup.file_ending),
                               os.path.join(spec.prediction_folder, c + setup.file_ending), reader,
                               setup.labels_or_regions, setup.ignore_label) for c in table.cases], dtype=np.float64)
    score = {m: np.array([table.score[m].get(c, np.nan) for c in table.cases], dtype=np.float64) for m in methods}
    normalized = {m: np.array([table.normalized[m].get(c, np.nan) for c in table.cases], dtype=np.float64)
                  for m in methods}
    # a case without a row was not scored: it is not accepted either
    flagged = {m: np.array([table.flagged[m].get(c, True) for c in table.cases], dtype=bool)
               for m in methods if table.has_flag(m)}
    return Group(spec, list(table.cases), dice, score, normalized, flagged)
