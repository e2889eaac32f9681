"""The named passes of a fold's fit. Their cost is bounded by nnU-Net's own validation of the fold plus an
encoder-only pass over (a sample of patches of) the training cases:

* :func:`shared_model_pass`: the shared models (``Requirements.shared``), each trained once for every method that
  requires it;
* :func:`parameter_pass`: each method's own parameters that need no prediction (e.g. the dropout setup);
* :func:`feature_statistics_pass`: the feature detectors, one per part of the training cases, from an
  encoder-only sliding window over the training cases (at most ``max_patches`` patches, a seeded
  sample); it also keeps the features of up to ``normalization_cases`` training cases;
* :func:`training_case_scores`: those cases scored by the detectors of the other parts (cross-fitting),
  for the normalisation bounds of the feature methods;
* :func:`validation_pass`: one prediction of each validation case, as nnU-Net validates the fold (mirroring
  when a method needs the final logits), every method scored at once by the same
  :class:`~nnunet_ood.inference.case_scorer.CaseScorer` as inference;
* :func:`validation_logit_pass`: methods whose parameters are fitted on the validation logits (the
  temperature): fitted, then scored from the validation pass's logits, kept in a temporary folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ood.detectors.cross_fitting import merge_parts
from nnunet_ood.features import BottleneckCapture, unwrap_network
from nnunet_ood.inference.case_scorer import CaseOutcome
from nnunet_ood.methods import FoldModels, Method, MethodKind, PatchFeatureMethod, SharedModel
from nnunet_ood.methods.context import FitContext, mirroring
from nnunet_ood.sliding_window import SlidingWindowLayout, autocast, pad_and_layout, patch_count


def shared_model_pass(context: FitContext, shared: Sequence[SharedModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the fold's shared models: ``(models by name, training histories by provenance key)``."""
    models, histories = {}, {}
    for model in shared:
        models[model.name], histories[model.provenance_key] = model.train(context)
    return models, histories


def parameter_pass(context: FitContext, methods: Sequence[Method]) -> dict[str, dict[str, Any]]:
    """Each method's fitted parameters (only those that have any)."""
    params = {m.name: m.fit_parameters(context) for m in methods}
    return {name: p for name, p in params.items() if p}


class EncoderPass:
    """Bottleneck activations of a preprocessed case's sliding-window patches, encoder only, in batches."""

    def __init__(self, context: FitContext) -> None:
        self.context = context
        self.network = context.predictor.network.to(context.device)
        self.network.eval()
        self.capture = BottleneckCapture(self.network)

    def num_patches(self, key: str) -> int:
        """Sliding-window patches of a case, from its array's shape (the image itself is not read)."""
        return patch_count(self.context.predictor, self.context.dataset.load_case(key)[0].shape[1:])

    def bottlenecks(self, data: torch.Tensor, patches: Sequence[int] | None = None) \
            -> tuple[SlidingWindowLayout, list[torch.Tensor]]:
        """``(layout, bottleneck batches)`` of the chosen ``patches`` (default: all) with nnU-Net's padding,
        slicers and autocast."""
        padded, layout = pad_and_layout(self.context.predictor, data)
        chosen = list(range(layout.num_patches)) if patches is None else list(patches)
        encoder, device, size, out = unwrap_network(self.network).encoder, self.context.device, \
            self.context.options.batch_size, []
        with torch.inference_mode(), autocast(device):
            for start in range(0, len(chosen), size):
                batch = torch.stack([padded[layout.slicers[i]] for i in chosen[start:start + size]]).to(device)
                self.capture.arm()
                encoder(batch)
                out.append(self.capture.take())
        return layout, out

    def remove(self) -> None:
        self.capture.remove()


def patch_sample(context: FitContext, encoder: EncoderPass, keys: Sequence[str]) -> tuple[dict[str, Any], int]:
    """``({case: patch indices or None for all}, total patches)``: at most ``max_patches`` patches of the training
    cases, a seeded uniform sample over all their patches when there are more."""
    counts = {k: encoder.num_patches(k) for k in keys}
    total = sum(counts.values())
    if total <= context.options.max_patches:
        return {k: None for k in keys}, total
    chosen = np.sort(np.random.default_rng(context.seed).choice(total, context.options.max_patches, replace=False))
    sample, start = {}, 0
    for k in keys:
        sample[k] = chosen[(chosen >= start) & (chosen < start + counts[k])] - start
        start += counts[k]
    return sample, total


