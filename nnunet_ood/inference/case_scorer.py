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
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nnunet_ood.aggregation import PatchMapAccumulator, aggregate_case_scores, importance_weights, patch_scores_to_maps
from nnunet_ood.errors import OODStateError
from nnunet_ood.methods.base import FoldModels, Method, MethodKind, PatchFeatureMethod, TapContext, load_object
from nnunet_ood.methods.ensemble import FoldEnsemble
from nnunet_ood.segmentation import predicted_foreground
from nnunet_ood.slabs import in_slabs
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
    #: what methods recorded for their fit reports (:meth:`~nnunet_ood.methods.base.Method.case_record`), by method
    records: dict[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass
class CaseView:
    """What a method's :meth:`~nnunet_ood.methods.base.Method.case_score` may look at."""

    layout: SlidingWindowLayout
    logits: torch.Tensor | None
    region_based: bool
    ensemble: FoldEnsemble | None
    #: the taps in use, by ``Method.tap`` (what they collected over the case's patches)
    taps: Mapping[str, Any] = field(default_factory=dict)


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
        # feature vectors of every patch, by feature source, in one buffer per window: one allocation instead of
        # one small tensor per patch, which (kept between the large per-patch temporaries) made the heap grow by
        # about 5 MB per patch at clinical size
        self._n_patches = len(slicers)
        self._features: dict[str, torch.Tensor] = {}
        self._feature_rows = 0
        weights = importance_weights(self.patch_size, self.use_gaussian, device) \
            if self.map_methods or self.taps else None
        self._accumulator = PatchMapAccumulator(len(self.map_methods), padded_shape, weights) \
            if self.map_methods else None
        for tap in self.taps.values():
            tap.begin_window(self._layout, weights)

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
        rows = self._feature_rows
        for source in dict.fromkeys(m.feature_source for m in self.feature_methods):
            features = by_source[source]
            buffer = self._features.get(source)
            if buffer is None:
                buffer = features.new_empty((max(self._n_patches, rows + len(features)), features.shape[1]))
            elif rows + len(features) > len(buffer):  # more patches than the window's slicers: keep them all
                buffer = torch.cat([buffer[:rows], features.new_empty((len(features), buffer.shape[1]))])
            buffer[rows:rows + len(features)] = features
            self._features[source] = buffer
        self._feature_rows = rows + len(next(iter(by_source.values())))

    def finish_window(self) -> None:
        """The fold's sliding window is done: score its patches, keep its maps."""
        models = self.folds[self._fold_index]
        columns = []
        for m in self.feature_methods:
            features = self._features[m.feature_source][:self._feature_rows]
            detector = models.detectors[m.name]
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

    def finish_case(self, logits: torch.Tensor | None, keep_maps: Collection[str] | None = None) -> CaseOutcome:
        """Voxel maps and case scores from what was collected; ``logits``: the final (fold-averaged) logits.

        ``keep_maps``: the methods whose voxel maps the outcome keeps (None: all). The maps are made one method at
        a time and each is reduced to its case score at once, so a case holds one full-size map beyond those
        kept (at 512 x 512 x 300 voxels a float32 map is 300 MB).
        """
        self.in_case = False
        view = CaseView(self._layout, logits, self.region_based, self._ensemble, self.taps)
        foreground = in_slabs(lambda part: predicted_foreground(part, self.region_based), logits, torch.bool) \
            if logits is not None and "foreground_mean" in self.aggregations.values() else None
        scores: dict[str, float] = {}
        kept: dict[str, torch.Tensor] = {}
        for method, voxel_map in self._case_maps(logits):
            voxel_map = voxel_map.to(self.map_device)
            scores[method.name] = float(aggregate_case_scores(voxel_map[None], [self.aggregations[method.name]],
                                                              self._layout, foreground)[0])
            own = method.case_score(voxel_map, view)
            if own is not None:
                scores[method.name] = float(own)
            if keep_maps is None or method.name in keep_maps:
                kept[method.name] = voxel_map
            del voxel_map
        for m in self.derived_methods:
            scores[m.name] = float(m.derived_score(scores, [f.method_params.get(m.name, {}) for f in self.folds], view))
        if not self._input_finite:  # nnU-Net predicts non-finite inputs anyway; their scores must not look valid
            scores = {m: math.nan for m in scores}
        records = {m.name: m.case_record(view) for m in self.methods}
        self.last = CaseOutcome([m.name for m in self.methods], {m.name: scores[m.name] for m in self.methods},
                                {m.name: kept[m.name] for m in self.methods if m.name in kept}, self._input_finite,
                                {name: record for name, record in records.items() if record is not None})
        self._ensemble = None
        return self.last

    def _case_maps(self, logits: torch.Tensor | None) -> Iterator[tuple[Method, torch.Tensor]]:
        """The voxel map of every method with one, made one at a time (by kind; the caller orders the results).

        The patch-map methods come first: their maps exist since the sliding window, and each is released once
        scored, before the feature methods' maps are made."""
        if self.map_methods:
            folds, self._fold_maps = self._fold_maps, []
            for i, m in enumerate(self.map_methods):
                # one fold: its map as it is (the mean of one), without a stacked copy
                yield m, folds[0][i] if len(folds) == 1 else torch.stack([fold[i] for fold in folds]).mean(dim=0)
            del folds
        if self.feature_methods:
            patch_scores = torch.stack(self._fold_patch_scores).mean(dim=0)  # average the folds per patch
            self._fold_patch_scores = []
            weights = importance_weights(self.patch_size, self.use_gaussian, self.map_device)
            for i, m in enumerate(self.feature_methods):
                yield m, patch_scores_to_maps(patch_scores[:, i], self._layout, weights)[0]
        for m in self.ensemble_methods:
            yield m, m.voxel_map(self._ensemble)
        for m in self.logit_methods:
            params = [f.method_params.get(m.name, {}) for f in self.folds]
            if m.voxelwise:
                yield m, in_slabs(lambda part, m=m, params=params: m.voxel_map(part, self.region_based, params),
                                  logits, torch.float32)
            else:
                yield m, m.voxel_map(logits, self.region_based, params)
