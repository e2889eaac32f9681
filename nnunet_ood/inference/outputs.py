"""The files of an OOD prediction run: per-case records and maps, the score tables, resuming.

Every scored case gets a JSON record in ``<output>/ood_cases/`` (and, with ``--save_ood_maps``, its maps)
as soon as it is scored, so that ``--continue_prediction`` and ``-num_parts`` runs can rebuild the
complete ``ood_scores.csv``/``.json`` from all records at the end of each run. In-memory prediction
appends :class:`CaseOODResult` to the predictor's ``ood_results`` instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

from nnunet_ood import __version__
from nnunet_ood.calibration import calibrated_scores
from nnunet_ood.inference.case_scorer import CaseOutcome
from nnunet_ood.io.folder_lock import folder_lock
from nnunet_ood.io.inputs import check_map_collisions
from nnunet_ood.io.map_dtypes import maps_metadata, normalization_bounds
from nnunet_ood.io.maps import export_ood_maps, map_file_ending, map_filename
from nnunet_ood.io.scores import (
    collect_records,
    common_input_folder,
    decision,
    has_case_record,
    recorded_cases,
    write_case_record,
    write_score_tables,
)
from nnunet_ood.methods import REGISTRY

if TYPE_CHECKING:
    from nnunet_ood.inference.predictor import nnUNetOODPredictor


@dataclass
class CaseOODResult:
    """OOD outcome of one case: per method its score, normalised score, flag and threshold.

    ``maps`` (in-memory prediction only): voxel maps in preprocessed space by method.
    """

    case: str
    scores: dict[str, dict[str, Any]]
    maps: dict[str, np.ndarray] | None = None
    methods: list[str] = field(default_factory=list)


class PredictionOutputs:
    """Output files and bookkeeping of the predictor's runs over files (and its in-memory results)."""

    def __init__(self, predictor: nnUNetOODPredictor) -> None:
        self.predictor = predictor
        self._current_case: dict | None = None
        self.unfinished_case: str | None = None  # the case being predicted, until it is scored
        self._run: dict[str, Any] | None = None
        self._map_pool: ProcessPoolExecutor | None = None
        self._map_futures: list[Future] = []

    # ------------------------------------------------------------------ one case
    @property
    def current_case(self) -> dict | None:
        """nnU-Net's item of the case being predicted (``ofile``, ``data_properties``)."""
        return self._current_case

    @current_case.setter
    def current_case(self, item: dict | None) -> None:
        self._current_case = item
        if item is not None:
            self.unfinished_case = self._case_name()

    def case_scored(self, outcome: CaseOutcome) -> CaseOODResult:
        """Calibrate, flag and store the scores (and maps) of the case just predicted."""
        p = self.predictor
        case = self._case_name()
        if not outcome.input_finite:
            print(f"warning: {case} contains NaN or Inf after preprocessing; its OOD scores are NaN and it is "
                  "flagged ood")
        scores = calibrated_scores(outcome.scores, p.ood_calibration)
        for method, rule in p.ood_decisions.items():  # accept/review: threshold, gate and reason
            decided = rule.decide(outcome.scores[method], outcome.scores)
            scores[method].update(ood=not decided.accept, reason=decided.reason, unusual_p=decided.p_value)
        ofile = self.current_case["ofile"] if self.current_case else None
        if ofile is None:
            result = CaseOODResult(case, scores, {m: v.cpu().numpy() for m, v in outcome.maps.items()}, outcome.methods)
            p.ood_results.append(result)
            self.unfinished_case = None
            return result
        if p.save_ood_maps:
            # views of the kept maps, no stacked copy: at clinical size each map is hundreds of MB
            args = ([outcome.maps[m].cpu().numpy() for m in p.ood_map_methods], p.ood_map_methods,
                    self.current_case["data_properties"], p.configuration_manager, p.plans_manager, p.dataset_json,
                    ofile, p.ood_maps_dtype, normalization_bounds(p.ood_calibration))
            if self._map_pool is not None:
                self._map_futures.append(self._map_pool.submit(export_ood_maps, *args))
            else:
                export_ood_maps(*args)
        outcome.maps.clear()  # written (or queued): not held while nnU-Net exports the segmentation
        write_case_record(os.path.dirname(ofile) or ".", case, scores, self.run_signature(),
                          (self._run or {}).get("input_folder"))
        self.unfinished_case = None
        result = CaseOODResult(case, scores, None, outcome.methods)
        p.ood_results.append(result)
        deciding = self.decision_methods()
        flags = [m for m, s in scores.items() if s["ood"] and m not in deciding]
        decisions = "".join(f"; {m}: {decision(scores[m]['ood'])} ({_why(scores[m])})" for m in deciding)
        # one line per case as it is scored (nnU-Net's sequential mode prints nothing of its own per case)
        print(f"OOD {case}: " + (f"flagged by {', '.join(flags)}" if flags else "no flag") + decisions, flush=True)
        return result

    def maps_to_keep(self) -> list[str] | None:
        """Methods whose voxel maps the case being predicted needs: those written with ``--save_ood_maps``, or all
        (None) when the results stay in memory (``CaseOODResult.maps``)."""
        if self.current_case is None or self.current_case.get("ofile") is None:
            return None
        return self.predictor.ood_map_methods

    def decision_rules(self) -> dict[str, dict[str, Any]]:
        """The rule in force per deciding method (``ood_scores.json``'s ``decision_rules``): the rule, its
        settings, where its threshold was set, the gate, and the one-sentence statement of what it guarantees."""
        return {m: rule.to_json() for m, rule in self.predictor.ood_decisions.items()}

    def decision_methods(self) -> list[str]:
        """Methods in use whose flag is an accept/review decision (they predict Dice)."""
        return [m for m in self.predictor.ood_methods if REGISTRY.get(m).predicts_dice]

    def _case_name(self) -> str:
        if self.current_case and self.current_case.get("ofile"):
            return os.path.basename(self.current_case["ofile"])
        return f"case_{len(self.predictor.ood_results)}"

    @contextmanager
    def map_workers(self, n: int):
        """Map export in ``n`` spawned worker processes while nnU-Net exports segmentations."""
        if self.predictor.save_ood_maps:
            self._map_pool = ProcessPoolExecutor(max(1, n), mp_context=get_context("spawn"))
        try:
            yield
            for future in self._map_futures:
                future.result()  # re-raises export errors
        finally:
            self.current_case, self._map_futures = None, []
            if self._map_pool is not None:
                self._map_pool.shutdown(wait=True, cancel_futures=True)
                self._map_pool = None

    # ------------------------------------------------------------------ runs over files
    def begin_run(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files) -> None:
        """Remember which output folder and cases this run writes (for the tables at its end)."""
        ending = self.predictor.dataset_json["file_ending"]
        if isinstance(output_folder_or_list_of_truncated_output_files, str):
            output_folder = output_folder_or_list_of_truncated_output_files
            lists = create_lists_from_splitted_dataset_folder(list_of_lists_or_source_folder, ending) \
                if isinstance(list_of_lists_or_source_folder, str) else list_of_lists_or_source_folder
            cases = [os.path.basename(files[0])[:-(len(ending) + 5)] for files in lists]
        elif isinstance(output_folder_or_list_of_truncated_output_files, list):
            output_folder = os.path.dirname(output_folder_or_list_of_truncated_output_files[0]) or "."
            cases = [os.path.basename(o) for o in output_folder_or_list_of_truncated_output_files]
        else:
            output_folder, cases = None, []
        if self.predictor.save_ood_maps:
            check_map_collisions(cases, self.predictor.ood_map_methods)
        input_folder = os.path.abspath(list_of_lists_or_source_folder) \
            if isinstance(list_of_lists_or_source_folder, str) else None
        self._run = {"output_folder": output_folder, "cases": cases, "input_folder": input_folder}
        self.unfinished_case = None

    def end_run(self) -> None:
        """Rebuild ``ood_scores.csv``/``.json`` from every record of the output folder with this run's signature:
        the cases of earlier runs into the folder with the same model and settings stay in the tables."""
        run, self._run = self._run, None
        if not run or run["output_folder"] is None:
            return
        deciding = self.decision_methods()
        # -num_parts runs share the folder: collect and write in turn, so the last writer has seen every record
        with folder_lock(run["output_folder"]):
            records = collect_records(run["output_folder"], None, self.run_signature())
            write_score_tables(run["output_folder"], records, self.predictor.ood_methods,
                               self.table_metadata(common_input_folder(records)), deciding)
            # the records just collected are this run's settings: the folder's other records need no second read
            others = sorted(set(recorded_cases(run["output_folder"])) - {r["case"] for r in records})
        if others:  # e.g. -num_parts runs with different settings into one folder: say so, never silently
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            print(f"warning: {len(others)} case(s) in {run['output_folder']} were scored with other settings (model, "
                  f"folds, methods, step size, mirroring, maps or calibration) or have an unreadable record, and are "
                  f"not in ood_scores.csv: {shown}; predict them again with these settings, or use one -o per "
                  "setting")
        earlier = len({r["case"] for r in records} - set(run["cases"]))
        print(f"OOD scores of {len(records)} cases written to {join(run['output_folder'], 'ood_scores.csv')}"
              + (f" ({earlier} of them from earlier runs into this folder with the same settings)" if earlier else ""))
        for m in deciding:
            review = sum(bool(r["methods"][m]["ood"]) for r in records if m in r["methods"])
            print(f"{m}: {len(records) - review} of {len(records)} cases accepted, {review} sent to review")
            rule = self.predictor.ood_decisions.get(m)
            if rule is not None:
                print(f"{m}: {rule.statement()}")
                drift = rule.drift_line([r["methods"][m].get("unusual_p") for r in records if m in r["methods"]])
                if drift is not None:
                    print(f"{m}: {drift}")

    def unfinished(self, lists, outputs, prev, save_probabilities: bool):
        """``--continue_prediction``: a case is done only when its segmentation, OOD record and maps all exist."""
        keep = [i for i, o in enumerate(outputs) if not self._case_complete(o, save_probabilities)]
        print(f"overwrite was set to False, so I am only working on cases whose segmentation or OOD outputs "
              f"are missing. That's {len(keep)} cases.")
        return [lists[i] for i in keep], [outputs[i] for i in keep], [prev[i] for i in keep]

    def _case_complete(self, output_truncated: str, save_probabilities: bool) -> bool:
        p = self.predictor
        files = [output_truncated + p.dataset_json["file_ending"]] + \
            ([output_truncated + ".npz"] if save_probabilities else [])
        if p.save_ood_maps:
            ending = map_file_ending(p.plans_manager, p.dataset_json)
            files += [map_filename(output_truncated, m, ending) for m in p.ood_map_methods]
        # a file of 0 bytes is what a killed writer leaves: not finished
        return all(isfile(f) and os.path.getsize(f) > 0 for f in files) and has_case_record(
            os.path.dirname(output_truncated) or ".", os.path.basename(output_truncated), self.run_signature())

    # ------------------------------------------------------------------ provenance
    def run_signature(self) -> str:
        """Identifies model, folds, checkpoint, methods and the settings that change the scores or the map files
        (step size, mirroring, map dtype); records from other runs are not mixed in, and ``--continue_prediction``
        redoes the cases a run with other settings left."""
        p = self.predictor
        payload = {"model": p.model_folder, "folds": [str(f) for f in p.use_folds], "checkpoint": p.checkpoint_name,
                   "methods": p.ood_methods, "weights": [s.fingerprint["weights_sha256"] for s in p.ood_states],
                   "tile_step_size": p.tile_step_size,
                   "use_mirroring": bool(p.use_mirroring and p.allowed_mirroring_axes),
                   "ood_maps": p.ood_maps_dtype if p.save_ood_maps else None}
        if p.save_ood_maps and p.requested_map_methods:  # a selection of maps: other map files are expected
            payload["ood_map_methods"] = p.ood_map_methods
        if p.calibration_name is not None:  # records flagged with another calibration are not mixed in
            payload["calibration"] = p.calibration_name
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def table_metadata(self, input_folder: str | None) -> dict[str, Any]:
        """Thresholds, normalisation and provenance stored in ``ood_scores.json`` (``input_folder``: the input folder
        of the table's cases, None when they come from several or were given as lists of files)."""
        p = self.predictor
        return {
            "plugin": "nnunet-ood", "plugin_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model_folder": p.model_folder, "folds": [str(f) for f in p.use_folds],
            "checkpoint": p.checkpoint_name, "methods": p.ood_methods,
            "configuration": p.ood_states[0].fingerprint["configuration"],
            "plans": p.ood_states[0].fingerprint["plans_name"],
            "tile_step_size": p.tile_step_size, "use_gaussian": p.use_gaussian,
            "use_mirroring": bool(p.use_mirroring and p.allowed_mirroring_axes),
            "calibration_source": p.calibration_name or "fit",
            # ensemble methods have no calibration: their bounds and threshold are null
            "calibration": {m: {k: None if isinstance(v, float) and v != v else v for k, v in c.to_json().items()}
                            for m, c in p.ood_calibration.items()},
            "calibration_per_fold": {str(f): {m: s.calibration[m].to_json() for m in p.ood_methods
                                              if m in s.calibration} for f, s in zip(p.use_folds, p.ood_states)},
            "ood_maps": maps_metadata(p.save_ood_maps, p.ood_maps_dtype, p.ood_map_methods),  # how and of which methods
            "decision_rules": self.decision_rules(),
            "run_signature": self.run_signature(),
            "input_folder": input_folder,
        }


