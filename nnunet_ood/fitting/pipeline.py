"""``fit_fold``: fit, calibrate and store the OOD methods of one trained fold (shared by trainer and CLI).

The passes (:mod:`nnunet_ood.fitting.passes`), in order:

0. ``shared models``: the models several methods share (``Requirements.shared``), each trained once.
1. ``parameters``: each method's own parameters that need no prediction (the dropout configuration).
2. ``feature statistics``: the fold's training cases go through the same sliding window as at inference,
   encoder only (at most ``max_patches`` patches, a seeded sample); feature vectors stream into the
   detectors. With ``normalization_cases`` N > 0, one detector per part of the training cases (the fold's
   is their exact merge), and N training cases are scored by the other parts' detectors (cross-fitting)
   for the feature methods' normalisation bounds.
3. ``validation``: every validation case is predicted once, as nnU-Net validates the fold, and every
   method is scored by the case scorer used at inference; methods fitted on the validation logits (the
   temperature) are fitted and scored afterwards. Validation scores give every threshold and, by
   default, every normalisation: they are out of sample, where training cases are in-sample for the
   network (output-based scores) and for the detectors.
4. ``reports``: checks recorded in the provenance (``Method.fit_report``).

The cost is nnU-Net's validation of the fold plus an encoder-only pass over (a sample of) the training
patches, plus the shared models' training. The state is written atomically to ``fold_X/ood``; fitted
methods not asked for this time are kept as they were.
"""

from __future__ import annotations

import dataclasses
import platform
import time
import warnings

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunet_ood import __version__
from nnunet_ood.calibration import FALSE_ALARM_RATE, MethodCalibration, min_cases_for
from nnunet_ood.detectors.cross_fitting import assign_parts, merge_parts
from nnunet_ood.detectors.mahalanobis import MahalanobisDetector
from nnunet_ood.errors import OODError, OODInputError
from nnunet_ood.fitting.failure_table import FailureTableBuilder
from nnunet_ood.fitting.options import FitOptions
from nnunet_ood.fitting.passes import (
    EncoderPass,
    feature_statistics_pass,
    parameter_pass,
    shared_model_pass,
    training_case_scores,
    validation_logit_pass,
    validation_pass,
)
from nnunet_ood.fitting.split import fold_split, preprocessed_folders
from nnunet_ood.fold_state import FoldOODState, check_fingerprint, load_fold_state, read_manifest, save_fold_state
from nnunet_ood.folds import Fold, parse_fold
from nnunet_ood.inference.predictor import nnUNetOODPredictor
from nnunet_ood.methods import FIT_COMMAND, REGISTRY, FoldModels, Method, MethodKind
from nnunet_ood.methods.context import FitContext
from nnunet_ood.methods.shared import required_shared_models, shares_with
from nnunet_ood.quality.properties import stored_label_manager

#: provenance entries that hold one value per method (merged method by method on a partial refit)
PER_METHOD_PROVENANCE = ("train_case_scores", "val_case_scores", "feature_dim")


def _fold_predictor(model_folder: str, fold: Fold, options: FitOptions) -> nnUNetOODPredictor:
    """The fold's network in a predictor without OOD state (sliding window as at inference, no mirroring)."""
    predictor = nnUNetOODPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                   perform_everything_on_device=True, device=torch.device(options.device),
                                   allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, [fold], options.checkpoint, load_ood_state=False)
    if predictor.configuration_manager.previous_stage_name is not None:
        raise OODInputError("cascaded configurations (3d_cascade_fullres) are not supported yet; fit 3d_fullres, "
                            "3d_lowres or 2d instead")
    return predictor


def _kept_state(fold_dir: str, predictor: nnUNetOODPredictor, refit: list[Method]) -> FoldOODState | None:
    """The fold's existing state without the methods being re-fitted (None if absent or for another model).

    Methods whose state can no longer be read (e.g. an older feature format) are not kept; a note says so.
    """
    try:
        manifest = read_manifest(fold_dir)
        check_fingerprint(manifest["fingerprint"], predictor.fingerprint_for(0), fold_dir)
    except OODError:
        return None
    refit_names = {r.name for r in refit}
    candidates = []
    for m, entry in manifest["methods"].items():
        if m in refit_names or shares_with(REGISTRY.get(m), refit):  # a shared model trained again is new to all
            continue
        if refit_names & set(REGISTRY.get(m).inputs_of(entry.get("config") or {})):
            print(f"{fold_dir}: the fitted {m} is dropped: it reads the scores of methods fitted again now; fit it "
                  f"again with them ({FIT_COMMAND} --ood ... {m})")
            continue
        candidates.append(m)
    keep = []
    for name in candidates:
        try:
            load_fold_state(fold_dir, None, [name], device="cpu")
            keep.append(name)
        except OODError as e:
            print(f"{fold_dir}: the fitted {name} is dropped ({e})")
    if not keep:
        return None
    return load_fold_state(fold_dir, None, keep, device="cpu")


