"""Named calibrations from a site's own in-distribution cases (``nnUNetv2_calibrate_ood``).

A fold's own calibration comes from its validation cases, which are often not new patients (nnU-Net
splits by case, and 2D datasets put slices of one patient on both sides) and were imaged on the
training data's scanners. A named calibration instead scores a folder of the site's own ID images with
exactly the inference settings of the deployment and stores, per method, the normalisation bounds and
the finite-sample threshold of those case scores. It lives in the model folder as
``ood_calibrations/<name>.json`` (plain JSON), fingerprinted with the folds, checkpoint, weights, step
size and mirroring it was made with; ``nnUNetv2_predict_ood --calibration NAME`` uses it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nnunet_ood import __version__
from nnunet_ood.calibration import SCORE_LIMIT, MethodCalibration, conformal_threshold
from nnunet_ood.errors import OODInputError, OODStateError
from nnunet_ood.io.atomic import atomic_write_text
from nnunet_ood.io.json_files import read_json
from nnunet_ood.normalization import bounds_from_scores

CALIBRATIONS_DIRNAME = "ood_calibrations"
FORMAT_VERSION = 1
CALIBRATE_COMMAND = "nnUNetv2_calibrate_ood -i LOCAL_ID_IMAGES -d DATASET -c CONFIGURATION -f FOLDS -tr TRAINER"
#: settings of a prediction that change the scale of the scores (compared at prediction time)
SCORE_SETTINGS = ("tile_step_size", "use_mirroring", "use_gaussian")
#: what identifies the model a calibration was made for
MODEL_KEYS = ("configuration", "plans", "folds", "checkpoint", "weights_sha256")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class SiteCalibration:
    """A named calibration: per method the normalisation and threshold from a site's own cases."""

    name: str
    model: dict[str, Any]  # MODEL_KEYS
    settings: dict[str, Any]  # SCORE_SETTINGS
    false_alarm_rate: float
    calibration: dict[str, MethodCalibration]
    case_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> case -> score
    created: str = ""
    plugin_version: str = __version__
    #: methods whose threshold was chosen on labelled cases (-l): the rule's settings and each case's Dice
    labelled: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def n_cases(self) -> int:
        return max((len(v) for v in self.case_scores.values()), default=0)

    @classmethod
    def from_scores(cls, name: str, model: Mapping[str, Any], settings: Mapping[str, Any],
                    case_scores: Mapping[str, Mapping[str, float]], aggregations: Mapping[str, str],
                    false_alarm_rate: float) -> SiteCalibration:
        """Normalisation ``[min, 2 max]`` and threshold (:func:`conformal_threshold`) of each method's case scores."""
        calibration = {}
        for method, scores in case_scores.items():
            finite = [s for s in scores.values() if math.isfinite(s)]
            if not finite:
                raise OODInputError(f"no calibration case has a finite {method} score; check the images")
            low, high = bounds_from_scores(finite)
            threshold, _ = conformal_threshold(finite, false_alarm_rate)
            calibration[method] = MethodCalibration(low, high, threshold, len(scores), len(scores),
                                                    aggregations.get(method, "mean"), false_alarm_rate)
        return cls(check_name(name), dict(model), dict(settings), false_alarm_rate, calibration,
                   {m: dict(s) for m, s in case_scores.items()}, time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "name": self.name, "plugin_version": self.plugin_version,
                "created": self.created, "model": self.model, "settings": self.settings,
                "false_alarm_rate": self.false_alarm_rate,
                "calibration": {m: c.to_json() for m, c in self.calibration.items()},
                "case_scores": {m: {k: (v if math.isfinite(v) else None) for k, v in s.items()}
                                for m, s in self.case_scores.items()},
                "labelled": self.labelled}

    def check_model(self, model: Mapping[str, Any]) -> None:
        """The model in use must be the one the calibration was made for (one-line error)."""
        for key in MODEL_KEYS:
            if self.model.get(key) != model.get(key):
                shown = "" if key == "weights_sha256" else f" ({self.model.get(key)} there, {model.get(key)} here)"
                raise OODStateError(f"calibration {self.name} was made for another model or other folds: {key} "
                                    f"differs{shown}; re-run {CALIBRATE_COMMAND} --name {self.name}")

    def setting_differences(self, settings: Mapping[str, Any]) -> list[str]:
        """The score-changing settings that differ from the calibration's (``name: there -> here``)."""
        return [f"{k} {self.settings.get(k)} -> {settings.get(k)}" for k in SCORE_SETTINGS
                if self.settings.get(k) != settings.get(k)]


def check_name(name: str, flag: str = "--name") -> str:
    """A calibration name is a plain file name part; ``flag``: the option that gave it, for the message."""
    if not NAME_PATTERN.match(name):
        raise OODInputError(f"{flag} {name!r}: use letters, digits, '.', '_' and '-' (at most 64 characters)")
    return name


