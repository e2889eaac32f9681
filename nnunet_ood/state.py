"""The fitted OOD state of one fold: ``fold_X/ood/`` with a JSON manifest and one safetensors file per detector.

Nothing here is pickled, so loading a model folder obtained from elsewhere cannot run code.
A fingerprint of the model (plans, configuration, fold, architecture, weights) is stored with the
state and checked on load, so state fitted for another model is refused instead of silently used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nnunet_ood import __version__
from nnunet_ood.autoencoder import AE_STATE_NAME, BottleneckAutoencoder
from nnunet_ood.detectors.base import FeatureDetector
from nnunet_ood.errors import OODStateError
from nnunet_ood.methods import needs_autoencoder

OOD_DIRNAME = "ood"
MANIFEST_NAME = "ood_state.json"
FORMAT_VERSION = 1
FIT_COMMAND = "nnUNetv2_fit_ood -d DATASET -c CONFIGURATION -f FOLD -tr TRAINER"

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
class MethodCalibration:
    """Per-method numbers recorded after fitting: display normalisation and the ID threshold."""

    low: float  # min of ID training case scores
    high: float  # 2 * max of ID training case scores (max + (max - min) if some are negative)
    threshold: float  # 95th percentile of the fold's validation case scores
    n_train_cases: int = 0
    n_val_cases: int = 0
    aggregation: str = "mean"  # how the voxel map becomes the case score (nnunet_ood.aggregation)

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """Clip to [low, high] and rescale to [0, 1]; NaN stays NaN."""
        span = self.high - self.low
        clipped = scores.clamp(self.low, self.high)
        if span <= 0:  # degenerate calibration (all training scores equal): everything at the bottom
            return torch.where(torch.isnan(scores), scores, torch.zeros_like(scores))
        return (clipped - self.low) / span

    @classmethod
    def from_scores(cls, train_scores: Sequence[float], val_scores: Sequence[float],
                    percentile: float = 95.0, aggregation: str = "mean") -> MethodCalibration:
        """Normalisation from training case scores, threshold from validation case scores (NaNs ignored)."""
        train = torch.tensor([s for s in train_scores if math.isfinite(s)], dtype=torch.float64)
        val = torch.tensor([s for s in val_scores if math.isfinite(s)], dtype=torch.float64)
        if train.numel() == 0 or val.numel() == 0:
            raise OODStateError("no finite OOD scores on the fold's training or validation cases; "
                                "check the preprocessed data for NaN/Inf and re-run nnUNetv2_fit_ood")
        low, top = float(train.min()), float(train.max())
        # METHODS.md: [min, 2 max] for the (non-negative) distances; scores that can be negative
        # (energy, kl_uniform) get the same headroom above the minimum: [min, max + (max - min)]
        high = 2 * top if low >= 0 else top + (top - low)
        return cls(low=low, high=high,
                   threshold=float(torch.quantile(val, percentile / 100.0)),
                   n_train_cases=len(train_scores), n_val_cases=len(val_scores), aggregation=aggregation)


@dataclass
class FoldOODState:
    """Everything fitted for one fold: detectors, the SD autoencoder, calibration, fingerprint and provenance.

    ``calibration`` has one entry per method, in table order; feature methods also have a detector,
    and the autoencoder methods (sd, latent_mahalanobis) share ``autoencoder``.
    """

    fingerprint: dict[str, Any]
    detectors: dict[str, FeatureDetector]
    calibration: dict[str, MethodCalibration]
    provenance: dict[str, Any] = field(default_factory=dict)
    autoencoder: BottleneckAutoencoder | None = None
    #: fitted parameters of methods without a state file (e.g. {"temperature": {"temperature": 1.7}})
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.calibration)


def fold_ood_dir(fold_dir: str) -> str:
    return os.path.join(fold_dir, OOD_DIRNAME)


def save_fold_state(fold_dir: str, state: FoldOODState) -> str:
    """Write ``fold_dir/ood`` atomically: into a temporary sibling first, then swapped in by rename."""
    target = fold_ood_dir(fold_dir)
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
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
        ae_file = state.autoencoder.save(tmp, state.provenance.get("sd_training")) \
            if state.autoencoder is not None else None
        for name, calibration in state.calibration.items():
            if name in state.detectors:
                det = state.detectors[name]
                entry = {"file": os.path.basename(det.save(tmp)), "class": type(det).__name__,
                         "config": det.get_config()}
            elif name == "sd" and ae_file is not None:
                entry = {"file": os.path.basename(ae_file), "class": BottleneckAutoencoder.__name__,
                         "config": state.autoencoder.config}
            else:  # computed from the network's output; fitted parameters (if any) live in the manifest
                entry = {"file": None, "class": "OutputScore", "config": state.method_params.get(name, {})}
            manifest["methods"][name] = {**entry, "calibration": vars(calibration)}
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


def _detector_classes() -> dict[str, type[FeatureDetector]]:
    from nnunet_ood.detectors.knn import KNNDetector
    from nnunet_ood.detectors.mahalanobis import LatentMahalanobisDetector, MahalanobisDetector

    return {cls.name: cls for cls in (MahalanobisDetector, KNNDetector, LatentMahalanobisDetector)}


def read_manifest(fold_dir: str) -> dict[str, Any]:
    """The JSON manifest of a fold's OOD state; a clear error when missing or unreadable."""
    path = os.path.join(fold_ood_dir(fold_dir), MANIFEST_NAME)
    if not os.path.isfile(path):
        raise OODStateError(f"no fitted OOD state in {fold_dir} (missing {OOD_DIRNAME}/{MANIFEST_NAME}); "
                            f"fit it first with {FIT_COMMAND}")
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or "methods" not in manifest or "fingerprint" not in manifest:
            raise ValueError("manifest lacks 'methods' or 'fingerprint'")
    except (ValueError, OSError) as e:
        raise OODStateError(f"corrupted OOD state manifest {path} ({e}); re-fit it with {FIT_COMMAND}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise OODStateError(f"OOD state {path} has format version {manifest.get('format_version')}, this plugin "
                            f"reads {FORMAT_VERSION}; re-fit it with {FIT_COMMAND}")
    return manifest


