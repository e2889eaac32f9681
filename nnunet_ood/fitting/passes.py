"""The named passes of a fold's fit, each over the fold's preprocessed cases.

* :func:`autoencoder_pass`: the SD autoencoder, trained once for every method that requires it;
* :func:`parameter_pass`: each method's own fitted parameters (e.g. the temperature);
* :func:`feature_statistics_pass`: the feature detectors, one per part of the training cases
  (encoder only, patches in batches);
* :func:`calibration_pass`: case scores of the training and validation cases for the normalisation
  and the threshold, through the same :class:`~nnunet_ood.inference.case_scorer.CaseScorer` as
  inference: feature methods from an encoder-only sliding window (training cases cross-fitted),
  every other method from nnU-Net's own prediction with mirroring, as at default inference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ood.detectors.cross_fitting import merge_parts
from nnunet_ood.features import BottleneckCapture, unwrap_network
from nnunet_ood.fitting.options import FitOptions
from nnunet_ood.folds import Fold
from nnunet_ood.inference.predictor import nnUNetOODPredictor
from nnunet_ood.methods import FoldModels, Method, MethodKind, PatchFeatureMethod
from nnunet_ood.sliding_window import autocast, pad_and_layout, window_batches


def as_tensor(data: Any) -> torch.Tensor:
    """A preprocessed case's image array (possibly memory-mapped) as a float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(data[:], dtype=np.float32)))


@contextmanager
def mirroring_on(predictor: nnUNetOODPredictor) -> Iterator[nnUNetOODPredictor]:
    """Predict with nnU-Net's test-time mirroring, as default inference does (the fit's predictor has it off)."""
    mirroring, predictor.use_mirroring = predictor.use_mirroring, True
    try:
        yield predictor
    finally:
        predictor.use_mirroring = mirroring