def _merge_kept(state: FoldOODState, kept: FoldOODState | None) -> FoldOODState:
    """Add what was fitted before and not re-fitted now, exactly as it was; table order."""
    if kept is None:
        return state
    calibration = {**kept.calibration, **state.calibration}
    provenance = {**{k: v for k, v in kept.provenance.items() if k not in PER_METHOD_PROVENANCE}, **state.provenance}
    for key in PER_METHOD_PROVENANCE:
        old = kept.provenance.get(key)
        old = {m: v for m, v in old.items() if m in kept.calibration} if isinstance(old, dict) else {}
        provenance[key] = {**old, **state.provenance.get(key, {})}
    return FoldOODState(detectors={**kept.detectors, **state.detectors},
                        shared={**kept.shared, **state.shared},
                        method_params={**kept.method_params, **state.method_params},
                        fingerprint=state.fingerprint,
                        calibration={m.name: calibration[m.name] for m in REGISTRY if m.name in calibration},
                        provenance=provenance)


def _fit_context(model_folder: str, fold: Fold, options: FitOptions) -> FitContext:
    """The fold's predictor and cases; one-line errors for a missing checkpoint or preprocessed data."""
    fold_dir = join(model_folder, f"fold_{fold}")
    if not isfile(join(fold_dir, options.checkpoint)):
        raise OODInputError(f"no checkpoint {options.checkpoint} in {fold_dir}; "
                            "train this fold first or pick another with -chk")
    predictor = _fold_predictor(model_folder, fold, options)
    for config_class in REGISTRY.config_classes("fit"):  # every method's options, also of methods not fitted
        check = getattr(options.config(config_class), "check_network", None)
        if check is not None:
            check(predictor.network)
    base, data_folder = preprocessed_folders(predictor.plans_manager.dataset_name,
                                             predictor.configuration_manager.data_identifier)
    dataset_class = infer_dataset_class(data_folder)
    train_keys, val_keys = fold_split(base, dataset_class.get_identifiers(data_folder), fold)
    if fold == "all":
        warnings.warn("fold 'all' has no held-out cases: the OOD threshold is the 95th percentile of training "
                      "case scores, which underestimates the ID false-positive rate", stacklevel=3)
    return FitContext(predictor, options, fold, dataset_class, data_folder, list(train_keys), list(val_keys))


def _methods_to_fit(context: FitContext) -> list[Method]:
    """The requested methods this model can have (methods needing mirrored passes need mirror axes)."""
    methods = REGISTRY.in_order(context.options.methods)
    if not context.predictor.allowed_mirroring_axes:
        for m in [m for m in methods if m.requires.mirroring]:
            context.log(f"this model has no mirror axes, so {m.name} (it needs mirrored passes) is not fitted")
            methods.remove(m)
    if not context.val_keys:
        for m in [m for m in methods if m.needs_failure_table]:
            context.log(f"has no validation cases, so {m.name} (it learns from them) is not fitted")
            methods.remove(m)
    return methods


def _run_passes(context: FitContext, methods: list[Method]) -> tuple[FoldModels, dict, dict, dict]:
    """Every pass of the fit: ``(models, training case scores, validation case scores, provenance)``.

    Training case scores exist for the feature methods only (cross-fitted, a sample of cases).
    """
    models, aggregations = FoldModels(), dict(context.options.aggregations)
    models.shared, provenance = shared_model_pass(context, required_shared_models(methods))
    late = [m for m in methods if m.needs_validation_logits]
    models.method_params = parameter_pass(context, [m for m in methods if m not in late])
    features = [m for m in methods if m.kind is MethodKind.PATCH_FEATURES]
    started = time.perf_counter()
    train_scores = _feature_passes(context, features, models, aggregations, provenance) if features else {}
    seconds = {"features": round(time.perf_counter() - started, 2)}
    table_methods = [m for m in methods if m.needs_failure_table]
    inputs = [m for m in methods if m not in table_methods and m.kind is not MethodKind.DERIVED]
    builder = FailureTableBuilder(context, [m.name for m in inputs]) if table_methods else None
    started = time.perf_counter()
    val_scores = _validation_passes(context, [m for m in methods if m not in late and m not in table_methods], late,
                                    models, aggregations, builder)
    seconds["validation"] = round(time.perf_counter() - started, 2)
    if builder is not None:  # the failure table: clean rows from above, corrupted versions predicted now
        provenance["failure_table"], seconds["failure_table"] = _failure_table_pass(
            context, table_methods, inputs, builder, models, aggregations, val_scores)
    # each pass's cost: the feature pass (encoder on the training patches), the validation pass, and the failure
    # table next to the validation pass it repeats
    provenance["pass_seconds"] = seconds
    for m in methods:
        provenance.update(m.fit_report(context, models))
    return models, train_scores, val_scores, provenance


