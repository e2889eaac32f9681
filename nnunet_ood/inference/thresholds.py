"""Which calibration a prediction flags with: the folds' own, or a named one from the site's cases.

The folds' calibration (made by the fit with step size 0.5, Gaussian weighting and, for the output-based
scores, mirroring) is combined by each method: averaged over the folds in use, or (``quality``) chosen anew on
the folds' validation cases pooled. A named calibration (``--calibration NAME``,
made by ``nnUNetv2_calibrate_ood``) replaces it for every method it covers; it must belong to the same
model, folds and checkpoint. Settings that change the scores' scale differently from the calibration's
give a one-line warning naming the calibration command.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nnunet_ood.calibration import MethodCalibration
from nnunet_ood.io.site_calibration import CALIBRATE_COMMAND, SiteCalibration, load_site_calibration, score_settings
from nnunet_ood.methods import REGISTRY, Method, MethodKind
from nnunet_ood.quality.decision import DecisionRule

#: the settings of the fit's calibration passes
FIT_SETTINGS = score_settings(0.5, True, True)


def _names(methods: Sequence[Method]) -> str:
    return ", ".join(m.name for m in methods)


def fold_calibration(methods: Sequence[Method], states: Sequence[Any]) -> dict[str, MethodCalibration]:
    """The fit's calibration of the folds together (each method combines its folds' own); methods without one
    (fold ensembles) are uncalibrated."""
    return {m.name: m.combine_fold_calibrations([s.calibration[m.name] for s in states],
                                                [s.method_params.get(m.name, {}) for s in states])
            if m.fittable else MethodCalibration.uncalibrated() for m in methods}


def fit_setting_notes(methods: Sequence[Method], settings: Mapping[str, Any], n_folds: int) -> list[str]:
    """What makes the fit's thresholds approximate for this prediction (one line each)."""
    notes = []
    fix = f"for thresholds of these settings run {CALIBRATE_COMMAND} and predict with --calibration NAME"
    changed = [k for k in ("tile_step_size", "use_gaussian") if settings[k] != FIT_SETTINGS[k]]
    if settings["use_mirroring"] != FIT_SETTINGS["use_mirroring"] and \
            any(m.kind is MethodKind.LOGITS for m in methods):
        changed.append("use_mirroring")
    if changed:
        shown = ", ".join(f"{k} {settings[k]} (fit: {FIT_SETTINGS[k]})" for k in changed)
        notes.append(f"warning: {shown} change the scale of the scores the thresholds were fitted on; {fix}")
    averaged = [m for m in methods if m.fittable and m.averages_fold_thresholds]
    if n_folds > 1 and averaged:
        notes.append(f"note: with {n_folds} folds the thresholds of {_names(averaged)} are the folds' thresholds "
                     f"averaged, which only approximates the false-alarm rate of the fold-averaged scores; {fix}")
    return notes


def calibration_limits(method: str) -> dict[str, Any]:
    """What a stored calibration of ``method`` may hold: its scores' range and special thresholds (an unknown
    method, e.g. from a newer plugin: anything)."""
    if method not in REGISTRY:
        return {}
    known = REGISTRY.get(method)
    return {"score_range": known.score_range, "special_thresholds": known.special_thresholds}


def named_calibration(model_folder: str, name: str, methods: Sequence[Method], model: Mapping[str, Any],
                      settings: Mapping[str, Any]) -> tuple[dict[str, MethodCalibration], list[str], SiteCalibration]:
    """The calibration ``name`` for the methods it covers, checked against the model; notes for the user; the
    calibration itself."""
    site = load_site_calibration(model_folder, name, calibration_limits)
    site.check_model(model)
    notes = []
    differences = site.setting_differences(settings)
    if differences:
        notes.append(f"warning: predicting with other settings than calibration {name} ({'; '.join(differences)})"
                     f": its thresholds do not fit these scores; re-run {CALIBRATE_COMMAND} --name {name} with "
                     "these settings")
    missing = [m for m in methods if m.name not in site.calibration]
    if missing:
        notes.append(f"note: calibration {name} does not cover {_names(missing)}; their thresholds are the fit's")
    return {m.name: site.calibration[m.name] for m in methods if m.name in site.calibration}, notes, site


def decision_rules(methods: Sequence[Method], states: Sequence[Any], site: SiteCalibration | None,
                   site_name: str | None) -> dict[str, DecisionRule]:
    """The accept/review rule of every method in use that predicts Dice (its own hook decides how)."""
    names = [m.name for m in methods]
    rules = {m.name: m.decision_rule([s.method_params.get(m.name, {}) for s in states], names, site, site_name)
             for m in methods if m.predicts_dice}
    return {m: r for m, r in rules.items() if r is not None}
