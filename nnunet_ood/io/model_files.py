"""The trained model's ``plans.json`` and ``dataset.json``, read and checked before nnU-Net reads them (no torch).

nnU-Net reads both files key by key where it needs them, so a damaged file (invalid JSON, a configuration
missing, ``patch_size`` a string, ``labels`` or ``file_ending`` missing) ended in a ``JSONDecodeError``,
``KeyError``, ``TypeError`` or ``RuntimeError`` traceback somewhere in the model loading, in the input checks or
after the output folder had been written to. :func:`read_model_files` checks what nnU-Net and the plugin read,
and names the file, the entry and the fix in one line (:class:`~nnunet_ood.errors.OODInputError`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from nnunet_ood.errors import OODInputError
from nnunet_ood.io.json_files import read_json

#: how each file can be repaired: nnU-Net's training copies both into the model folder from nnUNet_preprocessed
RESTORE = {"plans.json": "restore it from a backup, or from nnUNet_preprocessed/DATASET/PLANS.json if the dataset "
                         "was not planned again since training (training copies it from there)",
           "dataset.json": "restore it from a backup, or from nnUNet_preprocessed/DATASET/dataset.json (training "
                           "copies it from there)"}
#: string entries of a configuration that nnU-Net reads (with the ``architecture``, the sizes and the spacing)
CONFIGURATION_STRINGS = ("data_identifier", "preprocessor_name", "resampling_fn_data", "resampling_fn_seg",
                         "resampling_fn_probabilities")
#: object entries of a configuration that nnU-Net reads
CONFIGURATION_OBJECTS = ("resampling_fn_data_kwargs", "resampling_fn_seg_kwargs",
                         "resampling_fn_probabilities_kwargs")


class _Damaged(Exception):
    """What is wrong inside one of the files (turned into the one-line error naming the file)."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_configuration(plans: Mapping[str, Any], configuration: str) -> dict[str, Any]:
    """A configuration of the plans with what it inherits (``inherits_from``), as nnU-Net resolves it."""
    configurations = plans["configurations"]
    if configuration not in configurations:
        raise _Damaged(f"it has no configuration {configuration!r} (it has {', '.join(map(repr, configurations))})")
    chain, name = [], configuration
    while name is not None:
        if name in chain:
            raise _Damaged(f"configuration {configuration!r} inherits from itself (through {' -> '.join(chain)})")
        if name not in configurations or not isinstance(configurations[name], dict):
            raise _Damaged(f"configuration {chain[-1] if chain else name!r} inherits from {name!r}, which is missing "
                           "or not an object")
        chain.append(name)
        name = configurations[name].get("inherits_from")
    resolved: dict[str, Any] = {}
    for name in reversed(chain):
        resolved.update(configurations[name])
    return resolved


def _check_configuration(plans: Mapping[str, Any], name: str) -> None:
    """The entries of one (resolved) configuration that nnU-Net and the plugin read."""
    config = resolve_configuration(plans, name)

    def need(key: str, ok: bool, what: str) -> None:
        if key not in config:
            raise _Damaged(f"configuration {name!r} has no {key!r}")
        if not ok:
            raise _Damaged(f"configuration {name!r}: {key} = {config[key]!r} is not {what}")

    patch = config.get("patch_size")
    need("patch_size", isinstance(patch, list) and len(patch) in (2, 3) and
         all(_integer(p) and p > 0 for p in patch), "a list of 2 or 3 positive integers")
    spacing = config.get("spacing")
    need("spacing", isinstance(spacing, list) and len(spacing) == len(patch) and
         all(_number(s) and s > 0 for s in spacing), f"a list of {len(patch)} positive numbers (one per patch axis)")
    need("batch_size", _integer(config.get("batch_size")) and config["batch_size"] > 0, "a positive integer")
    for key in ("normalization_schemes", "use_mask_for_norm"):
        need(key, isinstance(config.get(key), list), "a list")
    for key in CONFIGURATION_STRINGS:
        need(key, isinstance(config.get(key), str), "a string")
    for key in CONFIGURATION_OBJECTS:
        need(key, isinstance(config.get(key), dict), "an object")
    if "architecture" not in config and "UNet_class_name" in config:
        return  # the plans format of nnU-Net before 2.4: nnU-Net converts it
    architecture = config.get("architecture")
    need("architecture", isinstance(architecture, dict) and isinstance(architecture.get("network_class_name"), str)
         and isinstance(architecture.get("arch_kwargs"), dict), "an object with network_class_name and arch_kwargs")


