"""Which cases a fold trained and validated on, and where their preprocessed data lives (as nnU-Net's trainer)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_ood.errors import OODInputError
from nnunet_ood.folds import Fold


def fold_split(preprocessed_dataset_folder_base: str, identifiers: Sequence[str],
               fold: Fold) -> tuple[list[str], list[str]]:
    """Training and validation case identifiers of a fold, as nnU-Net's trainer chooses them.

    ``splits_final.json`` when present (else nnU-Net's seeded 5-fold split); folds beyond the file get
    nnU-Net's seeded random 80:20 split; fold ``all`` uses every case for both.
    """
    keys = sorted(identifiers)
    if fold == "all":
        return keys, keys
    splits_file = join(preprocessed_dataset_folder_base, "splits_final.json")
    splits = load_json(splits_file) if isfile(splits_file) else generate_crossval_split(keys, seed=12345, n_splits=5)
    if int(fold) < len(splits):
        return list(splits[int(fold)]["train"]), list(splits[int(fold)]["val"])
    rnd = np.random.RandomState(seed=12345 + int(fold))  # same seed as nnU-Net's fallback split
    idx_tr = rnd.choice(len(keys), int(len(keys) * 0.8), replace=False)
    chosen = set(idx_tr.tolist())
    return [keys[i] for i in idx_tr], [keys[i] for i in range(len(keys)) if i not in chosen]


def preprocessed_folders(dataset_name: str, data_identifier: str) -> tuple[str, str]:
    """``(dataset folder, configuration data folder)`` under ``nnUNet_preprocessed``; one-line errors."""
    if not nnUNet_preprocessed.is_set():
        raise OODInputError("nnUNet_preprocessed is not set; fitting needs the fold's preprocessed training data "
                            "(export nnUNet_preprocessed=... as for nnUNetv2_train)")
    base = join(nnUNet_preprocessed.get(), dataset_name)
    data_folder = join(base, data_identifier)
    if not isdir(data_folder) or not os.listdir(data_folder):
        raise OODInputError(f"no preprocessed data in {data_folder}; run nnUNetv2_plan_and_preprocess (or "
                            f"nnUNetv2_preprocess) for this dataset and configuration first")
    return base, data_folder
