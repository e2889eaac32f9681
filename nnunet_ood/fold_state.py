"""The fitted OOD state of one fold: ``fold_X/ood/`` with a JSON manifest and safetensors files.

Nothing here is pickled, so loading a model folder obtained from elsewhere cannot run code. A
fingerprint of the model (plans, configuration, fold, architecture, weights) is stored with the state
and checked on load, so state fitted for another model is refused instead of silently used. The
manifest is checked field by field before anything else is read; every problem is a one-line
:class:`~nnunet_ood.errors.OODStateError` naming the file and the refit command.

Manifest (``ood_state.json``)::

    {"format_version": 1, "plugin_version": ..., "created": ..., "fingerprint": {...},
     "methods": {name: {"file": str | null, "class": str, "config": {...}, "calibration": {...}}, ...},
     "provenance": {...}}

Each method writes and reads its own entry (:meth:`nnunet_ood.methods.base.Method.state_entry`); the shared models
several methods require (``Requirements.shared``) are written and read by :mod:`nnunet_ood.methods.shared`, each by
its own ``SharedModel``.
This module needs the registry, so it sits above the methods (and below the fit and the predictor that use it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from nnunet_ood import __version__
from nnunet_ood.calibration import MethodCalibration
from nnunet_ood.errors import OODError, OODStateError
from nnunet_ood.io.json_files import read_json
from nnunet_ood.methods import FIT_COMMAND, REGISTRY, FoldModels
from nnunet_ood.methods.shared import load_shared_models, save_shared_models

OOD_DIRNAME = "ood"
MANIFEST_NAME = "ood_state.json"
FORMAT_VERSION = 1

#: fingerprint entries compared on load, in the order they are reported
FINGERPRINT_KEYS = ("dataset_name", "plans_name", "configuration", "fold", "network_class", "architecture_sha256",
                    "patch_size", "num_input_channels", "num_segmentation_heads", "checkpoint", "weights_sha256")


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hash of a network's weights (names, dtypes, shapes and values), independent of device."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_fingerprint(plans: Mapping[str, Any], configuration: str, fold: int | str, num_input_channels: int,
                      num_segmentation_heads: int, checkpoint: str,
                      network_weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the OOD state of a fold depends on. Equal fingerprints mean the features are the same."""
    config = plans["configurations"][configuration]
    architecture = config.get("architecture", {})
    return {
        "dataset_name": plans.get("dataset_name"),
        "plans_name": plans.get("plans_name"),
        "configuration": configuration,
        "fold": str(fold),
        "network_class": architecture.get("network_class_name"),
        "architecture_sha256": _sha256_json(architecture),
        "patch_size": [int(p) for p in config["patch_size"]],
        "num_input_channels": int(num_input_channels),
        "num_segmentation_heads": int(num_segmentation_heads),
        "checkpoint": checkpoint,
        "weights_sha256": weights_sha256(network_weights),
    }