def calibrations_dir(model_folder: str) -> str:
    return os.path.join(model_folder, CALIBRATIONS_DIRNAME)


def calibration_path(model_folder: str, name: str) -> str:
    return os.path.join(calibrations_dir(model_folder), f"{check_name(name)}.json")


def available_calibrations(model_folder: str) -> list[str]:
    folder = calibrations_dir(model_folder)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(f[:-5] for f in names if f.endswith(".json") and os.path.isfile(os.path.join(folder, f)))


def save_site_calibration(model_folder: str, calibration: SiteCalibration) -> str:
    """Write ``<model_folder>/ood_calibrations/<name>.json`` atomically; returns its path."""
    path = calibration_path(model_folder, calibration.name)
    atomic_write_text(path, json.dumps(calibration.to_json(), indent=1))
    return path


def _bad(path: str, what: str) -> OODStateError:
    return OODStateError(f"corrupted calibration {path} ({what}); re-run {CALIBRATE_COMMAND}")


def load_site_calibration(model_folder: str, name: str,
                          limits: Callable[[str], Mapping[str, Any]] | None = None) -> SiteCalibration:
    """Read and check a named calibration; one-line errors for a missing name or a malformed file. ``limits``: per
    method, what its stored values may be (see :func:`_method_calibration`)."""
    path = calibration_path(model_folder, name)
    if os.path.islink(path) and not os.path.exists(path):  # said "no calibration named NAME (known: none)"
        raise _bad(path, f"a dangling symbolic link to {os.readlink(path)}")
    if not os.path.isfile(path):
        known = available_calibrations(model_folder)
        raise OODInputError(f"no calibration named {name} for this model (known: {', '.join(known) or 'none'}); "
                            f"make it with {CALIBRATE_COMMAND} --name {name}")
    document = read_json(path, lambda reason: _bad(path, reason))
    if not isinstance(document, dict) or document.get("format_version") != FORMAT_VERSION:
        raise _bad(path, "not a calibration of this plugin's format")
    for key, kind in (("model", dict), ("settings", dict), ("calibration", dict), ("case_scores", dict),
                      ("false_alarm_rate", float)):
        if not isinstance(document.get(key), kind):
            raise _bad(path, f"'{key}' is missing or not a {kind.__name__}")
    if not 0 < document["false_alarm_rate"] < 1:  # NaN and 1e308 too
        raise _bad(path, f"false_alarm_rate = {document['false_alarm_rate']!r} is not in (0, 1)")
    fix = f"re-run {CALIBRATE_COMMAND} --name {name}"
    calibration = {m: _method_calibration(m, c, f"{m} in {path}", fix, limits)
                   for m, c in document["calibration"].items()}
    case_scores = {m: {k: _case_score(v, f"case_scores of {m}", path) for k, v in s.items()}
                   for m, s in document["case_scores"].items() if isinstance(s, dict)}
    labelled = document.get("labelled", {})
    if not isinstance(labelled, dict):
        raise _bad(path, "'labelled' is not a dict")
    return SiteCalibration(name, document["model"], document["settings"], document["false_alarm_rate"], calibration,
                           case_scores, str(document.get("created", "")), str(document.get("plugin_version", "")),
                           labelled)


def _method_calibration(method: str, entry: Any, where: str, fix: str,
                        limits: Callable[[str], Mapping[str, Any]] | None) -> MethodCalibration:
    """A method's entry, checked against what its scores can be (``limits(method)``: the keyword arguments of
    :meth:`MethodCalibration.from_json` for it, from the method registry above this layer; None: any value)."""
    return MethodCalibration.from_json(entry, where, fix, **(limits(method) if limits is not None else {}))


def _case_score(value: Any, what: str, path: str) -> float:
    """A stored case score: a number within :data:`SCORE_LIMIT`, or null (a case that could not be scored). They
    calibrate the gate of quality's decision: a string stopped it with a traceback, 1e308 skewed it silently."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= SCORE_LIMIT:
        raise _bad(path, f"{what}: {value!r} is not a score (a number within {SCORE_LIMIT:g}, or null)")
    return float(value)


def score_settings(tile_step_size: float, use_mirroring: bool, use_gaussian: bool) -> dict[str, Any]:
    return {"tile_step_size": float(tile_step_size), "use_mirroring": bool(use_mirroring),
            "use_gaussian": bool(use_gaussian)}


def model_identity(configuration: str, plans: str, folds: Sequence, checkpoint: str,
                   weights: Sequence[str]) -> dict[str, Any]:
    return {"configuration": configuration, "plans": plans, "folds": [str(f) for f in folds],
            "checkpoint": checkpoint, "weights_sha256": list(weights)}
