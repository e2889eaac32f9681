"""``nnUNetOODPredictor``: nnU-Net's predictor with OOD scores computed inside its sliding window.

Integration is by overriding nnUNetPredictor's hook methods, each of which calls the original:

* ``_internal_maybe_mirror_and_predict``: arms a forward hook on the bottleneck before nnU-Net's
  first (un-mirrored) forward pass of a patch and pools what it captured;
* ``_internal_predict_sliding_window_return_logits``: scores the patches of one fold with that fold's
  detectors and remembers nnU-Net's slicers;
* ``predict_sliding_window_return_logits``: counts folds (nnU-Net runs it once per fold);
* ``predict_logits_from_preprocessed_data``: averages the folds' patch scores, spreads them into voxel
  maps with nnU-Net's Gaussian weighting and stores the case's scores and maps.

With the Segmentation Distortion autoencoder loaded (``sd``, ``latent_mahalanobis``), the un-mirrored
forward pass of each patch also runs the AE on the bottleneck and the decoder on its reconstruction
(:mod:`nnunet_ood.distortion`); the per-patch SD maps are accumulated with the Gaussian weighting.

Logits, and therefore segmentations, are produced by nnU-Net's own code and are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

from nnunet_ood import __version__
from nnunet_ood.aggregation import (
    PatchMapAccumulator,
    SlidingWindowLayout,
    aggregate_case_scores,
    importance_weights,
    patch_scores_to_maps,
    predicted_foreground,
    revert_padding_slicer,
)
from nnunet_ood.autoencoder import BottleneckAutoencoder
from nnunet_ood.distortion import AutoencoderInsertion, segmentation_distortion
from nnunet_ood.ensemble import ENSEMBLE_METHODS, EnsembleAccumulator
from nnunet_ood.errors import OODStateError
from nnunet_ood.features import BottleneckCapture, pool_features, unwrap_network
from nnunet_ood.maps_io import export_ood_maps, map_file_ending, map_filename
from nnunet_ood.mc_dropout import PostHocDropout, config_from_params
from nnunet_ood.methods import FEATURE_METHODS, LOGIT_METHODS, VOXEL_METHODS, needs_autoencoder
from nnunet_ood.output_scores import logit_uncertainty
from nnunet_ood.scores_io import collect_records, has_case_record, write_case_record, write_score_tables
from nnunet_ood.sd_training import segmentation_agreement
from nnunet_ood.state import FoldOODState, MethodCalibration, load_fold_state, model_fingerprint
from nnunet_ood.tta import MirroredPassDisagreement


@dataclass
class CaseOODResult:
    """OOD outcome of one case: per-method case score, normalised score and flag; maps in preprocessed space."""

    case: str
    scores: dict[str, dict[str, Any]]
    maps: np.ndarray | None = None  # (M, *preprocessed_shape) float32
    methods: list[str] = field(default_factory=list)


def combine_calibrations(calibrations: Sequence[MethodCalibration]) -> MethodCalibration:
    """Ensembles average per-patch scores over folds, so bounds and threshold are averaged the same way."""
    n = len(calibrations)
    if len({c.aggregation for c in calibrations}) > 1:
        raise OODStateError("the folds' OOD states aggregate a method's map to case scores differently; re-fit "
                            "them with the same --ood_aggregation")
    return MethodCalibration(low=sum(c.low for c in calibrations) / n, high=sum(c.high for c in calibrations) / n,
                             threshold=sum(c.threshold for c in calibrations) / n,
                             n_train_cases=sum(c.n_train_cases for c in calibrations),
                             n_val_cases=sum(c.n_val_cases for c in calibrations),
                             aggregation=calibrations[0].aggregation)


class _RecordingPreprocessor:
    """Wraps nnU-Net's preprocessor to hand each case's properties to the predictor (sequential mode)."""

    def __init__(self, inner: Any, on_case: Any) -> None:
        self._inner, self._on_case = inner, on_case

    def run_case(self, image_files, *args, **kwargs):
        data, seg, properties = self._inner.run_case(image_files, *args, **kwargs)
        self._on_case(image_files, properties)
        return data, seg, properties

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _RecordingConfigurationManager(ConfigurationManager):
    """The same configuration, but its preprocessor reports the properties of every case it preprocesses."""

    def __init__(self, configuration_manager: ConfigurationManager, on_case: Any) -> None:
        super().__init__(configuration_manager.configuration)
        self._on_case = on_case

    @property
    def preprocessor_class(self):
        real_class, on_case = super().preprocessor_class, self._on_case
        return lambda *args, **kwargs: _RecordingPreprocessor(real_class(*args, **kwargs), on_case)


class nnUNetOODPredictor(nnUNetPredictor):
    """nnUNetPredictor that also produces per-case OOD scores and, optionally, per-voxel OOD maps.

    Use it exactly like ``nnUNetPredictor``. After ``initialize_from_trained_model_folder`` the fitted
    OOD state of every fold is loaded (``fold_X/ood``); without any, it behaves like the stock predictor
    only if ``require_ood_state=False``. With files as output, scores go to ``ood_scores.csv``/``.json``
    in the output folder; with in-memory prediction they are appended to ``self.ood_results``.
    """

    def __init__(self, tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True,
                 perform_everything_on_device: bool = True, device: torch.device = torch.device("cuda"),
                 verbose: bool = False, verbose_preprocessing: bool = False, allow_tqdm: bool = True,
                 ood_methods: Sequence[str] | None = None, save_ood_maps: bool = False,
                 sd_batched_decoder: bool = False) -> None:
        super().__init__(tile_step_size, use_gaussian, use_mirroring, perform_everything_on_device, device, verbose,
                         verbose_preprocessing, allow_tqdm)
        self.requested_ood_methods = list(ood_methods) if ood_methods else None
        self.save_ood_maps = save_ood_maps
        self.ood_states: list[FoldOODState] = []
        self.ood_methods: list[str] = []
        self.ood_calibration: dict[str, MethodCalibration] = {}
        self.ood_results: list[CaseOODResult] = []
        self.model_folder: str | None = None
        self.use_folds: list[int | str] = []
        self.checkpoint_name = "checkpoint_final.pth"
        self._capture: BottleneckCapture | None = None
        #: decoder on [x; r(x)] in one call (faster on a GPU, logits equal to stock up to float rounding)
        self.sd_batched_decoder = sd_batched_decoder
        self._sd: AutoencoderInsertion | None = None
        self._voxel_accumulator: PatchMapAccumulator | None = None
        self._tta: MirroredPassDisagreement | None = None
        self._ensemble: EnsembleAccumulator | None = None
        self._mc_dropout: PostHocDropout | None = None
        self._slicers: Sequence = ()
        self._patch_index = 0
        self._patch_latents: list[torch.Tensor] = []
        self._case_voxel_maps: list[torch.Tensor] = []
        self._collecting = False  # True while nnU-Net predicts a case with OOD on
        self._fold_index = 0
        self._case_input_finite = True
        self._patch_features: list[torch.Tensor] = []
        self._case_patch_scores: list[torch.Tensor] = []
        self._case_layout: SlidingWindowLayout | None = None
        self._input_shape: tuple[int, ...] = ()
        self._current_case: dict | None = None
        self._sequential_outputs: dict[tuple[str, ...], str] = {}
        self._map_pool: ProcessPoolExecutor | None = None
        self._map_futures: list[Future] = []
        self._run: dict[str, Any] | None = None

    # ------------------------------------------------------------------ set-up
    def initialize_from_trained_model_folder(self, model_training_output_dir: str,
                                             use_folds: tuple[int | str, ...] | list | str | None,
                                             checkpoint_name: str = "checkpoint_final.pth",
                                             load_ood_state: bool = True) -> None:
        """nnU-Net's initialisation, then the OOD state of each fold (unless ``load_ood_state=False``)."""
        if use_folds is None:
            use_folds = nnUNetPredictor.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        if isinstance(use_folds, (str, int)):
            use_folds = [use_folds]
        self.use_folds = [f if f == "all" else int(f) for f in use_folds]
        super().initialize_from_trained_model_folder(model_training_output_dir, self.use_folds, checkpoint_name)
        self.model_folder = os.path.abspath(model_training_output_dir)
        self.checkpoint_name = checkpoint_name
        self._install_hook()
        if load_ood_state:
            self.load_ood_state()

    def _install_hook(self) -> None:
        if self._capture is not None:
            self._capture.remove()
        self._capture = BottleneckCapture(self.network)
        if self._sd is not None:
            self._sd.remove()
            self._sd = None
        if self._tta is not None:
            self._tta.remove()
            self._tta = None
        if self._mc_dropout is not None:
            self._mc_dropout.remove()
            self._mc_dropout = None

    def bottleneck_shape(self) -> tuple[int, ...]:
        """``(C, *spatial)`` of the bottleneck for one patch, from a dry run of the encoder on zeros."""
        channels = determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)
        self.network = self.network.to(self.device)
        self.network.eval()
        with torch.inference_mode():
            self._capture.arm()
            unwrap_network(self.network).encoder(
                torch.zeros((1, channels, *self.configuration_manager.patch_size), device=self.device))
            return tuple(self._capture.take().shape[1:])

    def _install_autoencoders(self) -> None:
        """Hook the SD autoencoders in, after checking each fits this network's bottleneck."""
        expected = self.bottleneck_shape()
        for fold, state in zip(self.use_folds, self.ood_states):
            ae = state.autoencoder
            if ae is None or (ae.in_channels, *ae.spatial_shape) != expected:
                got = None if ae is None else (ae.in_channels, *ae.spatial_shape)
                raise OODStateError(f"the SD autoencoder of fold {fold} expects bottlenecks of shape {got} but this "
                                    f"network's is {expected}; re-fit it with nnUNetv2_fit_ood --ood sd")
            ae.to(self.device).eval()
        self._sd = AutoencoderInsertion(self.network, None, batched=self.sd_batched_decoder)

    def fingerprint_for(self, fold_index: int) -> dict[str, Any]:
        """The model fingerprint of the ``fold_index``-th loaded fold (what its OOD state must match)."""
        return model_fingerprint(self.plans_manager.plans, self.configuration_name, self.use_folds[fold_index],
                                 determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                              self.dataset_json),
                                 self.label_manager.num_segmentation_heads, self.checkpoint_name,
                                 self.list_of_parameters[fold_index])

    @property
    def configuration_name(self) -> str:
        """Name of the configuration in use (nnU-Net keeps only its resolved dict)."""
        candidates = [name for name in self.plans_manager.plans["configurations"]
                      if self.plans_manager.get_configuration(name).configuration ==
                      self.configuration_manager.configuration]
        if not candidates:
            raise OODStateError("cannot tell which configuration of the plans this model uses")
        # identical configurations can only be told apart by nnU-Net's folder name Trainer__Plans__Configuration
        from_folder = os.path.basename(self.model_folder or "").split("__")[-1]
        return from_folder if from_folder in candidates else candidates[0]

    def load_ood_state(self) -> None:
        """Load and check ``fold_X/ood`` for every fold in use; select the requested methods."""
        requested = self.requested_ood_methods
        ensemble = [m for m in ENSEMBLE_METHODS if requested is None or m in requested]
        if requested is not None and ensemble and len(self.use_folds) < 2:
            raise OODStateError(f"{', '.join(ensemble)} compare the members of a fold ensemble; predict with several "
                                "folds (-f 0 1 2 3 4) or leave them out of --ood")
        if len(self.use_folds) < 2:
            ensemble = []
        fitted = None if requested is None else [m for m in requested if m not in ENSEMBLE_METHODS]
        states = []
        for i, fold in enumerate(self.use_folds):
            fold_dir = join(self.model_folder, f"fold_{fold}")
            states.append(load_fold_state(fold_dir, self.fingerprint_for(i), fitted, device=self.device))
        methods = states[0].methods
        for fold, state in zip(self.use_folds, states):
            if state.methods != methods:
                raise OODStateError(f"fold {fold} has OOD methods {state.methods} but fold {self.use_folds[0]} has "
                                    f"{methods}; select common ones with --ood or re-fit with nnUNetv2_fit_ood")
        self.ood_states = states
        self.ood_methods = list(methods)
        self.ood_calibration = {m: combine_calibrations([s.calibration[m] for s in states]) for m in methods}
        for m in ensemble:  # fitted per fold, the state cannot calibrate an ensemble of folds
            self.ood_methods.append(m)
            self.ood_calibration[m] = MethodCalibration(float("nan"), float("nan"), float("nan"))
        if "tta" in self.ood_methods and not (self.use_mirroring and self.allowed_mirroring_axes):
            if self.requested_ood_methods and "tta" in self.requested_ood_methods:
                raise OODStateError("tta measures the disagreement of nnU-Net's mirrored passes, but mirroring is off "
                                    "(--disable_tta, or a model without mirror axes); drop tta from --ood or "
                                    "enable mirroring")
            print("note: mirroring is off, so the tta score is not computed")
            self.ood_methods.remove("tta")
            self.ood_calibration.pop("tta")
        self.install_method_hooks()

    def install_method_hooks(self) -> None:
        """Hooks that the methods in use need beyond the bottleneck capture (SD autoencoder, tta)."""
        if needs_autoencoder(self.ood_methods):
            self._install_autoencoders()
        if "tta" in self.ood_methods:
            self._tta = MirroredPassDisagreement(self.network, self.label_manager.has_regions)
        if "mc_dropout" in self.ood_methods:
            config = config_from_params(self.ood_states[0].method_params.get("mc_dropout", {}))
            self._mc_dropout = PostHocDropout(self.network, config, self.label_manager.has_regions)

    @property
    def ood_enabled(self) -> bool:
        return bool(self.ood_states)

    # ------------------------------------------------------------------ hooks into nnU-Net's inference
    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if not self._collecting:
            return super()._internal_maybe_mirror_and_predict(x)
        self._capture.arm()  # the first network call in nnU-Net's method is the un-mirrored one
        if self._sd is not None:
            self._sd.autoencoder = self.ood_states[self._fold_index].autoencoder
            self._sd.arm()
        if self._tta is not None:
            self._tta.arm(self.allowed_mirroring_axes)
        prediction = super()._internal_maybe_mirror_and_predict(x)
        self._patch_features.append(pool_features(self._capture.take()))
        patch_maps = {}
        if self._sd is not None:
            result = self._sd.take()
            self._patch_latents.append(result.latent.float())
            patch_maps["sd"] = segmentation_distortion(result.logits, result.logits_ae, self.label_manager.has_regions)
        if self._tta is not None:
            patch_maps["tta"] = self._tta.take()
        if self._mc_dropout is not None:  # after nnU-Net's own passes, which stay dropout-free
            patch_maps["mc_dropout"] = self._mc_dropout.spread(x, self._patch_index)
        if patch_maps:
            self._voxel_accumulator.add(torch.cat([patch_maps[m] for m in self.voxel_methods]),
                                        self._slicers[self._patch_index])
        self._patch_index += 1
        return prediction

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        if not self._collecting:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        # reset per call: nnU-Net may retry on the CPU after running out of GPU memory
        self._patch_features, self._patch_latents, self._slicers, self._patch_index = [], [], slicers, 0
        if self.voxel_methods:
            device = self.device if do_on_device else torch.device("cpu")
            self._voxel_accumulator = PatchMapAccumulator(
                len(self.voxel_methods), data.shape[1:],
                importance_weights(self.configuration_manager.patch_size, self.use_gaussian, device))
        logits = super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        revert = revert_padding_slicer(self._input_shape, self.configuration_manager.patch_size)
        inputs = {"bottleneck": torch.cat(self._patch_features)}
        if self._sd is not None:
            inputs["latent"] = torch.cat(self._patch_latents)
        if self.voxel_methods:
            self._case_voxel_maps.append(self._voxel_accumulator.result(revert).cpu())
        self._patch_features, self._patch_latents, self._voxel_accumulator = [], [], None
        state = self.ood_states[self._fold_index]
        self._case_patch_scores.append(self.score_patch_features(inputs, state).cpu())
        self._case_layout = SlidingWindowLayout(tuple(data.shape[1:]), tuple(slicers), revert,
                                                tuple(self.configuration_manager.patch_size))
        return logits

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        if not self._collecting:
            return super().predict_sliding_window_return_logits(input_image)
        self._input_shape = tuple(input_image.shape[1:])
        logits = super().predict_sliding_window_return_logits(input_image)
        if self._ensemble is not None:
            self._ensemble.add(logits)
        self._fold_index += 1  # nnU-Net calls this once per fold, in the order of list_of_parameters
        return logits

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        if not self.ood_enabled:
            return super().predict_logits_from_preprocessed_data(data)
        self._collecting, self._fold_index, self._case_patch_scores, self._case_voxel_maps = True, 0, [], []
        if any(m in ENSEMBLE_METHODS for m in self.ood_methods):
            self._ensemble = EnsembleAccumulator(self.label_manager.has_regions)
        # nnU-Net predicts non-finite inputs anyway; their scores must not look like a valid number
        self._case_input_finite = bool(torch.isfinite(data).all())
        try:
            logits = super().predict_logits_from_preprocessed_data(data)
        finally:
            self._collecting = False
        self._finish_case(logits)
        return logits

    # ------------------------------------------------------------------ scoring
    @property
    def voxel_methods(self) -> list[str]:
        """The methods in use whose per-patch output is a voxel map (sd, tta), in table order."""
        return [m for m in self.ood_methods if m in VOXEL_METHODS]

    @property
    def feature_methods(self) -> list[str]:
        """The methods in use that score per-patch feature vectors, in table order."""
        return [m for m in self.ood_methods if m in FEATURE_METHODS]

    def score_patch_features(self, inputs: dict[str, torch.Tensor], state: FoldOODState) -> torch.Tensor:
        """``(P, M_f)`` float64 scores of per-patch features under one fold's feature detectors.

        ``inputs`` maps a feature kind (``bottleneck``, ``latent``) to ``(P, D)`` features.
        """
        columns = []
        for m in self.feature_methods:
            features, detector = inputs[FEATURE_METHODS[m]], state.detectors[m]
            if features.shape[1] != detector.n_features_in_:
                raise OODStateError(f"{FEATURE_METHODS[m]} features have {features.shape[1]} dimensions but the "
                                    f"{m} state expects {detector.n_features_in_}; re-fit with nnUNetv2_fit_ood")
            columns.append(detector.score(features))
        n = next(iter(inputs.values())).shape[0]
        return torch.stack(columns, dim=1) if columns else torch.zeros((n, 0), dtype=torch.float64)

    def patch_score_maps(self, patch_scores: torch.Tensor, layout: SlidingWindowLayout) -> torch.Tensor:
        """Voxel maps ``(M, *shape)`` from per-patch scores ``(P, M)``, spread with the Gaussian weighting."""
        device = self.device if (self.perform_everything_on_device and self.device.type == "cuda") \
            else torch.device("cpu")
        weights = importance_weights(layout.patch_size, self.use_gaussian, device)
        return patch_scores_to_maps(patch_scores, layout, weights)

    def case_maps(self, logits: torch.Tensor) -> torch.Tensor:
        """Voxel maps ``(M, *shape)`` of every method in use, in table order, for the case just predicted.

        Feature methods: fold-averaged patch scores spread with the Gaussian weighting; ``sd``: the
        fold-averaged accumulated SD maps; output-based methods: computed from the final ``logits``.
        """
        patch_scores = torch.stack(self._case_patch_scores).mean(dim=0)  # average the folds per patch
        feature_maps = self.patch_score_maps(patch_scores, self._case_layout)
        maps = dict(zip(self.feature_methods, feature_maps))
        if self._case_voxel_maps:
            maps.update(zip(self.voxel_methods, torch.stack(self._case_voxel_maps).mean(dim=0)))
        if self._ensemble is not None:
            maps.update(self._ensemble.maps())
        region_based = self.label_manager.has_regions
        for m in self.ood_methods:
            if m in LOGIT_METHODS:
                maps[m] = logit_uncertainty(m, logits, region_based, self.temperature)
        device = feature_maps.device
        return torch.stack([maps[m].to(device) for m in self.ood_methods])

    @property
    def temperature(self) -> float:
        """The fitted temperature (averaged over folds) for the ``temperature`` method."""
        values = [s.method_params.get("temperature", {}).get("temperature", 1.0) for s in self.ood_states]
        return float(sum(values) / len(values)) if values else 1.0

    def _finish_case(self, logits: torch.Tensor) -> None:
        maps = self.case_maps(logits)
        aggregations = [self.ood_calibration[m].aggregation for m in self.ood_methods]
        foreground = predicted_foreground(logits, self.label_manager.has_regions) \
            if "foreground_mean" in aggregations else None
        case_scores = aggregate_case_scores(maps, aggregations, self._case_layout, foreground)
        if "pairwise_dice" in self.ood_methods:  # a case-level number, not the mean of its map
            case_scores[self.ood_methods.index("pairwise_dice")] = self._ensemble.pairwise_dice_score()
        self._case_voxel_maps, self._ensemble = [], None
        case = self._current_case_name()
        if not self._case_input_finite:
            print(f"warning: {case} contains NaN or Inf after preprocessing; its OOD scores are NaN and it is "
                  "flagged ood")
            case_scores = torch.full_like(case_scores, float("nan"))
        scores = {}
        for method, value in zip(self.ood_methods, case_scores.tolist()):
            calibration = self.ood_calibration[method]
            if math.isnan(calibration.threshold):  # ensemble methods: no threshold, nothing flagged
                scores[method] = {"score": value, "normalized": float("nan"), "ood": False, "threshold": None}
                continue
            normalized = float(calibration.normalize(torch.tensor([value], dtype=torch.float64))[0])
            # NaN (an input with NaN/Inf) must be flagged, hence "not <=" rather than ">"
            scores[method] = {"score": value, "normalized": normalized,
                              "ood": not (value <= calibration.threshold), "threshold": calibration.threshold}
        ofile = self._current_case["ofile"] if self._current_case else None
        if ofile is None:
            self.ood_results.append(CaseOODResult(case, scores, maps.cpu().numpy(), list(self.ood_methods)))
            return
        output_folder = os.path.dirname(ofile) or "."
        if self.save_ood_maps:
            args = (maps.cpu().numpy(), list(self.ood_methods), self._current_case["data_properties"],
                    self.configuration_manager, self.plans_manager, self.dataset_json, ofile)
            if self._map_pool is not None:
                self._map_futures.append(self._map_pool.submit(export_ood_maps, *args))
            else:
                export_ood_maps(*args)
        write_case_record(output_folder, case, scores, self.run_signature())
        self.ood_results.append(CaseOODResult(case, scores, None, list(self.ood_methods)))

    def _current_case_name(self) -> str:
        if self._current_case and self._current_case.get("ofile"):
            return os.path.basename(self._current_case["ofile"])
        return f"case_{len(self.ood_results)}"

    def run_signature(self) -> str:
        """Identifies model, folds, checkpoint and methods; records from other runs are not mixed in."""
        payload = {"model": self.model_folder, "folds": [str(f) for f in self.use_folds],
                   "checkpoint": self.checkpoint_name, "methods": self.ood_methods,
                   "weights": [s.fingerprint["weights_sha256"] for s in self.ood_states]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ feature extraction for fitting
    def _patches(self, data: torch.Tensor) -> tuple[torch.Tensor, SlidingWindowLayout]:
        """nnU-Net's padding and sliding-window slicers for a preprocessed case."""
        patch_size = tuple(self.configuration_manager.patch_size)
        padded, revert = pad_nd_image(data, patch_size, "constant", {"value": 0}, True, None)
        slicers = self._internal_get_sliding_window_slicers(padded.shape[1:])
        layout = SlidingWindowLayout(tuple(padded.shape[1:]), tuple(slicers),
                                     tuple(slice(int(s.start), int(s.stop)) for s in revert[1:]), patch_size)
        return padded, layout

    def _autocast(self):
        return torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else nullcontext()

    @torch.inference_mode()
    def extract_patch_features(self, data: torch.Tensor, batch_size: int = 4,
                               autoencoder: BottleneckAutoencoder | None = None) \
            -> tuple[dict[str, torch.Tensor], SlidingWindowLayout]:
        """Per-patch features of a preprocessed case, patch by patch as at inference.

        Returns ``{"bottleneck": (P, D)}`` pooled bottleneck features, plus ``"latent": (P, L)`` when an
        autoencoder is given. Same padding, slicers and autocast as nnU-Net's sliding window, but only
        the encoder (and the AE's encoder) runs, on batches of patches: no decoder, no mirroring.
        """
        self.network = self.network.to(self.device)
        self.network.eval()
        padded, layout = self._patches(data)
        encoder = unwrap_network(self.network).encoder
        features: dict[str, list[torch.Tensor]] = {"bottleneck": [], "latent": []}
        with self._autocast():
            for start in range(0, layout.num_patches, batch_size):
                batch = torch.stack([padded[sl] for sl in layout.slicers[start:start + batch_size]]).to(self.device)
                self._capture.arm()
                encoder(batch)
                bottleneck = self._capture.take()
                features["bottleneck"].append(pool_features(bottleneck))
                if autoencoder is not None:
                    features["latent"].append(autoencoder.encode(bottleneck.float()).float())
        return {k: torch.cat(v) for k, v in features.items() if v}, layout

    @torch.inference_mode()
    def autoencoder_agreement(self, data: torch.Tensor, autoencoder: BottleneckAutoencoder,
                              batch_size: int = 4) -> float:
        """Dice between the segmentations of a preprocessed case with and without the AE (the fit's report).

        Same sliding window and Gaussian weighting as at inference (no mirroring); the segmentations are
        the argmax (or region thresholds) of the Gaussian-averaged logits. The SD scores themselves come
        from the inference path.
        """
        self.network = self.network.to(self.device)
        self.network.eval()
        padded, layout = self._patches(data)
        weights = importance_weights(layout.patch_size, self.use_gaussian, self.device)
        heads = self.label_manager.num_segmentation_heads
        logits = PatchMapAccumulator(2 * heads, layout.padded_shape, weights)
        insertion = AutoencoderInsertion(self.network, autoencoder.to(self.device).eval(), batched=True)
        region_based = self.label_manager.has_regions
        try:
            with self._autocast():
                for start in range(0, layout.num_patches, batch_size):
                    slicers = layout.slicers[start:start + batch_size]
                    batch = torch.stack([padded[sl] for sl in slicers]).to(self.device)
                    insertion.arm()
                    self.network(batch)
                    result = insertion.take()
                    both = torch.cat((result.logits, result.logits_ae), dim=1).float()
                    for i, sl in enumerate(slicers):
                        logits.add(both[i], sl)
        finally:
            insertion.remove()
        merged = logits.result(layout.revert_padding)[None]
        return float(segmentation_agreement(merged[:, :heads], merged[:, heads:], region_based)[0])

    # ------------------------------------------------------------------ running over files
    def _manage_input_and_output_lists(self, list_of_lists_or_source_folder,
                                       output_folder_or_list_of_truncated_output_files,
                                       folder_with_segs_from_prev_stage: str = None, overwrite: bool = True,
                                       part_id: int = 0, num_parts: int = 1, save_probabilities: bool = False):
        if not self.ood_enabled:
            return super()._manage_input_and_output_lists(
                list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                folder_with_segs_from_prev_stage, overwrite, part_id, num_parts, save_probabilities)
        lists, outputs, prev = super()._manage_input_and_output_lists(
            list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage, True, part_id, num_parts, save_probabilities)
        if overwrite or outputs is None:
            return lists, outputs, prev
        # --continue_prediction: a case is done only when its segmentation, OOD record and maps all exist
        done = [self._case_complete(o, save_probabilities) for o in outputs]
        keep = [i for i, d in enumerate(done) if not d]
        print(f"overwrite was set to {overwrite}, so I am only working on cases whose segmentation or OOD outputs "
              f"are missing. That's {len(keep)} cases.")
        return [lists[i] for i in keep], [outputs[i] for i in keep], [prev[i] for i in keep]

    def _case_complete(self, output_truncated: str, save_probabilities: bool) -> bool:
        ending = self.dataset_json["file_ending"]
        files = [output_truncated + ending] + ([output_truncated + ".npz"] if save_probabilities else [])
        if self.save_ood_maps:
            map_ending = map_file_ending(self.plans_manager, self.dataset_json)
            files += [map_filename(output_truncated, m, map_ending) for m in self.ood_methods]
        return all(isfile(f) for f in files) and has_case_record(
            os.path.dirname(output_truncated) or ".", os.path.basename(output_truncated), self.run_signature())

    def _begin_run(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files) -> None:
        if isinstance(output_folder_or_list_of_truncated_output_files, str):
            output_folder = output_folder_or_list_of_truncated_output_files
            if isinstance(list_of_lists_or_source_folder, str):
                lists = create_lists_from_splitted_dataset_folder(list_of_lists_or_source_folder,
                                                                  self.dataset_json["file_ending"])
            else:
                lists = list_of_lists_or_source_folder
            cut = len(self.dataset_json["file_ending"]) + 5
            cases = [os.path.basename(files[0])[:-cut] for files in lists]
        elif isinstance(output_folder_or_list_of_truncated_output_files, list):
            output_folder = os.path.dirname(output_folder_or_list_of_truncated_output_files[0]) or "."
            cases = [os.path.basename(o) for o in output_folder_or_list_of_truncated_output_files]
        else:
            output_folder, cases = None, []
        self._run = {"output_folder": output_folder, "cases": cases}

    def _end_run(self) -> None:
        run, self._run = self._run, None
        if not run or run["output_folder"] is None:
            return
        records = collect_records(run["output_folder"], run["cases"], self.run_signature())
        write_score_tables(run["output_folder"], records, self.ood_methods, self.score_table_metadata())
        print(f"OOD scores of {len(records)} cases written to {join(run['output_folder'], 'ood_scores.csv')}")

    def score_table_metadata(self) -> dict[str, Any]:
        """Thresholds, normalisation and provenance stored in ``ood_scores.json``."""
        return {
            "plugin": "nnunet-ood", "plugin_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model_folder": self.model_folder, "folds": [str(f) for f in self.use_folds],
            "checkpoint": self.checkpoint_name, "methods": self.ood_methods,
            "configuration": self.ood_states[0].fingerprint["configuration"],
            "plans": self.ood_states[0].fingerprint["plans_name"],
            "tile_step_size": self.tile_step_size, "use_gaussian": self.use_gaussian,
            "use_mirroring": bool(self.use_mirroring and self.allowed_mirroring_axes),
            # ensemble methods have no calibration: their bounds and threshold are null
            "calibration": {m: {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in vars(c).items()}
                            for m, c in self.ood_calibration.items()},
            "calibration_per_fold": {str(f): {m: vars(s.calibration[m]) for m in self.ood_methods if m in s.calibration}
                                     for f, s in zip(self.use_folds, self.ood_states)},
            "run_signature": self.run_signature(),
        }

    def predict_from_files(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                           save_probabilities: bool = False, overwrite: bool = True,
                           num_processes_preprocessing: int = default_num_processes,
                           num_processes_segmentation_export: int = default_num_processes,
                           folder_with_segs_from_prev_stage: str = None, num_parts: int = 1, part_id: int = 0):
        if not self.ood_enabled:
            return super().predict_from_files(list_of_lists_or_source_folder,
                                              output_folder_or_list_of_truncated_output_files, save_probabilities,
                                              overwrite, num_processes_preprocessing,
                                              num_processes_segmentation_export, folder_with_segs_from_prev_stage,
                                              num_parts, part_id)
        self._begin_run(list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files)
        ret = super().predict_from_files(list_of_lists_or_source_folder,
                                         output_folder_or_list_of_truncated_output_files,
                                         save_probabilities, overwrite, num_processes_preprocessing,
                                         num_processes_segmentation_export, folder_with_segs_from_prev_stage,
                                         num_parts, part_id)
        self._end_run()
        return ret

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = default_num_processes):
        if not self.ood_enabled:
            return super().predict_from_data_iterator(data_iterator, save_probabilities,
                                                      num_processes_segmentation_export)

        def tracked(iterator):
            for item in iterator:  # nnU-Net predicts each item right after taking it
                self._current_case = item
                yield item
            self._current_case = None

        if self.save_ood_maps:
            self._map_pool = ProcessPoolExecutor(max(1, num_processes_segmentation_export),
                                                 mp_context=get_context("spawn"))
        try:
            ret = super().predict_from_data_iterator(tracked(data_iterator), save_probabilities,
                                                     num_processes_segmentation_export)
            for future in self._map_futures:
                future.result()  # re-raises export errors
        finally:
            self._current_case = None
            self._map_futures = []
            if self._map_pool is not None:
                self._map_pool.shutdown(wait=True, cancel_futures=True)
                self._map_pool = None
        if hasattr(data_iterator, "_finish"):  # nnU-Net finishes MultiThreadedAugmenters; it cannot see this one
            data_iterator._finish()
        return ret

    def predict_from_files_sequential(self, list_of_lists_or_source_folder,
                                      output_folder_or_list_of_truncated_output_files,
                                      save_probabilities: bool = False, overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str = None):
        if not self.ood_enabled:
            return super().predict_from_files_sequential(list_of_lists_or_source_folder,
                                                         output_folder_or_list_of_truncated_output_files,
                                                         save_probabilities, overwrite,
                                                         folder_with_segs_from_prev_stage)
        self._begin_run(list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files)
        with open(os.devnull, "w") as devnull, redirect_stdout(devnull):  # nnU-Net prints these lists itself
            lists, outputs, _ = self._manage_input_and_output_lists(
                list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                folder_with_segs_from_prev_stage, overwrite, 0, 1, save_probabilities)
        outputs = outputs if outputs is not None else [None] * len(lists)
        self._sequential_outputs = {tuple(files): out for files, out in zip(lists, outputs)}

        def on_case(image_files, properties):
            self._current_case = {"ofile": self._sequential_outputs.get(tuple(image_files)),
                                  "data_properties": properties}

        original = self.configuration_manager
        self.configuration_manager = _RecordingConfigurationManager(original, on_case)
        try:
            ret = super().predict_from_files_sequential(list_of_lists_or_source_folder,
                                                        output_folder_or_list_of_truncated_output_files,
                                                        save_probabilities, overwrite, folder_with_segs_from_prev_stage)
        finally:
            self.configuration_manager = original
            self._current_case = None
        self._end_run()
        return ret

