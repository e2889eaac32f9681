"""Fit the OOD detectors of one trained fold from its own training cases (shared by trainer and CLI).

0. With sd / latent_mahalanobis: the SD autoencoder is trained through the frozen U-Net
   (:mod:`nnunet_ood.sd_training`) on patches of the fold's training cases.
1. Every training case of the fold (nnU-Net's preprocessed data) goes through the same sliding window
   as at inference, encoder only; pooled bottleneck features (and AE latents) stream into the detectors.
2. Training and validation cases are scored exactly like at inference: their minimum and maximum
   give the normalisation, the 95th percentile of the validation scores the ID threshold.
3. The state is written atomically to ``fold_X/ood``; fitted methods not asked for this time are kept.
"""

from __future__ import annotations

import os
import platform
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.crossval_split import generate_crossval_split
from tqdm import tqdm

from nnunet_ood import __version__
from nnunet_ood.aggregation import CASE_AGGREGATIONS, aggregate_case_scores, predicted_foreground
from nnunet_ood.autoencoder import BottleneckAutoencoder
from nnunet_ood.cross_fitting import assign_parts, merge_parts
from nnunet_ood.detectors.base import FeatureDetector
from nnunet_ood.detectors.knn import KNNDetector
from nnunet_ood.detectors.mahalanobis import LatentMahalanobisDetector, MahalanobisDetector
from nnunet_ood.errors import OODError, OODInputError
from nnunet_ood.inference.predictor import nnUNetOODPredictor
from nnunet_ood.mc_dropout import MCDropoutConfig
from nnunet_ood.methods import (
    DEFAULT_FIT_METHODS,
    FEATURE_METHODS,
    FITTABLE_METHODS,
    INFERENCE_PASS_METHODS,
    needs_autoencoder,
    resolve_fit_methods,
)
from nnunet_ood.output_scores import fit_temperature
from nnunet_ood.sd_training import SDTrainingConfig, patch_batches, train_autoencoder
from nnunet_ood.state import FoldOODState, MethodCalibration, load_fold_state, save_fold_state

__all__ = ["FITTABLE_METHODS", "fit_fold", "fold_split", "make_detector"]

THRESHOLD_PERCENTILE = 95.0
#: parts of the training cases for cross-fitted (out-of-sample) training scores
CALIBRATION_PARTS = 5


#: k of the knn detector and its bank bound (nnUNetv2_fit_ood --knn_k / --knn_bank)
KNN_K = 1
KNN_BANK = 50_000


def make_detector(method: str, device: torch.device, knn_k: int = KNN_K, knn_bank: int = KNN_BANK) \
        -> FeatureDetector:
    """A fresh, unfitted detector for a method identifier."""
    if method == "mahalanobis":
        return MahalanobisDetector(device=device)
    if method == "knn":
        return KNNDetector(k=knn_k, max_bank_size=knn_bank, device=device)
    if method == "latent_mahalanobis":
        return LatentMahalanobisDetector(device=device)
    raise OODInputError(f"unknown OOD method {method!r}; choose from {', '.join(FITTABLE_METHODS)}")


def fold_split(preprocessed_dataset_folder_base: str, identifiers: Sequence[str],
               fold: int | str) -> tuple[list[str], list[str]]:
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


def _preprocessed_folders(predictor: nnUNetOODPredictor) -> tuple[str, str]:
    if not nnUNet_preprocessed.is_set():
        raise OODInputError("nnUNet_preprocessed is not set; fitting needs the fold's preprocessed training data "
                            "(export nnUNet_preprocessed=... as for nnUNetv2_train)")
    base = join(nnUNet_preprocessed.get(), predictor.plans_manager.dataset_name)
    data_folder = join(base, predictor.configuration_manager.data_identifier)
    if not isdir(data_folder) or not os.listdir(data_folder):
        raise OODInputError(f"no preprocessed data in {data_folder}; run nnUNetv2_plan_and_preprocess (or "
                            f"nnUNetv2_preprocess) for this dataset and configuration first")
    return base, data_folder


