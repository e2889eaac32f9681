"""Per-case collector and scorer: every method in use, run inside nnU-Net's sliding window.

The predictor (and the fit, through the same predictor) drives one :class:`CaseScorer` per case::

    begin_case(data)
      for each fold:   begin_fold(...)                       # nnU-Net starts its sliding window
                         before_patch(); <nnU-Net's passes>; after_patch(x)   # for every patch
                       finish_window()                       # patch scores and maps of this fold
                       end_fold(logits)                      # the fold's logits (fold ensembles)
    finish_case(logits) -> CaseOutcome                       # voxel maps and raw case scores

The scorer loops over the methods by kind (:class:`nnunet_ood.methods.base.MethodKind`) and calls only
the methods' own computations; it knows no method by name. The fit scores feature methods from an
encoder-only sliding window through :meth:`add_bottleneck` instead of taps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nnunet_ood.aggregation import PatchMapAccumulator, aggregate_case_scores, importance_weights, patch_scores_to_maps
from nnunet_ood.errors import OODStateError
from nnunet_ood.methods.base import FoldModels, Method, MethodKind, PatchFeatureMethod, TapContext, load_object
from nnunet_ood.methods.ensemble import FoldEnsemble
from nnunet_ood.segmentation import predicted_foreground
from nnunet_ood.sliding_window import SlidingWindowLayout


@dataclass
class CaseOutcome:
    """Raw result of one case: case scores (NaN when the input was not finite) and voxel maps.

    ``maps`` (preprocessed space) has an entry for every method with a voxel map (all but derived ones).
    """

    methods: list[str]
    scores: dict[str, float]
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    input_finite: bool = True


@dataclass
class CaseView:
    """What a method's :meth:`~nnunet_ood.methods.base.Method.case_score` may look at."""

    layout: SlidingWindowLayout
    logits: torch.Tensor | None
    region_based: bool
    ensemble: FoldEnsemble | None


