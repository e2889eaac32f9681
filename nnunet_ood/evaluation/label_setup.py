"""What ``nnUNetv2_evaluate_ood`` evaluates: the foreground labels or regions, the file ending and the ignore
label, from ``--labels``/``--file_ending`` or the ``dataset.json`` nnU-Net copies into a prediction folder."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nnunet_ood.errors import OODInputError
from nnunet_ood.evaluation.groups import GroupSpec
from nnunet_ood.io.json_files import read_json
from nnunet_ood.io.labels import LabelOrRegion, check_requested_labels, dataset_label_values


@dataclass(frozen=True)
class LabelSetup:
    """What to evaluate: foreground labels (int) or regions (tuple of labels), file ending, ignore label.

    ``label_values``: every value a reference may hold (those of the dataset.json named by ``label_source``);
    None without a dataset.json (then every ``--labels`` value must occur in some reference).
    """

    labels_or_regions: list[LabelOrRegion]
    file_ending: str
    ignore_label: int | None = None
    label_values: frozenset[int] | None = None
    label_source: str = "dataset.json"


def parse_label_arguments(values: Sequence[str]) -> list[LabelOrRegion]:
    """``--labels`` values: ``2`` is label 2, ``1,2`` the region made of labels 1 and 2."""
    out: list[LabelOrRegion] = []
    for value in values:
        try:
            parts = tuple(int(p) for p in value.split(","))
        except ValueError:
            raise OODInputError(f"--labels takes integer labels or comma-separated regions like 1,2; got {value!r}")\
                from None
        if any(p <= 0 for p in parts):
            raise OODInputError(f"--labels takes foreground labels (> 0); got {value!r}")
        out.append(parts if len(parts) > 1 else parts[0])
    return out


def foreground_from_dataset_labels(labels: Mapping[str, Any]) -> list[LabelOrRegion]:
    """Foreground labels of a ``dataset.json`` ``labels`` dict, or its regions (tuples) if it is region-based.

    Background, the ignore label and regions made of background only are left out.
    """
    region_based = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
    out: list[LabelOrRegion] = []
    for name, value in labels.items():
        if name in ("background", "ignore"):
            continue
        try:
            members = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
        except (TypeError, ValueError):
            raise OODInputError(f"dataset.json label {name!r} has value {value!r}, not an integer or a list of "
                                "integers") from None
        if not members or set(members) == {0}:
            continue
        out.append(members if region_based else members[0])
    return out


def read_dataset_json(folder: str) -> dict[str, Any] | None:
    """The ``dataset.json`` nnU-Net copies into a prediction folder, or None if there is none."""
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        return None
    data = read_json(path, lambda reason: OODInputError(f"cannot read {path} ({reason}); fix it or pass --labels "
                                                         "and --file_ending"))
    if not isinstance(data, dict):
        raise OODInputError(f"{path} is not a JSON object; fix it or pass --labels and --file_ending")
    return data


def resolve_label_setup(specs: Sequence[GroupSpec], labels: Sequence[str] | None,
                        file_ending: str | None) -> LabelSetup:
    """Labels and file ending from ``--labels``/``--file_ending``, else from the first dataset.json found;
    ``--labels`` must name labels that dataset.json has."""
    found = next(((s.prediction_folder, d) for s in specs if (d := read_dataset_json(s.prediction_folder))
                  is not None), None)
    source, dataset = (os.path.join(found[0], "dataset.json"), found[1]) if found else ("dataset.json", None)
    if dataset is None and (labels is None or file_ending is None):
        raise OODInputError("no dataset.json in the prediction folders (nnU-Net copies it there); pass --labels and "
                            "--file_ending")
    dataset_labels = dataset.get("labels") if dataset else None
    dataset_labels = dataset_labels if isinstance(dataset_labels, dict) else None
    ignore = dataset_labels.get("ignore") if dataset_labels else None
    ignore = int(ignore) if ignore is not None else None
    values = frozenset(dataset_label_values(dataset_labels)) if dataset_labels else None
    if labels is not None:
        labels_or_regions = parse_label_arguments(labels)
        if values is not None:
            check_requested_labels(labels_or_regions, set(values) - {0, ignore}, source)
    elif dataset_labels is None:
        raise OODInputError(f"{source} has no 'labels' dict; pass --labels")
    else:
        labels_or_regions = foreground_from_dataset_labels(dataset_labels)
    if not labels_or_regions:
        raise OODInputError("no foreground labels to evaluate; pass --labels")
    ending = file_ending if file_ending is not None else dataset.get("file_ending")
    if not isinstance(ending, str) or not ending:
        raise OODInputError("dataset.json in the prediction folder has no 'file_ending'; pass --file_ending")
    return LabelSetup(labels_or_regions, ending, ignore, values, source)