def _as_tensor(data) -> torch.Tensor:
    """A preprocessed case's image array (possibly memory-mapped) as a float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(data[:], dtype=np.float32)))


def _load_case(dataset, key: str) -> torch.Tensor:
    data, _, _, _ = dataset.load_case(key)
    return _as_tensor(data)


@contextmanager
def _mirroring_on(predictor: nnUNetOODPredictor):
    """Predict with nnU-Net's test-time mirroring, as default inference does (the fit's predictor has it off)."""
    mirroring, predictor.use_mirroring = predictor.use_mirroring, True
    try:
        yield predictor
    finally:
        predictor.use_mirroring = mirroring


def _train_sd(predictor: nnUNetOODPredictor, dataset_class, data_folder: str, train_keys: Sequence[str],
              val_keys: Sequence[str], config: SDTrainingConfig, device: torch.device, seed: int,
              progress: bool, fold: int | str) -> tuple[BottleneckAutoencoder, dict]:
    """Build the SD autoencoder for this network's bottleneck and train it through the frozen U-Net."""
    channels, *spatial = predictor.bottleneck_shape()
    torch.manual_seed(seed)
    autoencoder = BottleneckAutoencoder(channels, spatial, config.latent_dim, config.hidden_channels)
    generator = torch.Generator().manual_seed(seed)
    np.random.seed(seed)  # nnU-Net's sampler draws from numpy's global generator
    patch_size = predictor.configuration_manager.patch_size
    batch_size = config.batch_size or predictor.configuration_manager.batch_size
    mirror_axes = predictor.allowed_mirroring_axes or ()
    train = patch_batches(dataset_class(data_folder, list(train_keys)), predictor.label_manager, patch_size,
                          batch_size, mirror_axes, config.foreground_oversampling, generator)
    val_source = patch_batches(dataset_class(data_folder, list(val_keys)), predictor.label_manager, patch_size,
                               batch_size, (), config.foreground_oversampling, generator)
    val = [next(val_source) for _ in range(config.val_batches)]  # fixed: comparable from epoch to epoch
    started = time.time()
    history = train_autoencoder(predictor.network, autoencoder, train, val, config, device,
                                predictor.label_manager.has_regions, progress, f"fold {fold}: training SD autoencoder")
    history["seconds"] = round(time.time() - started, 2)
    best = history["best_epoch"]
    print(f"fold {fold} sd: autoencoder trained for {history['epochs_run']} epochs ({history['seconds']:.0f} s), "
          f"best validation loss {history['best_val_loss']:.4g} at epoch {best}; Dice between validation patches "
          f"segmented with and without it: {history['val_dice_with_without_ae'][best]:.3f}")
    return autoencoder, history


#: at most this many validation voxels (a seeded random subset) enter the temperature fit
TEMPERATURE_VOXELS = 1_000_000


