"""``nnUNetOODPredictor``: nnU-Net's predictor with OOD scores computed inside its sliding window.

Integration is by overriding nnUNetPredictor's hook methods, each of which calls the original and
hands what it sees to a :class:`~nnunet_ood.inference.case_scorer.CaseScorer`:

* ``_internal_maybe_mirror_and_predict``: before and after nnU-Net's passes of each patch;
* ``_internal_predict_sliding_window_return_logits``: start and end of one fold's sliding window;
* ``predict_sliding_window_return_logits``: the fold's logits (nnU-Net runs it once per fold);
* ``predict_logits_from_preprocessed_data``: one case, from first fold to final logits.

The file-level overrides only add bookkeeping (:mod:`nnunet_ood.inference.outputs`). Logits, and
therefore segmentations, are produced by nnU-Net's own code and are unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from typing import Any

import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_ood.calibration import MethodCalibration
from nnunet_ood.errors import OODInputError, OODStateError
from nnunet_ood.fold_state import FoldOODState, load_fold_state, read_manifest
from nnunet_ood.folds import parse_folds
from nnunet_ood.inference.case_scorer import CaseScorer
from nnunet_ood.inference.heap import return_freed_heap
from nnunet_ood.inference.identity import ModelIdentity
from nnunet_ood.inference.outputs import CaseOODResult, PredictionOutputs, RecordingConfigurationManager
from nnunet_ood.inference.thresholds import decision_rules, fit_setting_notes, fold_calibration, named_calibration
from nnunet_ood.io.map_dtypes import check_dtype_name, check_map_dtype, normalization_bounds
from nnunet_ood.io.maps import map_file_ending
from nnunet_ood.io.model_files import RESTORE, read_model_files
from nnunet_ood.methods import REGISTRY, FoldModels, Method, TapContext
from nnunet_ood.quality.decision import DecisionRule
from nnunet_ood.sliding_window import revert_padding_slicer

__all__ = ["CaseOODResult", "nnUNetOODPredictor"]


class nnUNetOODPredictor(ModelIdentity, nnUNetPredictor):
    """nnUNetPredictor that also produces per-case OOD scores and, optionally, per-voxel OOD maps.

    Use it exactly like ``nnUNetPredictor``. After ``initialize_from_trained_model_folder`` the fitted
    OOD state of every fold is loaded (``fold_X/ood``). With files as output, scores go to
    ``ood_scores.csv``/``.json`` in the output folder; with in-memory prediction they are appended to
    ``self.ood_results``. ``ood_methods`` selects methods (default: every fitted one, plus the fold
    ensembles with several folds); ``predict_options`` holds methods' inference options by key
    (e.g. ``{"sd_predict": SDPredictConfig(batched_decoder=True)}``); ``calibration`` the name of a calibration
    made by ``nnUNetv2_calibrate_ood`` (default: the folds' own). ``save_ood_maps``: write voxel maps next to the
    segmentations, ``True`` for every method with a map or a list of method names. ``ood_maps_dtype``
    (``float32``, ``int16`` or ``uint8``, NIfTI only) is how maps are stored (:mod:`nnunet_ood.io.map_dtypes`).
    """

    def __init__(self, tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True,
                 perform_everything_on_device: bool = True, device: torch.device = torch.device("cuda"),
                 verbose: bool = False, verbose_preprocessing: bool = False, allow_tqdm: bool = True,
                 ood_methods: Sequence[str] | None = None, save_ood_maps: bool | Sequence[str] = False,
                 predict_options: Mapping[str, Any] | None = None, calibration: str | None = None,
                 ood_maps_dtype: str = "float32") -> None:
        super().__init__(tile_step_size, use_gaussian, use_mirroring, perform_everything_on_device, device, verbose,
                         verbose_preprocessing, allow_tqdm)
        self.requested_ood_methods = list(ood_methods) if ood_methods else None
        # True or [] (the command line's bare --save_ood_maps): every method's map; names: those methods' maps
        self.save_ood_maps = save_ood_maps is True or not isinstance(save_ood_maps, bool)
        self.requested_map_methods = [] if isinstance(save_ood_maps, bool) else list(save_ood_maps)
        for name in self.requested_map_methods:
            REGISTRY.get(name)
        self.ood_map_methods: list[str] = []  # the methods whose maps are written, once the state is loaded
        check_dtype_name(ood_maps_dtype)  # the file ending and the methods' bounds are checked once they are known
        self.ood_maps_dtype = ood_maps_dtype
        self.predict_options = dict(predict_options or {})
        self.calibration_name = calibration  # a named calibration of the model folder (nnUNetv2_calibrate_ood)
        self.ood_states: list[FoldOODState] = []
        self.ood_methods: list[str] = []
        self.ood_calibration: dict[str, MethodCalibration] = {}
        self.ood_decisions: dict[str, DecisionRule] = {}  # accept/review rules of the methods that predict Dice
        self.ood_results: list[CaseOODResult] = []
        self.model_folder: str | None = None
        self.use_folds: list[int | str] = []
        self.checkpoint_name = "checkpoint_final.pth"
        self.outputs = PredictionOutputs(self)
        self._scorer: CaseScorer | None = None
        self._input_shape: tuple[int, ...] = ()

    # ------------------------------------------------------------------ set-up
    def initialize_from_trained_model_folder(self, model_training_output_dir: str,
                                             use_folds: tuple[int | str, ...] | list | str | None,
                                             checkpoint_name: str = "checkpoint_final.pth",
                                             load_ood_state: bool = True) -> None:
        """nnU-Net's initialisation, then the OOD state of each fold (unless ``load_ood_state=False``)."""
        if use_folds is None:
            use_folds = nnUNetPredictor.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        self.use_folds = parse_folds(use_folds)
        read_model_files(model_training_output_dir)  # a damaged plans.json or dataset.json: one line, no traceback
        try:
            super().initialize_from_trained_model_folder(model_training_output_dir, self.use_folds, checkpoint_name)
        except RuntimeError as e:
            if "not found in plans" in str(e):  # the checkpoint's configuration is missing (the others were checked)
                raise OODInputError(f"{join(model_training_output_dir, 'plans.json')} is damaged: "
                                    f"{' '.join(str(e).split())}; {RESTORE['plans.json']}") from None
            if "Could not find requested nnunet trainer" not in str(e):
                raise
            raise OODInputError(f"nnU-Net cannot find the trainer class of {model_training_output_dir}; put the "
                                "folder of its module in nnUNet_extTrainer (for nnUNetTrainerOOD: export "
                                "nnUNet_extTrainer=$(nnUNetv2_ood_trainer_dir))") from None
        self.model_folder = os.path.abspath(model_training_output_dir)
        self.checkpoint_name = checkpoint_name
        if load_ood_state:
            self.load_ood_state()

    def load_ood_state(self) -> None:
        """Load and check ``fold_X/ood`` for every fold in use; select the methods and build their scorer."""
        mirroring = bool(self.use_mirroring and self.allowed_mirroring_axes)
        n_folds = len(self.use_folds)
        requested = self.requested_ood_methods
        if requested is not None:  # derived methods (quality) need the methods they read
            entries = read_manifest(join(self.model_folder, f"fold_{self.use_folds[0]}"))["methods"]
            requested = REGISTRY.with_inputs(requested, entries)
        wanted = REGISTRY.check_requested(requested, n_folds, mirroring)
        states = [load_fold_state(join(self.model_folder, f"fold_{fold}"), self.fingerprint_for(i), wanted,
                                  device=self.device) for i, fold in enumerate(self.use_folds)]
        for state in states:  # a prediction never refits: hold only what scoring reads (Mahalanobis: half)
            for detector in state.detectors.values():
                detector.scoring_only()
        for fold, state in zip(self.use_folds, states):
            if state.methods != states[0].methods:
                raise OODStateError(f"fold {fold} has OOD methods {state.methods} but fold {self.use_folds[0]} has "
                                    f"{states[0].methods}; select common ones with --ood or re-fit with "
                                    "nnUNetv2_fit_ood")
        methods, notes = REGISTRY.methods_in_use(requested, states[0].methods, n_folds, mirroring)
        for note in notes:
            print(note)
        self.ood_states, self.ood_methods = states, [m.name for m in methods]
        if self.calibration_name is None:
            named, notes, site = {}, fit_setting_notes(methods, self.score_settings(), n_folds), None
        else:
            named, notes, site = named_calibration(self.model_folder, self.calibration_name, methods,
                                                   self.model_identity(), self.score_settings())
        # the folds' own calibration only for what the named one does not cover
        folds_own = fold_calibration([m for m in methods if m.name not in named], states)
        self.ood_calibration = {m.name: named[m.name] if m.name in named else folds_own[m.name] for m in methods}
        self.ood_decisions = decision_rules(methods, states, site, self.calibration_name)
        for note in notes:
            print(note)
        self.ood_map_methods = REGISTRY.with_maps(self.requested_map_methods, self.ood_methods) \
            if self.save_ood_maps else []
        if self.save_ood_maps:  # before any case is predicted: the map type must fit the dataset and methods
            bounds = normalization_bounds(self.ood_calibration)
            check_map_dtype(self.ood_maps_dtype, map_file_ending(self.plans_manager, self.dataset_json),
                            {m: bounds[m] for m in self.ood_map_methods if m in bounds})
        if self._scorer is not None:
            self._scorer.remove()
        self._scorer = self.make_scorer(methods, states, {m: c.aggregation for m, c in self.ood_calibration.items()})

    @property
    def ood_enabled(self) -> bool:
        return bool(self.ood_states)

    def make_scorer(self, methods: Sequence[Method], folds: Sequence[FoldModels], aggregations: Mapping[str, str],
                    with_taps: bool = True, record_fit_reports: bool = False) -> CaseScorer:
        """A case scorer for ``methods`` with the fitted ``folds`` (one per fold in use), hooked into this network.

        ``with_taps=False`` for scoring from bottlenecks the caller collects (the fit's encoder-only pass);
        ``record_fit_reports``: the taps also collect what the methods' fit reports read (the fit's validation pass).
        """
        context = TapContext(
            network=self.network, folds=folds, fold_names=[str(f) for f in self.use_folds],
            region_based=self.label_manager.has_regions,
            mirror_axes=tuple(self.allowed_mirroring_axes or ()) if self.use_mirroring else (),
            device=self.device, method_params=folds[0].method_params if folds else {},
            predict_options=self.predict_options, shape_of_bottleneck=self.bottleneck_shape,
            record_fit_reports=record_fit_reports) if with_taps else None
        on_gpu = self.perform_everything_on_device and self.device.type == "cuda"
        return CaseScorer(methods, folds, aggregations, region_based=self.label_manager.has_regions,
                          patch_size=self.configuration_manager.patch_size, use_gaussian=self.use_gaussian,
                          map_device=self.device if on_gpu else torch.device("cpu"), tap_context=context)

    @contextmanager
    def scoring(self, scorer: CaseScorer) -> Iterator[CaseScorer]:
        """Score every case predicted inside the block with ``scorer`` (its outcome in ``scorer.last``)."""
        previous, self._scorer = self._scorer, scorer
        try:
            yield scorer
        finally:
            self._scorer = previous

    # ------------------------------------------------------------------ hooks into nnU-Net's inference
    @property
    def _collecting(self) -> bool:
        return self._scorer is not None and self._scorer.in_case

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if not self._collecting:
            return super()._internal_maybe_mirror_and_predict(x)
        self._scorer.before_patch()  # nnU-Net's first network call here is the un-mirrored one
        prediction = super()._internal_maybe_mirror_and_predict(x)
        self._scorer.after_patch(x)
        return prediction

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        if not self._collecting:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        # begins anew on every call: nnU-Net may retry on the CPU after running out of GPU memory
        self._scorer.begin_fold(data.shape[1:], slicers,
                                revert_padding_slicer(self._input_shape, self.configuration_manager.patch_size),
                                self.device if do_on_device else torch.device("cpu"))
        logits = super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        self._scorer.finish_window()
        return logits

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        if not self._collecting:
            return super().predict_sliding_window_return_logits(input_image)
        self._input_shape = tuple(input_image.shape[1:])
        logits = super().predict_sliding_window_return_logits(input_image)
        self._scorer.end_fold(logits)  # nnU-Net calls this once per fold, in the order of list_of_parameters
        return logits

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        if self._scorer is None:
            return super().predict_logits_from_preprocessed_data(data)
        self._scorer.begin_case(data)
        try:
            logits = super().predict_logits_from_preprocessed_data(data)
        finally:
            self._scorer.in_case = False
        # the fit reads only the scores; a prediction keeps the maps it writes (in memory: all of them)
        outcome = self._scorer.finish_case(logits, self.outputs.maps_to_keep() if self.ood_enabled else ())
        return_freed_heap()  # before nnU-Net's export, the peak of a stock prediction
        if self.ood_enabled:
            self.outputs.case_scored(outcome)
        return logits

    # ------------------------------------------------------------------ running over files
    def check_input_files(self, list_of_lists_or_source_folder: str | Sequence[Sequence[str]]) -> None:
        """The checks ``nnUNetv2_predict_ood`` runs on its input before loading the model (:mod:`nnunet_ood.io.inputs`),
        for callers of the Python API: a folder's naming and channels (or one file per channel in each list), and
        every header (one scalar value per voxel: no 4D, RGB or vector image; a spacing nnU-Net can resample; at
        least one bottleneck voxel). Without them a 4D or RGB file failed inside nnU-Net's workers."""
        from nnunet_ood.io.inputs import check_images_for_model, count_channels, input_cases, input_lists

        ending, channels = self.dataset_json["file_ending"], count_channels(self.dataset_json)
        cases = input_cases(list_of_lists_or_source_folder, ending, channels) \
            if isinstance(list_of_lists_or_source_folder, str) else \
            input_lists(list_of_lists_or_source_folder, ending, channels)
        check_images_for_model(cases, self.plans_manager.plans, self.configuration_name, channels)

    def _manage_input_and_output_lists(self, list_of_lists_or_source_folder,
                                       output_folder_or_list_of_truncated_output_files,
                                       folder_with_segs_from_prev_stage: str = None, overwrite: bool = True,
                                       part_id: int = 0, num_parts: int = 1, save_probabilities: bool = False):
        # with OOD on, nnU-Net's own check (segmentation exists) is replaced by ours (record and maps too)
        lists, outputs, prev = super()._manage_input_and_output_lists(
            list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage, overwrite or self.ood_enabled, part_id, num_parts, save_probabilities)
        if overwrite or outputs is None or not self.ood_enabled:
            return lists, outputs, prev
        return self.outputs.unfinished(lists, outputs, prev, save_probabilities)

    def predict_from_files(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                           save_probabilities: bool = False, overwrite: bool = True,
                           num_processes_preprocessing: int = default_num_processes,
                           num_processes_segmentation_export: int = default_num_processes,
                           folder_with_segs_from_prev_stage: str = None, num_parts: int = 1, part_id: int = 0):
        self.check_input_files(list_of_lists_or_source_folder)  # before anything is written
        if self.ood_enabled:
            self.outputs.begin_run(list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files)
        try:
            return super().predict_from_files(list_of_lists_or_source_folder,
                                              output_folder_or_list_of_truncated_output_files, save_probabilities,
                                              overwrite, num_processes_preprocessing,
                                              num_processes_segmentation_export, folder_with_segs_from_prev_stage,
                                              num_parts, part_id)
        finally:  # also after a failure: the tables list every case scored so far
            self.outputs.end_run()

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = default_num_processes):
        if not self.ood_enabled:
            return super().predict_from_data_iterator(data_iterator, save_probabilities,
                                                      num_processes_segmentation_export)

        def tracked(iterator):
            for item in iterator:  # nnU-Net predicts each item right after taking it
                self.outputs.current_case = item
                yield item
            self.outputs.current_case = None

        with self.outputs.map_workers(num_processes_segmentation_export):
            ret = super().predict_from_data_iterator(tracked(data_iterator), save_probabilities,
                                                     num_processes_segmentation_export)
        if hasattr(data_iterator, "_finish"):  # nnU-Net finishes MultiThreadedAugmenters; it cannot see this one
            data_iterator._finish()
        return ret

    def predict_from_files_sequential(self, list_of_lists_or_source_folder,
                                      output_folder_or_list_of_truncated_output_files,
                                      save_probabilities: bool = False, overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str = None):
        self.check_input_files(list_of_lists_or_source_folder)  # before anything is written
        if not self.ood_enabled:
            return super().predict_from_files_sequential(list_of_lists_or_source_folder,
                                                         output_folder_or_list_of_truncated_output_files,
                                                         save_probabilities, overwrite,
                                                         folder_with_segs_from_prev_stage)
        self.outputs.begin_run(list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files)
        with open(os.devnull, "w") as devnull, redirect_stdout(devnull):  # nnU-Net prints these lists itself
            lists, outputs, _ = self._manage_input_and_output_lists(
                list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                folder_with_segs_from_prev_stage, overwrite, 0, 1, save_probabilities)
        output_of = dict(zip(map(tuple, lists), outputs if outputs is not None else [None] * len(lists)))

        def on_case(image_files, properties):
            self.outputs.current_case = {"ofile": output_of.get(tuple(image_files)), "data_properties": properties}

        original = self.configuration_manager
        self.configuration_manager = RecordingConfigurationManager(original, on_case)
        try:
            return super().predict_from_files_sequential(list_of_lists_or_source_folder,
                                                         output_folder_or_list_of_truncated_output_files,
                                                         save_probabilities, overwrite,
                                                         folder_with_segs_from_prev_stage)
        finally:  # also after a failure: the tables list every case scored so far
            self.configuration_manager = original
            self.outputs.current_case = None
            self.outputs.end_run()
