"""The failure-table pass: the fold's validation cases, clean and corrupted, with Dice and every method's score.

The validation cases are the only cases with labels that the fold's network never trained on. Each gets
``corruptions_per_case`` corrupted versions (:mod:`nnunet_ood.quality.corruptions`: seeded, graded, spatial
ones applied to image and label alike), predicted by the fold's model as at inference with every fitted
method scored; the Dice against the (transformed) reference and simple properties of the predicted
segmentation complete each row. The clean rows come from the validation pass itself, so the pass costs
``corruptions_per_case`` times nnU-Net's validation of the fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from nnunet_ood.fitting.passes import scored_predictions
from nnunet_ood.methods import FoldModels, Method
from nnunet_ood.methods.context import FitContext
from nnunet_ood.quality.properties import (
    property_names,
    reference_volumes,
    segmentation_dice,
    segmentation_properties,
)
from nnunet_ood.quality.table import CLEAN, FailureTable

#: training cases whose reference segmentations give the median class volumes (a seeded sample above it)
MAX_REFERENCE_CASES = 100


def training_reference(context: FitContext) -> dict[str, float]:
    """Median volume of each foreground class over (a seeded sample of) the training cases' references."""
    keys = sorted(context.train_keys)
    if len(keys) > MAX_REFERENCE_CASES:
        keys = sorted(np.random.default_rng(context.seed).choice(keys, MAX_REFERENCE_CASES, replace=False).tolist())
    return reference_volumes((context.load_case_with_labels(k)[1] for k in keys), context.label_manager)


class FailureTableBuilder:
    """Collects the rows: clean ones from the validation pass (:meth:`clean_row`), corrupted ones from
    :meth:`corrupted_rows`; :meth:`table` joins the clean rows' method scores once they are all known."""

    def __init__(self, context: FitContext, inputs: Sequence[str]) -> None:
        self.context, self.inputs = context, list(inputs)
        self.reference = training_reference(context)
        self.features = self.inputs + property_names(context.label_manager)
        self._clean: dict[str, tuple[float, dict[str, float]]] = {}
        self._corrupted: list[tuple[str, int, str, int, float, dict[str, float]]] = []

    def _measure(self, logits: torch.Tensor, seg: Any) -> tuple[float, dict[str, float]]:
        manager = self.context.label_manager
        return segmentation_dice(logits, seg, manager), segmentation_properties(logits, manager, self.reference)

    def clean_row(self, key: str, logits: torch.Tensor) -> None:
        """Dice and properties of a validation case's own prediction (its scores come later)."""
        self._clean[key] = self._measure(logits, self.context.load_case_with_labels(key)[1])

    def corrupted_rows(self, methods: Sequence[Method], models: FoldModels, aggregations: dict[str, str],
                       per_case: int, chain: int = 1) -> None:
        """Predict ``per_case`` corrupted versions of every validation case, every method scored; each version
        applies ``chain`` different corruptions of the family one after the other (a scanner rarely differs in
        one way only)."""
        from nnunet_ood.quality.corruptions import corrupt, corruption_plan

        context = self.context
        plan = corruption_plan(context.val_keys, per_case * chain, context.seed)
        versions: list[list[Any]] = []  # consecutive planned corruptions of a case, ``chain`` at a time
        for step in plan:
            if not versions or versions[-1][0].case != step.case or len(versions[-1]) == chain:
                versions.append([])
            versions[-1].append(step)
        labels: dict[int, Any] = {}

        def loader(i: int):
            def load() -> torch.Tensor:
                data, seg = context.load_case_with_labels(versions[i][0].case)
                image, label = data, np.asarray(seg[:])
                for step in versions[i]:
                    image, label = corrupt(image, label, step.corruption, step.severity, step.seed)
                labels[i] = label
                return image
            return load

        cases = [(str(i), loader(i)) for i in range(len(versions))]
        numbers: dict[str, int] = {}
        for key, logits, outcome in scored_predictions(context, methods, models, aggregations, cases,
                                                       f"fold {context.fold}: scoring corrupted validation cases"):
            scores = outcome.scores
            steps = versions[int(key)]
            case = steps[0].case
            numbers[case] = numbers.get(case, 0) + 1
            dice, properties = self._measure(logits, labels.pop(int(key)).numpy())
            self._corrupted.append((case, numbers[case], "+".join(s.corruption for s in steps),
                                    max(s.severity for s in steps), dice,
                                    {**{m: scores[m] for m in self.inputs}, **properties}))

    def table(self, val_scores: dict[str, dict[str, float]]) -> FailureTable:
        """Every row, clean ones first (case order), then the corrupted versions in plan order."""
        table = FailureTable(self.features)
        for key in self.context.val_keys:
            dice, properties = self._clean[key]
            table.add(key, 0, CLEAN, 0, dice, {**{m: val_scores[key][m] for m in self.inputs}, **properties})
        for case, version, corruption, severity, dice, values in self._corrupted:
            table.add(case, version, corruption, severity, dice, values)
        return table