def _fit_temperature(predictor: nnUNetOODPredictor, dataset, val_keys: Sequence[str], seed: int) -> dict:
    """Temperature of the ``temperature`` method: minimum NLL on voxels of the fold's validation cases.

    Logits come from nnU-Net's own prediction (sliding window, mirroring as at default inference).
    Voxels outside nnU-Net's nonzero region (label -1) and the ignore label are left out.
    """
    rng = np.random.default_rng(seed)
    labels = predictor.label_manager
    per_case = max(1, TEMPERATURE_VOXELS // max(1, len(val_keys)))
    rows, targets = [], []
    with _mirroring_on(predictor):
        for key in val_keys:
            data, seg, _, _ = dataset.load_case(key)
            logits = predictor.predict_logits_from_preprocessed_data(_as_tensor(data)).float().cpu()
            seg = np.asarray(seg[0]).ravel()
            valid = seg >= 0
            if labels.ignore_label is not None:
                valid &= seg != labels.ignore_label
            index = np.flatnonzero(valid)
            index = rng.choice(index, min(per_case, index.size), replace=False) if index.size else index
            rows.append(logits.reshape(logits.shape[0], -1)[:, torch.from_numpy(index)].T)
            if labels.has_regions:
                regions = [np.atleast_1d(r) for r in labels.foreground_regions]
                targets.append(torch.from_numpy(np.stack([np.isin(seg[index], r) for r in regions], 1)))
            else:
                targets.append(torch.from_numpy(seg[index].astype(np.int64)))
    t, nll_1, nll_t = fit_temperature(torch.cat(rows), torch.cat(targets), labels.has_regions)
    return {"temperature": t, "val_nll_at_1": nll_1, "val_nll": nll_t, "n_voxels": int(sum(r.shape[0] for r in rows))}


def _inference_scores(predictor: nnUNetOODPredictor, dataset, keys: Sequence[str], methods: Sequence[str],
                      autoencoder: BottleneckAutoencoder | None, method_params: dict, aggregations: dict[str, str],
                      progress: bool, description: str) -> dict[str, dict[str, float]]:
    """Case scores of ``methods`` for preprocessed cases, computed exactly as at inference (mirroring on)."""
    predictor.ood_states = [FoldOODState(fingerprint=predictor.fingerprint_for(0), detectors={},
                                         calibration={m: MethodCalibration(0.0, 1.0, float("inf"),
                                                                           aggregation=aggregations.get(m, "mean"))
                                                      for m in methods},
                                         autoencoder=autoencoder, method_params=method_params)]
    predictor.ood_methods = list(methods)
    predictor.ood_calibration = dict(predictor.ood_states[0].calibration)
    predictor.install_method_hooks()
    scores = {}
    try:
        with _mirroring_on(predictor):
            for key in tqdm(keys, desc=description, disable=not progress):
                predictor.predict_logits_from_preprocessed_data(_load_case(dataset, key))
                result = predictor.ood_results.pop()
                scores[key] = {m: result.scores[m]["score"] for m in methods}
    finally:
        predictor.ood_states, predictor.ood_methods, predictor.ood_calibration = [], [], {}
        predictor._install_hook()  # drops the SD hooks again
    return scores


def _can_score(detector: FeatureDetector) -> bool:
    """Fitted, and (knn) with at least k training rows."""
    return detector.is_fitted and getattr(detector, "bank_size_", 1) >= getattr(detector, "k", 1)


def _predicted_foreground(predictor: nnUNetOODPredictor, data: torch.Tensor) -> torch.Tensor:
    """nnU-Net's predicted foreground of a preprocessed case (its own prediction, mirroring as at inference)."""
    with _mirroring_on(predictor):
        logits = predictor.predict_logits_from_preprocessed_data(data)
    return predicted_foreground(logits, predictor.label_manager.has_regions)


def _kept_state(fold_dir: str, predictor: nnUNetOODPredictor, refit: Sequence[str]) -> FoldOODState | None:
    """The fold's existing state without the methods being re-fitted (None if absent or for another model)."""
    try:
        old = load_fold_state(fold_dir, predictor.fingerprint_for(0), device="cpu")
    except OODError:
        return None
    keep = [m for m in old.methods if m not in refit and not (needs_autoencoder([m]) and needs_autoencoder(refit))]
    if not keep:
        return None
    return FoldOODState(fingerprint=old.fingerprint, detectors={m: d for m, d in old.detectors.items() if m in keep},
                        calibration={m: old.calibration[m] for m in keep}, provenance=old.provenance,
                        autoencoder=old.autoencoder if needs_autoencoder(keep) else None,
                        method_params={m: p for m, p in old.method_params.items() if m in keep})


def fit_fold(model_folder: str, fold: int | str, checkpoint_name: str = "checkpoint_final.pth",
             methods: Sequence[str] = DEFAULT_FIT_METHODS, device: torch.device | str = "cpu", seed: int = 0,
             progress: bool = True, batch_size: int = 4, calibration_parts: int = CALIBRATION_PARTS,
             sd_config: SDTrainingConfig | None = None, knn_k: int = KNN_K, knn_bank: int = KNN_BANK,
             aggregations: dict[str, str] | None = None, mc_dropout_config: MCDropoutConfig | None = None) \
        -> FoldOODState:
    """Fit, calibrate and store (``fold_X/ood``) the OOD methods of one fold of a trained model.

    Training case scores for the normalisation of the feature methods are cross-fitted over
    ``calibration_parts`` parts of the training cases (see :mod:`nnunet_ood.cross_fitting`); 1 gives the
    paper's in-sample scores. Memory: one detector per part during the fit (for Mahalanobis, K + 4
    matrices of D x D float64). ``sd`` and ``latent_mahalanobis`` share one autoencoder, trained with
    ``sd_config``; its training scores are in-sample (one AE per part would multiply the training time).
    Methods already fitted for this model and not in ``methods`` are kept.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    np.random.seed(seed)
    order = resolve_fit_methods(methods)
    aggregations = dict(aggregations or {})
    bad = {m: a for m, a in aggregations.items() if m not in order or a not in CASE_AGGREGATIONS}
    if bad:
        raise OODInputError(f"cannot aggregate {bad}: methods must be among those fitted ({', '.join(order)}) and "
                            f"aggregations one of {', '.join(CASE_AGGREGATIONS)}")
    fold = fold if fold == "all" else int(fold)
    fold_dir = join(model_folder, f"fold_{fold}")
    if not isfile(join(fold_dir, checkpoint_name)):
        raise OODInputError(f"no checkpoint {checkpoint_name} in {fold_dir}; "
                            "train this fold first or pick another with -chk")
    started = time.time()
    predictor = nnUNetOODPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                   perform_everything_on_device=True, device=device, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, [fold], checkpoint_name, load_ood_state=False)
    if predictor.configuration_manager.previous_stage_name is not None:
        raise OODInputError("cascaded configurations (3d_cascade_fullres) are not supported yet; fit 3d_fullres, "
                            "3d_lowres or 2d instead")
    base, data_folder = _preprocessed_folders(predictor)
    dataset_class = infer_dataset_class(data_folder)
    train_keys, val_keys = fold_split(base, dataset_class.get_identifiers(data_folder), fold)
    if fold == "all":
        warnings.warn("fold 'all' has no held-out cases: the OOD threshold is the 95th percentile of training "
                      "case scores, which underestimates the ID false-positive rate", stacklevel=2)
    if "tta" in order and not predictor.allowed_mirroring_axes:
        print(f"fold {fold}: this model has no mirror axes, so tta (disagreement of mirrored passes) is not fitted")
        order.remove("tta")
    kept = _kept_state(fold_dir, predictor, order)
    dataset = dataset_class(data_folder, sorted(set(train_keys) | set(val_keys)))
    provenance: dict = {}
    autoencoder = None
    if needs_autoencoder(order):
        autoencoder, provenance["sd_training"] = _train_sd(
            predictor, dataset_class, data_folder, train_keys, val_keys, sd_config or SDTrainingConfig(), device,
            seed, progress, fold)
    features_of = {m: FEATURE_METHODS[m] for m in order if m in FEATURE_METHODS}

    # pass 1: one detector per part of the training cases; the fold's detector is their exact merge
    parts = assign_parts(train_keys, calibration_parts if fold != "all" else 1, seed)
    n_parts = max(parts.values()) + 1
    def new(method: str) -> FeatureDetector:
        return make_detector(method, device, knn_k, knn_bank)

    part_detectors = {m: [new(m) for _ in range(n_parts)] for m in features_of}
    n_patches = 0
    for key in tqdm(train_keys, desc=f"fold {fold}: fitting {', '.join(features_of)}", disable=not progress):
        features, _ = predictor.extract_patch_features(_load_case(dataset, key), batch_size, autoencoder)
        n_patches += features["bottleneck"].shape[0]
        for m, kind in features_of.items():
            part_detectors[m][parts[key]].partial_fit(features[kind])
    detectors = {m: merge_parts(part_detectors[m], new(m)) for m in features_of}
    for m, detector in detectors.items():
        if isinstance(detector, MahalanobisDetector) and detector.n_features_in_ > n_patches:
            print(f"fold {fold} {m}: {n_patches} training patches for {detector.n_features_in_} features: the "
                  "covariance rests on its shrinkage; more training cases (or patches) make the detector sharper")

    # pass 2: validation cases by the fold's detector; each part's training cases by the other parts
    feature_aggregations = [aggregations.get(m, "mean") for m in features_of]

    def score_case(key: str, by: dict[str, FeatureDetector]) -> dict[str, float]:
        data = _load_case(dataset, key)
        features, layout = predictor.extract_patch_features(data, batch_size, autoencoder)
        patch_scores = torch.stack([by[m].score(features[kind]) for m, kind in features_of.items()], dim=1)
        maps = predictor.patch_score_maps(patch_scores, layout)
        foreground = _predicted_foreground(predictor, data) if "foreground_mean" in feature_aggregations else None
        return dict(zip(features_of, aggregate_case_scores(maps, feature_aggregations, layout, foreground).tolist()))

    case_scores: dict[str, dict[str, float]] = {k: {} for k in [*train_keys, *val_keys]}
    if features_of:
        with tqdm(total=len(train_keys) + len(val_keys), desc=f"fold {fold}: calibrating",
                  disable=not progress) as bar:
            for key in val_keys:
                case_scores[key].update(score_case(key, detectors))
                bar.update()
            for k in range(n_parts):
                held_out, others = detectors, None  # one part, or nothing left without part k: in-sample scores
                if n_parts > 1:
                    others = {m: merge_parts(part_detectors[m], new(m), skip=k) for m in features_of}
                    if all(_can_score(d) for d in others.values()):
                        held_out = others
                for key in (key for key in train_keys if parts[key] == k):
                    case_scores[key].update(score_case(key, held_out))
                    bar.update()
                del held_out, others  # free part k's held-out detector before building the next
    del part_detectors

    # pass 3: methods that need the whole network, scored by the predictor's own inference path
    inference_methods = [m for m in order if m in INFERENCE_PASS_METHODS]
    method_params: dict[str, dict] = {}
    if "temperature" in order:
        method_params["temperature"] = _fit_temperature(predictor, dataset, val_keys, seed)
        provenance["temperature"] = method_params["temperature"]
        t = method_params["temperature"]
        print(f"fold {fold} temperature: T = {t['temperature']:.3f} lowers the validation NLL from "
              f"{t['val_nll_at_1']:.4f} to {t['val_nll']:.4f} ({t['n_voxels']} voxels)")
    if "mc_dropout" in order:
        method_params["mc_dropout"] = (mc_dropout_config or MCDropoutConfig(seed=seed)).to_json()
    if inference_methods:
        scores = _inference_scores(predictor, dataset, [*val_keys, *train_keys], inference_methods, autoencoder,
                                   method_params, aggregations, progress,
                                   f"fold {fold}: calibrating {', '.join(inference_methods)}")
        for key, values in scores.items():
            case_scores[key].update(values)
    if "sd" in order:
        agreement = {key: predictor.autoencoder_agreement(_load_case(dataset, key), autoencoder, batch_size)
                     for key in val_keys}
        provenance["sd_val_dice_with_without_ae"] = agreement
        print(f"fold {fold} sd: Dice between the segmentations of the {len(val_keys)} validation cases with and "
              f"without the autoencoder: mean {np.mean(list(agreement.values())):.4f}, min "
              f"{np.min(list(agreement.values())):.4f} (the method assumes this is close to 1)")

    calibration = {
        m: MethodCalibration.from_scores([case_scores[k][m] for k in train_keys],
                                         [case_scores[k][m] for k in val_keys], THRESHOLD_PERCENTILE,
                                         aggregations.get(m, "mean"))
        for m in order
    }
    if kept is not None:  # keep what was fitted before and not re-fitted now, in table order
        detectors, calibration = {**kept.detectors, **detectors}, {**kept.calibration, **calibration}
        autoencoder = autoencoder or kept.autoencoder
        method_params = {**kept.method_params, **method_params}
        calibration = {m: calibration[m] for m in FITTABLE_METHODS if m in calibration}
        provenance = {**{k: v for k, v in kept.provenance.items() if k.startswith("sd_") and "sd" not in order},
                      **provenance}
    state = FoldOODState(
        fingerprint=predictor.fingerprint_for(0),
        detectors=detectors,
        calibration=calibration,
        autoencoder=autoencoder,
        method_params=method_params,
        provenance={"plugin_version": __version__, "torch_version": torch.__version__, "device": str(device),
                    "host": platform.node(), "seed": seed, "n_train_cases": len(train_keys),
                    "n_val_cases": len(val_keys), "n_train_patches": n_patches,
                    "feature_dim": {m: d.n_features_in_ for m, d in detectors.items()},
                    "threshold_percentile": THRESHOLD_PERCENTILE, "calibration_parts": n_parts,
                    "methods_fitted_now": order, "fit_seconds": round(time.time() - started, 2),
                    "train_case_scores": {k: [case_scores[k][m] for m in order] for k in train_keys},
                    "val_case_scores": {k: [case_scores[k][m] for m in order] for k in val_keys},
                    **provenance},
    )
    where = save_fold_state(fold_dir, state)
    for m in order:
        c = calibration[m]
        print(f"fold {fold} {m}: {n_patches} training patches from {len(train_keys)} cases, "
              f"threshold {c.threshold:.4g} (95th percentile of {len(val_keys)} validation cases), "
              f"normalisation [{c.low:.4g}, {c.high:.4g}] -> {where}")
    return state