def load_fold_state(fold_dir: str, expected_fingerprint: Mapping[str, Any] | None,
                    methods: Iterable[str] | None = None, device: torch.device | str | None = None) -> FoldOODState:
    """Load (a subset of) a fold's OOD state, checking it belongs to the model described by the fingerprint."""
    manifest = read_manifest(fold_dir)
    if expected_fingerprint is not None:
        check_fingerprint(manifest["fingerprint"], expected_fingerprint, fold_dir)
    available = manifest["methods"]
    wanted = list(available) if methods is None else list(methods)
    missing = [m for m in wanted if m not in available]
    if missing:
        raise OODStateError(f"method(s) {', '.join(missing)} not fitted in {fold_dir} (fitted: "
                            f"{', '.join(available) or 'none'}); fit them with {FIT_COMMAND} --ood {' '.join(missing)}")
    classes = _detector_classes()
    detectors, calibration = {}, {}
    autoencoder = BottleneckAutoencoder.load(fold_ood_dir(fold_dir), device) if needs_autoencoder(wanted) else None
    params = {}
    for name in wanted:
        if available[name].get("file") == f"{AE_STATE_NAME}.safetensors":
            pass  # the method is the autoencoder itself (sd)
        elif available[name].get("file") is None:
            params[name] = dict(available[name].get("config") or {})
        elif name in classes:
            detectors[name] = classes[name].load(fold_ood_dir(fold_dir), device=device)
        else:
            raise OODStateError(f"OOD state in {fold_dir} holds unknown method {name!r}; upgrade nnunet-ood or re-fit")
        try:
            calibration[name] = MethodCalibration(**available[name]["calibration"])
        except (KeyError, TypeError) as e:
            raise OODStateError(f"corrupted calibration for {name} in {fold_dir} ({e}); re-fit with {FIT_COMMAND}") \
                from None
    return FoldOODState(fingerprint=manifest["fingerprint"], detectors=detectors, calibration=calibration,
                        provenance=manifest.get("provenance", {}), autoencoder=autoencoder, method_params=params)