def _why(entry: dict[str, Any]) -> str:
    """The predicted Dice of a deciding method's case and the reason of a review, without saying it twice."""
    reason, shown = entry.get("reason") or "", f"predicted Dice {1 - entry['score']:.2f}"
    return reason if reason.startswith("predicted Dice") else shown + (f"; {reason}" if reason else "")


class RecordingPreprocessor:
    """Wraps nnU-Net's preprocessor to hand each case's properties to the predictor (sequential mode)."""

    def __init__(self, inner: Any, on_case: Any) -> None:
        self._inner, self._on_case = inner, on_case

    def run_case(self, image_files, *args, **kwargs):
        data, seg, properties = self._inner.run_case(image_files, *args, **kwargs)
        self._on_case(image_files, properties)
        return data, seg, properties

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class RecordingConfigurationManager(ConfigurationManager):
    """The same configuration, but its preprocessor reports the properties of every case it preprocesses."""

    def __init__(self, configuration_manager: ConfigurationManager, on_case: Any) -> None:
        super().__init__(configuration_manager.configuration)
        self._on_case = on_case

    @property
    def preprocessor_class(self):
        real_class, on_case = super().preprocessor_class, self._on_case
        return lambda *args, **kwargs: RecordingPreprocessor(real_class(*args, **kwargs), on_case)