@dataclass
class FeatureStatistics:
    """What the feature statistics pass leaves: detectors per part, patch counts, features of some cases."""

    part_detectors: dict[str, list]
    n_patches: int  # patches the detectors were fitted on
    n_total_patches: int  # patches of all training cases
    kept_features: dict[str, dict[str, torch.Tensor]]  # case -> feature source -> (P, D), all patches
    layouts: dict[str, SlidingWindowLayout]


def feature_statistics_pass(context: FitContext, encoder: EncoderPass, methods: Sequence[PatchFeatureMethod],
                            models: FoldModels, parts: dict[str, int], n_parts: int,
                            kept: Sequence[str]) -> FeatureStatistics:
    """One detector per method and part of the training cases, fitted on (a sample of) their patch features;
    the features of every patch of the ``kept`` cases are kept for their cross-fitted scores."""
    device = context.device
    part_detectors = {m.name: [m.new_detector(context.options, device) for _ in range(n_parts)] for m in methods}
    # rows are buffered and streamed in blocks: each update touches the D x D statistics once
    buffers = {(m.name, p): _RowBuffer(part_detectors[m.name][p]) for m in methods for p in range(n_parts)}
    sample, total = patch_sample(context, encoder, context.train_keys)
    n_patches, kept_features, layouts = 0, {}, {}
    for key in tqdm(context.train_keys, desc=f"fold {context.fold}: fitting {', '.join(m.name for m in methods)}",
                    disable=not context.progress):
        keep = key in kept  # kept cases need every patch; the detectors see the sampled ones only
        layout, batches = encoder.bottlenecks(context.load_case(key), None if keep else sample[key])
        fitted = torch.from_numpy(np.asarray(sample[key])) if keep and sample[key] is not None else slice(None)
        by_source: dict[str, torch.Tensor] = {}
        with torch.inference_mode(), autocast(device):  # features as at inference, inside nnU-Net's autocast
            for m in methods:
                if m.feature_source not in by_source:
                    by_source[m.feature_source] = torch.cat([m.features(b, models) for b in batches]).float()
                buffers[m.name, parts[key]].add(by_source[m.feature_source][fitted])
        n_patches += len(next(iter(by_source.values()))[fitted])
        if keep:
            kept_features[key], layouts[key] = by_source, layout
    for buffer in buffers.values():
        buffer.flush()
    return FeatureStatistics(part_detectors, n_patches, total, kept_features, layouts)