def check_fingerprint(stored: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Raise a one-line OODStateError naming the first mismatching entry."""
    for key in FINGERPRINT_KEYS:
        if stored.get(key) != expected.get(key):
            what = {"weights_sha256": "network weights", "architecture_sha256": "network architecture"}.get(key, key)
            shown = "" if key.endswith("sha256") else f" ({stored.get(key)!r} there, {expected.get(key)!r} here)"
            raise OODStateError(
                f"OOD state in {where} was fitted for another model: {what} differs{shown}; "
                f"re-fit it with {FIT_COMMAND} -chk {expected.get('checkpoint')}"
            )


@dataclass
class FoldOODState(FoldModels):
    """Everything fitted for one fold: the models of :class:`FoldModels` plus calibration, fingerprint, provenance.

    ``calibration`` has one entry per method, in table order.
    """

    fingerprint: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, MethodCalibration] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.calibration)


def fold_ood_dir(fold_dir: str) -> str:
    return os.path.join(fold_dir, OOD_DIRNAME)


def save_fold_state(fold_dir: str, state: FoldOODState) -> str:
    """Write ``fold_dir/ood`` atomically: into a temporary sibling first, then swapped in by rename.

    Temporary folders left by an earlier save that was killed are removed first.
    """
    target = fold_ood_dir(fold_dir)
    for name in os.listdir(fold_dir) if os.path.isdir(fold_dir) else []:
        if name.startswith(f"{OOD_DIRNAME}.tmp-") or name.startswith(f"{OOD_DIRNAME}.old-"):
            shutil.rmtree(os.path.join(fold_dir, name), ignore_errors=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        manifest = {
            "format_version": FORMAT_VERSION,
            "plugin_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fingerprint": state.fingerprint,
            "methods": {},
            "provenance": state.provenance,
        }
        save_shared_models(state, tmp, [REGISTRY.get(name) for name in state.calibration], state.provenance)
        for name, calibration in state.calibration.items():
            entry = REGISTRY.get(name).state_entry(state, tmp)
            manifest["methods"][name] = {**entry, "calibration": calibration.to_json()}
        with open(os.path.join(tmp, MANIFEST_NAME), "w") as f:
            json.dump(manifest, f, indent=2, default=str)
        old = f"{target}.old-{os.getpid()}"
        if os.path.isdir(target):
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_manifest(manifest: Any, path: str) -> None:
    """The manifest's structure and types (calibration fields are checked when they are read)."""
    def bad(what: str) -> OODStateError:
        return OODStateError(f"corrupted OOD state manifest {path} ({what}); re-fit it with {FIT_COMMAND}")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    for key, kind in (("fingerprint", dict), ("methods", dict), ("provenance", dict)):
        if key not in manifest:
            raise bad(f"no '{key}'")
        if not isinstance(manifest[key], kind):
            raise bad(f"'{key}' is not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise OODStateError(f"OOD state {path} has format version {manifest.get('format_version')}, this plugin "
                            f"reads {FORMAT_VERSION}; re-fit it with {FIT_COMMAND}")
    if not manifest["methods"]:
        raise bad("it lists no methods")
    for name, entry in manifest["methods"].items():
        if name not in REGISTRY:
            raise OODStateError(f"OOD state {path} holds unknown method {name!r}; upgrade nnunet-ood or re-fit it "
                                f"with {FIT_COMMAND}")
        if not isinstance(entry, dict) or not isinstance(entry.get("calibration"), dict) \
                or not isinstance(entry.get("file"), (str, type(None))) \
                or not isinstance(entry.get("config", {}), dict):
            raise bad(f"the entry of {name} needs 'file' (a name or null), 'config' and 'calibration' objects")
        if entry["file"] is not None and os.path.basename(entry["file"]) != entry["file"]:
            raise bad(f"the file of {name} must be a plain file name, got {entry['file']!r}")
    for key in ("weights_sha256", "architecture_sha256", "fold", "configuration"):
        if not isinstance(manifest["fingerprint"].get(key), str):
            raise bad(f"fingerprint entry '{key}' is missing or not a string")


def read_manifest(fold_dir: str) -> dict[str, Any]:
    """The checked JSON manifest of a fold's OOD state; a clear error when missing, unreadable or malformed."""
    path = os.path.join(fold_ood_dir(fold_dir), MANIFEST_NAME)
    if not os.path.isfile(path):
        raise OODStateError(f"no fitted OOD state in {fold_dir} (missing {OOD_DIRNAME}/{MANIFEST_NAME}); "
                            f"fit it first with {FIT_COMMAND}")
    manifest = read_json(path, lambda reason: OODStateError(f"corrupted OOD state manifest {path} ({reason}); "
                                                             f"re-fit it with {FIT_COMMAND}"))
    _check_manifest(manifest, path)
    return manifest


def load_fold_state(fold_dir: str, expected_fingerprint: Mapping[str, Any] | None,
                    methods: Iterable[str] | None = None, device: torch.device | str | None = None) -> FoldOODState:
    """Load (a subset of) a fold's OOD state, checking it belongs to the model described by the fingerprint."""
    manifest = read_manifest(fold_dir)
    if expected_fingerprint is not None:
        check_fingerprint(manifest["fingerprint"], expected_fingerprint, fold_dir)
    available = manifest["methods"]
    wanted = list(available) if methods is None else list(dict.fromkeys(methods))
    missing = [m for m in wanted if m not in available]
    if missing:
        raise OODStateError(f"method(s) {', '.join(missing)} not fitted in {fold_dir} (fitted: "
                            f"{', '.join(available)}); fit them with {FIT_COMMAND} --ood {' '.join(missing)}")
    folder = fold_ood_dir(fold_dir)
    state = FoldOODState(fingerprint=manifest["fingerprint"], provenance=manifest["provenance"])
    used = [REGISTRY.get(name) for name in wanted]
    load_shared_models(state, folder, used, device)
    for method in used:
        try:
            method.load_state(available[method.name], folder, state, device)
        except OODStateError:
            raise
        except (OODError, KeyError, TypeError, ValueError) as e:
            raise OODStateError(f"corrupted state of {method.name} in {fold_dir} ({type(e).__name__}: {e}); re-fit "
                                f"it with {FIT_COMMAND}") from None
        where = f"{method.name} in {os.path.join(folder, MANIFEST_NAME)}"
        state.calibration[method.name] = MethodCalibration.from_json(available[method.name]["calibration"], where,
                                                                     score_range=method.score_range,
                                                                     special_thresholds=method.special_thresholds)
    return state