class CaseScorer:
    """Collects what the methods need while nnU-Net predicts a case, and scores the case.

    Args:
        methods: methods in use, in table order.
        folds: the fitted models of each fold in use (nnU-Net runs the folds in this order).
        aggregations: method -> how its voxel map becomes the case score (default ``mean``).
        region_based, patch_size, use_gaussian: from the model and the predictor's settings.
        map_device: where patch-score maps are accumulated.
        tap_context: needed when methods listen to forward passes (not for encoder-only scoring).
    """

    def __init__(self, methods: Sequence[Method], folds: Sequence[FoldModels], aggregations: Mapping[str, str], *,
                 region_based: bool, patch_size: Sequence[int], use_gaussian: bool, map_device: torch.device,
                 tap_context: TapContext | None = None) -> None:
        self.methods = list(methods)
        self.folds = list(folds)
        self.aggregations = {m.name: aggregations.get(m.name, "mean") for m in self.methods}
        self.region_based, self.use_gaussian, self.map_device = region_based, use_gaussian, map_device
        self.patch_size = tuple(patch_size)
        of_kind = {kind: [m for m in self.methods if m.kind is kind] for kind in MethodKind}
        self.feature_methods: list[PatchFeatureMethod] = of_kind[MethodKind.PATCH_FEATURES]
        self.map_methods = of_kind[MethodKind.PATCH_MAP]
        self.logit_methods = of_kind[MethodKind.LOGITS]
        self.ensemble_methods = of_kind[MethodKind.FOLD_ENSEMBLE]
        self.derived_methods = of_kind[MethodKind.DERIVED]
        self.taps: dict[str, Any] = {}
        if tap_context is not None:
            for path in dict.fromkeys(m.tap for m in self.methods if m.tap is not None):
                self.taps[path] = load_object(path)(tap_context)
        self._tap_order = sorted(self.taps.values(), key=lambda tap: tap.runs_extra_passes)
        # feature methods share the bottleneck of their tap (they all name the same one)
        self._bottleneck_tap = self.taps.get(self.feature_methods[0].tap) if self.feature_methods else None
        self.last: CaseOutcome | None = None
        self.in_case = False

    def remove(self) -> None:
        """Detach every tap from the network."""
        for tap in self.taps.values():
            tap.remove()
        self.taps = {}

    # ------------------------------------------------------------------ one case
    def begin_case(self, data: torch.Tensor) -> None:
        """A new case: its preprocessed data ``(C, *spatial)`` (only checked for NaN/Inf)."""
        self.in_case = True
        self._input_finite = bool(torch.isfinite(data).all())
        self._fold_index = 0
        self._fold_patch_scores: list[torch.Tensor] = []
        self._fold_maps: list[torch.Tensor] = []
        self._ensemble = FoldEnsemble(self.region_based) if self.ensemble_methods else None
        self._layout: SlidingWindowLayout | None = None

    def begin_fold(self, padded_shape: Sequence[int], slicers: Sequence, revert_padding: Sequence[slice],
                   device: torch.device) -> None:
        """nnU-Net starts the sliding window of the next fold (again, if it retries on the CPU)."""
        self._layout = SlidingWindowLayout(tuple(padded_shape), tuple(slicers), tuple(revert_padding), self.patch_size)
        self._patch_index = 0
        self._features: dict[str, list[torch.Tensor]] = {m.name: [] for m in self.feature_methods}
        self._accumulator = PatchMapAccumulator(len(self.map_methods), padded_shape, importance_weights(
            self.patch_size, self.use_gaussian, device)) if self.map_methods else None

    def before_patch(self) -> None:
        """Before nnU-Net's passes of the next patch."""
        for tap in self._tap_order:
            tap.before_patch(self._fold_index)

    def after_patch(self, x: torch.Tensor) -> None:
        """After nnU-Net's passes of the patch ``x`` (a batch of one)."""
        for tap in self._tap_order:
            tap.after_patch(x, self._patch_index)
        if self._bottleneck_tap is not None:
            self.add_bottleneck(self._bottleneck_tap.bottleneck)
        if self.map_methods:
            maps = torch.cat([m.patch_map(self.taps[m.tap]) for m in self.map_methods])
            self._accumulator.add(maps, self._layout.slicers[self._patch_index])
        self._patch_index += x.shape[0]

    def add_bottleneck(self, bottleneck: torch.Tensor) -> None:
        """Feature vectors of a batch of patches from their bottleneck activations (shared per feature source)."""
        models, by_source = self.folds[self._fold_index], {}
        for m in self.feature_methods:
            if m.feature_source not in by_source:
                by_source[m.feature_source] = m.features(bottleneck, models)
        self.add_features(by_source)

    def add_features(self, by_source: dict[str, torch.Tensor]) -> None:
        """Feature vectors ``(B, D)`` of a batch of patches, by feature source (computed by the caller)."""
        for m in self.feature_methods:
            self._features[m.name].append(by_source[m.feature_source])

    def finish_window(self) -> None:
        """The fold's sliding window is done: score its patches, keep its maps."""
        models = self.folds[self._fold_index]
        columns = []
        for m in self.feature_methods:
            features, detector = torch.cat(self._features[m.name]), models.detectors[m.name]
            if features.shape[1] != detector.n_features_in_:
                raise OODStateError(f"{m.feature_source} features have {features.shape[1]} dimensions but the "
                                    f"{m.name} state expects {detector.n_features_in_}; re-fit with nnUNetv2_fit_ood")
            columns.append(detector.score(features))
        if columns:
            self._fold_patch_scores.append(torch.stack(columns, dim=1).cpu())
        if self._accumulator is not None:
            self._fold_maps.append(self._accumulator.result(self._layout.revert_padding).cpu())
        self._features, self._accumulator = {}, None

    def end_fold(self, logits: torch.Tensor | None) -> None:
        """The fold's logits ``(C, *spatial)`` (cropped to the case); ``None`` in encoder-only scoring."""
        if self._ensemble is not None and logits is not None:
            self._ensemble.add(logits)
        self._fold_index += 1

    def finish_case(self, logits: torch.Tensor | None) -> CaseOutcome:
        """Voxel maps and case scores from what was collected; ``logits``: the final (fold-averaged) logits."""
        self.in_case = False
        maps = self._case_maps(logits)
        names = list(maps)
        aggregations = [self.aggregations[m] for m in names]
        foreground = predicted_foreground(logits, self.region_based) \
            if logits is not None and "foreground_mean" in aggregations else None
        stacked = torch.stack([maps[m].to(self.map_device) for m in names]) if names else None
        values = aggregate_case_scores(stacked, aggregations, self._layout, foreground).tolist() if names else []
        scores = dict(zip(names, values))
        view = CaseView(self._layout, logits, self.region_based, self._ensemble)
        for m in self.methods:
            if m.name in maps:
                own = m.case_score(maps[m.name], view)
                if own is not None:
                    scores[m.name] = float(own)
        for m in self.derived_methods:
            scores[m.name] = float(m.derived_score(scores, [f.method_params.get(m.name, {}) for f in self.folds], view))
        if not self._input_finite:  # nnU-Net predicts non-finite inputs anyway; their scores must not look valid
            scores = {m: math.nan for m in scores}
        self.last = CaseOutcome([m.name for m in self.methods], {m.name: scores[m.name] for m in self.methods},
                                {m: stacked[i] for i, m in enumerate(names)}, self._input_finite)
        self._ensemble = None
        return self.last

    def _case_maps(self, logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Voxel maps of every method with one, in table order."""
        maps: dict[str, torch.Tensor] = {}
        if self.feature_methods:
            patch_scores = torch.stack(self._fold_patch_scores).mean(dim=0)  # average the folds per patch
            weights = importance_weights(self.patch_size, self.use_gaussian, self.map_device)
            maps.update(zip((m.name for m in self.feature_methods),
                            patch_scores_to_maps(patch_scores, self._layout, weights)))
        if self.map_methods:
            maps.update(zip((m.name for m in self.map_methods), torch.stack(self._fold_maps).mean(dim=0)))
        for m in self.ensemble_methods:
            maps[m.name] = m.voxel_map(self._ensemble)
        for m in self.logit_methods:
            maps[m.name] = m.voxel_map(logits, self.region_based, [f.method_params.get(m.name, {}) for f in self.folds])
        return {m.name: maps[m.name] for m in self.methods if m.name in maps}