def _feature_passes(context: FitContext, features: list[Method], models: FoldModels, aggregations: dict[str, str],
                    provenance: dict) -> dict[str, dict[str, float]]:
    """The feature detectors (into ``models.detectors``) from the training patches, and the cross-fitted case scores
    of up to ``normalization_cases`` training cases (returned); the patch and case counts go into ``provenance``."""
    options = context.options
    cross_fitted = options.normalization_cases > 0 and context.fold != "all"
    parts = assign_parts(context.train_keys, options.calibration_parts if cross_fitted else 1, options.seed)
    n_parts = max(parts.values()) + 1
    rng = np.random.default_rng(options.seed)
    kept = set(rng.permutation(sorted(context.train_keys))[:options.normalization_cases].tolist())
    encoder = EncoderPass(context)
    try:
        stats = feature_statistics_pass(context, encoder, features, models, parts, n_parts, kept)
    finally:
        encoder.remove()
    models.detectors = {m.name: stats.part_detectors[m.name][0] if n_parts == 1 else
                        merge_parts(stats.part_detectors[m.name], m.new_detector(options, context.device))
                        for m in features}
    _note_few_patches(context, models, stats.n_patches)
    train_scores = {}
    if kept:
        train_scores = training_case_scores(context, features, models, stats, parts, n_parts, aggregations)
    provenance.update(calibration_parts=n_parts, n_train_patches=stats.n_patches,
                      n_train_patches_total=stats.n_total_patches, normalization_cases=len(kept))
    return train_scores


def _validation_passes(context: FitContext, methods: list[Method], late: list[Method], models: FoldModels,
                       aggregations: dict[str, str],
                       builder: FailureTableBuilder | None) -> dict[str, dict[str, float]]:
    """Validation case scores: ``methods`` from one prediction of each case (its logits also give the failure
    table's clean rows), then the ``late`` methods fitted on and scored from the kept logits. Closes the context's
    cases."""
    try:
        val_scores = validation_pass(context, methods, models, aggregations, keep_logits=bool(late),
                                     on_logits=builder.clean_row if builder else None)
        if late:
            for key, scores in validation_logit_pass(context, late, models, aggregations).items():
                val_scores[key].update(scores)
    finally:
        context.close()
    return val_scores


def _failure_table_pass(context: FitContext, table_methods: list[Method], inputs: list[Method],
                        builder: FailureTableBuilder, models: FoldModels, aggregations: dict[str, str],
                        val_scores: dict[str, dict[str, float]]) -> tuple[dict[str, int], float]:
    """The failure table's corrupted rows, predicted with the ``inputs`` scored; the methods that learn from it fitted
    on it, their validation case scores added to ``val_scores``. Returns the table's size for the provenance and
    the seconds its rows took."""
    started = time.perf_counter()
    wanted = [m.failure_table_versions(context.options) for m in table_methods]
    builder.corrupted_rows(inputs, models, aggregations, max(w[0] for w in wanted), max(w[1] for w in wanted))
    table = builder.table(val_scores)
    seconds = round(time.perf_counter() - started, 2)
    for m in table_methods:
        clean = m.fit_on_failure_table(context, models, table, [i.name for i in inputs],
                                       stored_label_manager(context.label_manager), builder.reference)
        for key, value in clean.items():
            val_scores[key][m.name] = value
    return {"rows": len(table), "cases": len(context.val_keys)}, seconds