def check_plans(plans: Any, configuration: str | None) -> None:
    """What nnU-Net reads of ``plans.json`` and the configuration ``configuration`` (None: every configuration,
    when the configuration is only known from the checkpoint); raises :class:`_Damaged`."""
    if not isinstance(plans, dict):
        raise _Damaged("it is not a JSON object")
    for key in ("dataset_name", "plans_name", "image_reader_writer"):
        if not isinstance(plans.get(key), str):
            raise _Damaged(f"{key!r} is missing or not a string")
    for key in ("transpose_forward", "transpose_backward"):
        value = plans.get(key)
        if not (isinstance(value, list) and value and all(_integer(a) for a in value) and
                sorted(value) == list(range(len(value)))):
            raise _Damaged(f"{key!r} is missing or not a permutation of the axes (e.g. [0, 1, 2])")
    properties = plans.get("foreground_intensity_properties_per_channel",
                           plans.get("foreground_intensity_properties_by_modality"))
    if not isinstance(properties, dict):
        raise _Damaged("'foreground_intensity_properties_per_channel' is missing or not an object")
    if not isinstance(plans.get("configurations"), dict) or not plans["configurations"]:
        raise _Damaged("'configurations' is missing, empty or not an object")
    for name in plans["configurations"] if configuration is None else [configuration]:
        _check_configuration(plans, name)


def check_dataset_json(dataset: Any) -> None:
    """What nnU-Net and the plugin read of ``dataset.json``; raises :class:`_Damaged`."""
    if not isinstance(dataset, dict):
        raise _Damaged("it is not a JSON object")
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or labels.get("background") != 0 or isinstance(labels["background"], bool):
        raise _Damaged("'labels' is missing or has no \"background\": 0 (nnU-Net's labels: name -> value)")
    region = False
    for name, value in labels.items():
        region = region or isinstance(value, list)
        values = value if isinstance(value, list) else [value]
        if not values or not all(_integer(v) and v >= 0 for v in values):
            raise _Damaged(f"label {name!r} = {value!r} is not a label value (a non-negative integer, or a list of "
                           "them for a region)")
    if region and not isinstance(dataset.get("regions_class_order"), list):
        raise _Damaged("its labels are regions but 'regions_class_order' is missing or not a list")
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise _Damaged("'channel_names' is missing, empty or not an object (channel index -> name)")
    ending = dataset.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith(".") or len(ending) < 2:
        raise _Damaged("'file_ending' is missing or not a file ending such as \".nii.gz\"")


def read_model_files(model_folder: str, configuration: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(dataset_json, plans)`` of a trained model folder, checked; a one-line :class:`OODInputError` naming the
    file, what is wrong and the fix. ``configuration``: the configuration to check (None: every one)."""
    files = {}
    for name, check in (("dataset.json", check_dataset_json),
                        ("plans.json", lambda plans: check_plans(plans, configuration))):
        path = os.path.join(model_folder, name)
        fix = RESTORE[name]
        content = read_json(path, lambda reason, path=path, fix=fix: OODInputError(f"cannot read {path} ({reason}); "
                                                                                  f"{fix}"))
        try:
            check(content)
        except _Damaged as e:
            raise OODInputError(f"{path} is damaged: {e}; {fix}") from None
        files[name] = content
    return files["dataset.json"], files["plans.json"]
