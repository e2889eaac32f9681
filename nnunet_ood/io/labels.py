"""Label values of reference segmentations, checked against a dataset's labels before any Dice is computed.

A reference that stores a class under another value (7 for 1), or ``--labels`` naming a value the dataset
does not have, gives a wrong Dice without any other sign; every reference the plugin reads is checked here
first, with one-line :class:`~nnunet_ood.errors.OODInputError` messages naming the file, the unexpected values
and the expected ones. No torch, no nnU-Net: the caller passes nnU-Net's reader.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from nnunet_ood.errors import OODInputError

LabelOrRegion = int | tuple[int, ...]


def _format_values(values: Iterable[float]) -> str:
    return ", ".join(f"{v:g}" for v in sorted(values))


def dataset_label_values(labels: Mapping[str, Any]) -> set[int]:
    """Every value a reference of the dataset may hold: the values of ``dataset.json``'s ``labels`` (background,
    the ignore label and the members of regions included)."""
    values: set[int] = set()
    for name, value in labels.items():
        members = value if isinstance(value, (list, tuple)) else [value]
        try:
            values.update(int(v) for v in members)
        except (TypeError, ValueError):
            raise OODInputError(f"dataset.json label {name!r} has value {value!r}, not an integer or a list of "
                                "integers") from None
    return values


def check_requested_labels(requested: Sequence[LabelOrRegion], foreground: set[int], source: str) -> None:
    """``--labels`` may name only foreground values the dataset has (``foreground``, described by ``source``)."""
    for item in requested:
        members = item if isinstance(item, tuple) else (item,)
        unknown = [m for m in members if m not in foreground]
        if unknown:
            raise OODInputError(f"--labels {','.join(map(str, members))}: label value(s) {_format_values(unknown)} "
                                f"are not in {source} (its foreground labels: {_format_values(foreground)}); pass "
                                "existing labels")


def reference_values(path: str, reader: Any) -> set[float]:
    """The distinct values of a reference segmentation, read once with nnU-Net's ``reader``."""
    try:
        segmentation, _ = reader.read_seg(path)
    except Exception as e:  # any reader error means the file is no segmentation nnU-Net can read
        raise OODInputError(f"cannot read reference segmentation {path} ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); replace it") from None
    return {float(v) for v in np.unique(np.asarray(segmentation))}


def check_reference_values(path: str, values: set[float], expected: set[int], source: str) -> None:
    """A reference must hold only the ``expected`` values (those of ``source``, e.g. a dataset.json)."""
    unexpected = values - {float(v) for v in expected}
    if unexpected:
        raise OODInputError(f"reference segmentation {path} holds label value(s) {_format_values(unexpected)} but "
                            f"{source} defines {_format_values(expected)}; fix the reference (or give the references "
                            "of this dataset)")


def check_references(paths: Iterable[str], reader: Any, expected: set[int] | None,
                     source: str) -> dict[str, set[float]]:
    """Read every reference once; each must hold only ``expected`` values (None: not checked). Returns the
    values by file."""
    found = {}
    for path in paths:
        found[path] = reference_values(path, reader)
        if expected is not None:
            check_reference_values(path, found[path], expected, source)
    return found
