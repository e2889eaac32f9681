"""nnU-Net fold identifiers: the one parser for ``-f`` values and fold arguments (no torch, no nnU-Net)."""

from __future__ import annotations

from collections.abc import Iterable

from nnunet_ood.errors import OODInputError

Fold = int | str  # an integer fold or "all"


def parse_fold(value: object) -> Fold:
    """``'all'`` stays ``'all'``; anything else must be a non-negative integer."""
    if value == "all":
        return "all"
    try:
        fold = int(str(value))
    except ValueError:
        raise OODInputError(f"-f takes fold numbers or 'all', got {value!r}") from None
    if fold < 0:
        raise OODInputError(f"-f takes fold numbers >= 0 or 'all', got {value!r}")
    return fold


def parse_folds(values: Iterable[object] | object) -> list[Fold]:
    """A list of folds from ``-f`` values (a single value is accepted too); duplicates are refused."""
    if isinstance(values, (str, int)):
        values = [values]
    folds = [parse_fold(v) for v in values]
    if not folds:
        raise OODInputError("-f needs at least one fold")
    if len(set(map(str, folds))) != len(folds):
        raise OODInputError(f"-f lists a fold twice: {' '.join(map(str, folds))}")
    return folds
