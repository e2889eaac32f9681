"""K-fold splits grouped by case: all versions of one case (clean and corrupted) fall on the same side.

The failure table holds several versions of each validation case. They share the case's anatomy and the
model's behaviour on it, so a version in the training part would leak its case into the test part and make
the cross-validated error look better than it is on a new case.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nnunet_ood.errors import OODInputError


def group_kfold(groups: Sequence[str], n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_idx, test_idx)`` pairs; every group wholly on one side.

    Groups are put in a seeded random order, then assigned, largest first (ties in that random order), to the
    fold with the fewest rows so far (scikit-learn's ``GroupKFold`` balancing, with a seeded tie-break instead of
    the groups' sorted names). ``n_splits`` is capped at the number of groups, so every fold has a test part;
    at least 2 groups are needed. Index arrays are sorted ``int64``.
    """
    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise OODInputError(f"grouped cross-validation needs n_splits >= 2, got {n_splits!r}; pass 2 or more")
    labels = np.asarray([str(g) for g in groups])
    if labels.size == 0:
        raise OODInputError("grouped cross-validation got no rows; give it at least 2 groups (cases)")
    unique, group_of_row = np.unique(labels, return_inverse=True)
    n_groups = len(unique)
    if n_groups < 2:
        raise OODInputError(f"grouped cross-validation needs at least 2 groups (cases), got {n_groups}; "
                            "add labelled cases")
    k = min(int(n_splits), n_groups)
    sizes = np.bincount(group_of_row, minlength=n_groups)
    # the permutation decides ties of equal size; a stable sort by size keeps that random order
    order = np.random.default_rng(seed).permutation(n_groups)
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_rows = np.zeros(k, dtype=np.int64)
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    for g in order:  # one step per group, not per row: cheap
        lightest = int(np.argmin(fold_rows))  # the first of equally light folds: empty folds fill first
        fold_of_group[g] = lightest
        fold_rows[lightest] += sizes[g]
    fold_of_row = fold_of_group[group_of_row]
    rows = np.arange(len(labels), dtype=np.int64)
    return [(rows[fold_of_row != f], rows[fold_of_row == f]) for f in range(k)]