def _note_few_patches(context: FitContext, models: FoldModels, n_patches: int) -> None:
    for name, detector in models.detectors.items():
        if isinstance(detector, MahalanobisDetector) and detector.n_features_in_ > n_patches:
            context.log(f"{name}: {n_patches} training patches for {detector.n_features_in_} features: the "
                        "covariance rests on its shrinkage; more training cases (or patches) make the detector sharper")


def fit_fold(model_folder: str, fold: Fold, options: FitOptions | None = None) -> FoldOODState:
    """Fit, calibrate and store (``fold_X/ood``) the OOD methods of one fold of a trained model.

    Training case scores for the normalisation of the feature methods are cross-fitted over
    ``options.calibration_parts`` parts of the training cases (see :mod:`nnunet_ood.detectors.cross_fitting`);
    1 gives the paper's in-sample scores. Memory: one detector per part during the fit (for Mahalanobis,
    K + 4 matrices of D x D float64). Shared models are trained once, on every training case (one per part would
    multiply the training time). Methods already fitted for this model and not re-fitted are kept.
    """
    options = options or FitOptions()
    fold = parse_fold(fold)
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    started = time.time()
    context = _fit_context(model_folder, fold, options)
    methods = _methods_to_fit(context)
    fold_dir = join(model_folder, f"fold_{fold}")
    kept = _kept_state(fold_dir, context.predictor, methods)
    models, train_scores, val_scores, provenance = _run_passes(context, methods)
    names, train, val = [m.name for m in methods], sorted(train_scores), context.val_keys
    calibration, own_calibration = {}, set()
    for m in methods:  # bounds from the validation cases, or from cross-fitted training cases (feature methods)
        own = m.fold_calibration(models.method_params.get(m.name, {}))
        if own is not None:
            calibration[m.name], own_calibration = own, own_calibration | {m.name}
            continue
        bounds_from = [train_scores[k][m.name] for k in train] if train and m.kind is MethodKind.PATCH_FEATURES \
            else [val_scores[k][m.name] for k in val]
        calibration[m.name] = MethodCalibration.from_scores(bounds_from, [val_scores[k][m.name] for k in val],
                                                            FALSE_ALARM_RATE, options.aggregations.get(m.name, "mean"))
    if len(val) < min_cases_for(FALSE_ALARM_RATE):
        context.log(f"has {len(val)} validation cases, too few for a false-alarm rate of {FALSE_ALARM_RATE:g} (needs "
                    f"{min_cases_for(FALSE_ALARM_RATE)}): thresholds are the largest validation score, bounding the "
                    f"rate by 1/{len(val) + 1} only; calibrate on more cases with nnUNetv2_calibrate_ood")
    state = FoldOODState(
        detectors=models.detectors, shared=models.shared, method_params=models.method_params,
        fingerprint=context.predictor.fingerprint_for(0), calibration=calibration,
        provenance={"plugin_version": __version__, "torch_version": torch.__version__, "device": str(options.device),
                    "host": platform.node(), "seed": options.seed, "n_train_cases": len(context.train_keys),
                    "n_val_cases": len(val), "false_alarm_rate": FALSE_ALARM_RATE,
                    "methods_fitted_now": names, "fit_seconds": round(time.time() - started, 2),
                    "feature_dim": {m: d.n_features_in_ for m, d in models.detectors.items()},
                    "train_case_scores": {m: {k: train_scores[k][m] for k in train} for m in names
                                          if train and m in train_scores[train[0]]},
                    "val_case_scores": {m: {k: val_scores[k][m] for k in val} for m in names},
                    "options": _options_record(options), **provenance})
    state = _merge_kept(state, kept)
    where = save_fold_state(fold_dir, state)
    for m in names:
        c = calibration[m]
        if m in own_calibration:
            context.log(f"{m}: threshold {c.threshold:.4g} from its own fit (rate {c.false_alarm_rate:g} on "
                        f"{c.n_val_cases} validation cases) -> {where}")
            continue
        context.log(f"{m}: threshold {c.threshold:.4g} "
                    f"(false-alarm rate {FALSE_ALARM_RATE:g} on {len(val)} validation cases), normalisation "
                    f"[{c.low:.4g}, {c.high:.4g}] -> {where}")
    return state


def _options_record(options: FitOptions) -> dict:
    """The fit options as JSON (method configs by key)."""
    from nnunet_ood.methods.options import config_to_json

    record = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name != "method_configs"}
    record["device"] = str(record["device"])
    record["aggregations"] = dict(record["aggregations"])
    record["method_configs"] = {k: config_to_json(v) for k, v in options.method_configs.items()}
    return record