class _RowBuffer:
    """Collects feature rows for a detector and fits them in blocks of at least ``rows`` rows."""

    def __init__(self, detector: Any, rows: int = 2048) -> None:
        self.detector, self.rows, self._blocks, self._n = detector, rows, [], 0

    def add(self, x: torch.Tensor) -> None:
        self._blocks.append(x)
        self._n += x.shape[0]
        if self._n >= max(self.rows, x.shape[1] // 4):
            self.flush()

    def flush(self) -> None:
        if self._blocks:
            self.detector.partial_fit(torch.cat(self._blocks))
            self._blocks, self._n = [], 0


def _held_out(methods: Sequence[PatchFeatureMethod], part_detectors: dict[str, list], part: int, context: FitContext):
    """Detectors fitted without part ``part`` (None when some could not score: in-sample scores instead)."""
    others = {m.name: merge_parts(part_detectors[m.name], m.new_detector(context.options, context.device), skip=part)
              for m in methods}
    return others if all(m.can_score(others[m.name]) for m in methods) else None


def training_case_scores(context: FitContext, methods: Sequence[PatchFeatureMethod], models: FoldModels,
                         stats: FeatureStatistics, parts: dict[str, int], n_parts: int,
                         aggregations: dict[str, str]) -> dict[str, dict[str, float]]:
    """Cross-fitted case scores of the kept training cases: each scored by the detectors of the other parts."""
    scorer = context.predictor.make_scorer(methods, [models], aggregations, with_taps=False)
    needs_logits = any(aggregations.get(m.name) == "foreground_mean" for m in methods)
    scores = {}
    for part in range(n_parts):
        held_out = _held_out(methods, stats.part_detectors, part, context) if n_parts > 1 else None
        scorer.folds = [FoldModels(held_out or models.detectors, models.shared, models.method_params)]
        for key in (k for k in stats.kept_features if parts[k] == part):
            data, layout = context.load_case(key), stats.layouts[key]
            scorer.begin_case(data)
            scorer.begin_fold(layout.padded_shape, layout.slicers, layout.revert_padding, context.device)
            with torch.inference_mode():
                scorer.add_features(stats.kept_features[key])
                scorer.finish_window()
                scorer.end_fold(None)
                scores[key] = scorer.finish_case(context.predict_logits(data) if needs_logits else None).scores
    return scores


def scored_predictions(context: FitContext, methods: Sequence[Method], models: FoldModels,
                       aggregations: dict[str, str], cases: Sequence[tuple[str, Callable[[], torch.Tensor]]],
                       desc: str, mirrored: bool = False,
                       record_fit_reports: bool = False) -> Iterator[tuple[str, torch.Tensor, CaseOutcome]]:
    """``(key, final logits, outcome)`` of each case, predicted once as at inference with every method scored (the
    outcome's ``scores``; its ``records`` with ``record_fit_reports``, see ``Method.case_record``).

    ``cases`` gives a key and a loader of the preprocessed image per case. Mirroring is on when ``mirrored`` or
    when a method needs the final logits or mirrored passes (feature scores and sd come from the un-mirrored
    pass either way).
    """
    predictor = context.predictor
    mirrored = mirrored or any(m.kind in (MethodKind.LOGITS, MethodKind.FOLD_ENSEMBLE) or m.requires.mirroring
                               for m in methods)
    with mirroring(predictor, mirrored):
        scorer = predictor.make_scorer(methods, [models], aggregations, record_fit_reports=record_fit_reports)
        try:
            with predictor.scoring(scorer):
                for key, load in tqdm(cases, disable=not context.progress, desc=desc):
                    logits = predictor.predict_logits_from_preprocessed_data(load())
                    yield key, logits, scorer.last
        finally:
            scorer.remove()


def validation_pass(context: FitContext, methods: Sequence[Method], models: FoldModels,
                    aggregations: dict[str, str], keep_logits: bool,
                    on_logits: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, dict[str, float]]:
    """Case scores of the validation cases, every method from one prediction per case, as at inference.

    ``keep_logits``: keep the final logits for :func:`validation_logit_pass`; ``on_logits(key, logits)`` sees
    each case's final logits (the failure table's clean rows). Both predict with mirroring, as default inference.
    What the methods record for their fit reports goes into ``context.case_records``.
    """
    scores = {}
    cases = [(key, lambda key=key: context.load_case(key)) for key in context.val_keys]
    for key, logits, outcome in scored_predictions(
            context, methods, models, aggregations, cases, f"fold {context.fold}: scoring the validation cases",
            mirrored=keep_logits or on_logits is not None, record_fit_reports=True):
        scores[key] = dict(outcome.scores)
        context.case_records[key] = outcome.records
        if keep_logits:
            context.keep_validation_logits(key, logits)
        if on_logits is not None:
            on_logits(key, logits)
    return scores


def validation_logit_pass(context: FitContext, methods: Sequence[Method], models: FoldModels,
                          aggregations: dict[str, str]) -> dict[str, dict[str, float]]:
    """Fit the methods whose parameters need the validation logits, then score them from those logits."""
    for m in methods:
        params = m.fit_parameters(context)
        if params:
            models.method_params[m.name] = params
    scorer = context.predictor.make_scorer(methods, [models], aggregations, with_taps=False)
    scores = {}
    for key in context.val_keys:
        data, logits = context.load_case(key), context.validation_logits(key).float()
        _, layout = pad_and_layout(context.predictor, data)
        scorer.begin_case(data)
        scorer.begin_fold(layout.padded_shape, layout.slicers, layout.revert_padding, torch.device("cpu"))
        scorer.finish_window()
        scorer.end_fold(logits)
        scores[key] = scorer.finish_case(logits).scores
    return scores