@dataclass
class FitContext:
    """One fold's fit: the predictor of the fold, its cases and the options. Passed to methods' fit hooks."""

    predictor: nnUNetOODPredictor
    options: FitOptions
    fold: Fold
    dataset_class: Any  # nnU-Net's dataset class of the preprocessed data
    data_folder: str
    train_keys: list[str]
    val_keys: list[str]
    dataset: Any = field(init=False)

    def __post_init__(self) -> None:
        self.dataset = self.dataset_class(self.data_folder, sorted(set(self.train_keys) | set(self.val_keys)))

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def seed(self) -> int:
        return self.options.seed

    @property
    def progress(self) -> bool:
        return self.options.progress

    @property
    def label_manager(self) -> Any:
        return self.predictor.label_manager

    def log(self, message: str) -> None:
        print(f"fold {self.fold} {message}", flush=True)

    def load_case(self, key: str) -> torch.Tensor:
        """The preprocessed image of a case ``(C, *spatial)``."""
        return self.load_case_with_labels(key)[0]

    def load_case_with_labels(self, key: str) -> tuple[torch.Tensor, np.ndarray]:
        """The preprocessed image and nnU-Net's preprocessed segmentation of a case."""
        data, seg, _, _ = self.dataset.load_case(key)
        return as_tensor(data), seg

    def predict_logits(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's own prediction of a preprocessed case (sliding window, mirroring as at default inference)."""
        with mirroring_on(self.predictor):
            return self.predictor.predict_logits_from_preprocessed_data(data)


def autoencoder_pass(context: FitContext) -> tuple[Any, dict]:
    """Train the SD autoencoder of the fold (``(autoencoder, training history)``)."""
    from nnunet_ood.methods.sd.training import train_fold_autoencoder

    return train_fold_autoencoder(context)


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

    def bottlenecks(self, data: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
        """``(layout, bottleneck batches)`` with nnU-Net's padding, slicers and autocast."""
        padded, layout = pad_and_layout(self.context.predictor, data)
        encoder, device, out = unwrap_network(self.network).encoder, self.context.device, []
        with torch.inference_mode(), autocast(device):
            for _, _, batch in window_batches(padded, layout, self.context.options.batch_size, device):
                self.capture.arm()
                encoder(batch)
                out.append(self.capture.take())
        return layout, out

    def remove(self) -> None:
        self.capture.remove()


def feature_statistics_pass(context: FitContext, encoder: EncoderPass, methods: Sequence[PatchFeatureMethod],
                            models: FoldModels, parts: dict[str, int], n_parts: int) -> tuple[dict[str, list], int]:
    """One detector per method and part of the training cases, fitted on the cases' patch features."""
    device = context.device
    part_detectors = {m.name: [m.new_detector(context.options, device) for _ in range(n_parts)] for m in methods}
    n_patches = 0
    for key in tqdm(context.train_keys, desc=f"fold {context.fold}: fitting {', '.join(m.name for m in methods)}",
                    disable=not context.progress):
        _, batches = encoder.bottlenecks(context.load_case(key))
        by_source: dict[str, torch.Tensor] = {}
        with torch.inference_mode(), autocast(device):  # features as at inference, inside nnU-Net's autocast
            for m in methods:
                if m.feature_source not in by_source:
                    by_source[m.feature_source] = torch.cat([m.features(b, models) for b in batches])
                part_detectors[m.name][parts[key]].partial_fit(by_source[m.feature_source])
        n_patches += sum(b.shape[0] for b in batches)
    return part_detectors, n_patches


def _held_out(methods: Sequence[PatchFeatureMethod], part_detectors: dict[str, list], part: int, context: FitContext):
    """Detectors fitted without part ``part`` (None when some could not score: in-sample scores instead)."""
    others = {m.name: merge_parts(part_detectors[m.name], m.new_detector(context.options, context.device), skip=part)
              for m in methods}
    return others if all(m.can_score(others[m.name]) for m in methods) else None


def calibration_pass(context: FitContext, encoder: EncoderPass, methods: Sequence[Method], models: FoldModels,
                     part_detectors: dict[str, list], parts: dict[str, int], n_parts: int,
                     aggregations: dict[str, str]) -> dict[str, dict[str, float]]:
    """Case scores ``{case: {method: score}}`` of the fold's validation and training cases."""
    predictor = context.predictor
    case_scores: dict[str, dict[str, float]] = {k: {} for k in [*context.train_keys, *context.val_keys]}
    features = [m for m in methods if m.kind is MethodKind.PATCH_FEATURES]
    if features:
        scorer = predictor.make_scorer(features, [models], aggregations, with_taps=False)
        needs_logits = any(aggregations.get(m.name) == "foreground_mean" for m in features)

        def score(key: str) -> dict[str, float]:
            data = context.load_case(key)
            layout, batches = encoder.bottlenecks(data)
            scorer.begin_case(data)
            scorer.begin_fold(layout.padded_shape, layout.slicers, layout.revert_padding, context.device)
            with torch.inference_mode():
                with autocast(context.device):  # features as at inference, inside nnU-Net's autocast
                    for bottleneck in batches:
                        scorer.add_bottleneck(bottleneck)
                scorer.finish_window()
                scorer.end_fold(None)
                return scorer.finish_case(context.predict_logits(data) if needs_logits else None).scores

        with tqdm(total=len(case_scores), desc=f"fold {context.fold}: calibrating",
                  disable=not context.progress) as bar:
            for key in context.val_keys:  # by the fold's detectors
                case_scores[key].update(score(key))
                bar.update()
            for part in range(n_parts):  # each part's training cases by the detectors of the other parts
                held_out = _held_out(features, part_detectors, part, context) if n_parts > 1 else None
                scorer.folds = [FoldModels(held_out or models.detectors, models.autoencoder, models.method_params)]
                for key in (k for k in context.train_keys if parts[k] == part):
                    case_scores[key].update(score(key))
                    bar.update()
                del held_out
    inference = [m for m in methods if m.kind in (MethodKind.PATCH_MAP, MethodKind.LOGITS)]
    if inference:
        with mirroring_on(predictor):
            scorer = predictor.make_scorer(inference, [models], aggregations)
            try:
                with predictor.scoring(scorer):
                    for key in tqdm([*context.val_keys, *context.train_keys], disable=not context.progress,
                                    desc=f"fold {context.fold}: calibrating {', '.join(m.name for m in inference)}"):
                        predictor.predict_logits_from_preprocessed_data(context.load_case(key))
                        case_scores[key].update(scorer.last.scores)
            finally:
                scorer.remove()
    for m in (m for m in methods if m.kind is MethodKind.DERIVED):
        for scores in case_scores.values():
            scores[m.name] = m.derived_score(scores, [models.method_params.get(m.name, {})])
    return case_scores
