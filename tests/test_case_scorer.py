"""The per-case scorer on small tensors: every method kind, several folds, NaN inputs, against numpy.

No network: the scorer is driven the way the predictor drives it (begin_case, begin_fold, patches,
finish_window, end_fold, finish_case), with bottlenecks handed in directly and a test tap.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from nnunet_ood.detectors import MahalanobisDetector
from nnunet_ood.errors import OODStateError
from nnunet_ood.inference.case_scorer import CaseScorer
from nnunet_ood.methods import REGISTRY, DerivedMethod, FoldModels, PatchMapMethod, PatchTap, Requirements, TapContext
from nnunet_ood.methods.features import Mahalanobis

SHAPE, PATCH = (10, 12), (6, 8)
STARTS = [(0, 0), (0, 4), (4, 0), (4, 4)]  # four overlapping patches cover the 10 x 12 image
SLICERS = [(slice(None), slice(y, y + PATCH[0]), slice(x, x + PATCH[1])) for y, x in STARTS]
REVERT = (slice(0, SHAPE[0]), slice(0, SHAPE[1]))


class PatchMeanTap(PatchTap):
    """A test tap: the map of a patch is its input times the fold number plus one."""

    def before_patch(self, fold_index: int) -> None:
        self.fold = fold_index

    def after_patch(self, x, patch_index: int) -> None:
        self.map = x[:, 0] * (self.fold + 1)


class PatchInput(PatchMapMethod):
    name = "patch_input"
    summary = "test method"
    tap = "test_case_scorer:PatchMeanTap"

    def patch_map(self, tap):
        return tap.map


class SumOfScores(DerivedMethod):
    name = "sum_of_scores"
    summary = "test method"
    requires = Requirements(methods=("mahalanobis", "entropy"))

    def derived_score(self, case_scores, fold_params, view=None):
        assert view is not None and view.logits is not None  # derived methods see the final logits
        return case_scores["mahalanobis"] + case_scores["entropy"]


def weighted_average(values_per_patch: list[np.ndarray]) -> np.ndarray:
    """Gaussian-weighted average over the patches covering each voxel, in float64 numpy."""
    w = compute_gaussian(PATCH, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    w = w.double().numpy()
    num, den = np.zeros(SHAPE), np.zeros(SHAPE)
    for (y, x), v in zip(STARTS, values_per_patch):
        num[y:y + PATCH[0], x:x + PATCH[1]] += w * v
        den[y:y + PATCH[0], x:x + PATCH[1]] += w
    return num / den


def run_case(scorer: CaseScorer, data: torch.Tensor, logits_per_fold, n_folds: int = 2):
    """Drive the scorer as the predictor does: two folds, four patches each."""
    scorer.begin_case(data)
    for fold in range(n_folds):
        scorer.begin_fold(SHAPE, SLICERS, REVERT, torch.device("cpu"))
        for sl in SLICERS:
            scorer.before_patch()
            scorer.after_patch(data[sl][None])
        scorer.finish_window()
        scorer.end_fold(logits_per_fold[fold])
    return scorer.finish_case(torch.stack(logits_per_fold).mean(0))


@pytest.fixture()
def setup():
    rng = np.random.default_rng(0)
    folds = [FoldModels(detectors={"mahalanobis": MahalanobisDetector().fit(rng.normal(size=(40, 4 * 2 * 2)))})
             for _ in range(2)]
    methods = [REGISTRY["mahalanobis"], PatchInput(), REGISTRY["entropy"], REGISTRY["ensemble_mi"], SumOfScores()]
    context = TapContext(network=None, folds=folds, fold_names=["0", "1"], region_based=False, mirror_axes=(),
                         device=torch.device("cpu"), method_params={}, predict_options={},
                         shape_of_bottleneck=lambda: ())
    data = torch.from_numpy(rng.normal(size=(1, *SHAPE)).astype(np.float32))
    bottlenecks = [torch.from_numpy(rng.normal(size=(4, 4, 2, 2)).astype(np.float32)) for _ in range(2)]
    logits = [torch.from_numpy(rng.normal(size=(3, *SHAPE)).astype(np.float32)) for _ in range(2)]
    return methods, folds, context, data, bottlenecks, logits


BOTTLENECKS: list[torch.Tensor] = []  # what the test's bottleneck tap "captures", patch after patch


class GivenBottleneckTap(PatchTap):
    def after_patch(self, x, patch_index: int) -> None:
        self.bottleneck = BOTTLENECKS.pop(0)


class GivenMahalanobis(Mahalanobis):
    tap = "test_case_scorer:GivenBottleneckTap"


def test_every_kind_against_numpy(setup):
    methods, folds, context, data, bottlenecks, logits = setup
    methods = [GivenMahalanobis(), *methods[1:]]
    scorer = CaseScorer(methods, folds, {}, region_based=False, patch_size=PATCH, use_gaussian=True,
                        map_device=torch.device("cpu"), tap_context=context)
    BOTTLENECKS[:] = [b[i:i + 1] for b in bottlenecks for i in range(len(SLICERS))]
    outcome = run_case(scorer, data, logits)
    assert not BOTTLENECKS

    pooled = [b.reshape(4, -1).double() for b in bottlenecks]  # a 2x2 bottleneck with 4 channels is not pooled
    patch_scores = np.mean([folds[f].detectors["mahalanobis"].score(pooled[f]).numpy() for f in range(2)], axis=0)
    expected_m = weighted_average([np.full(PATCH, s) for s in patch_scores])
    np.testing.assert_allclose(outcome.maps["mahalanobis"].numpy(), expected_m, rtol=1e-5)
    x = data.double().numpy()[0]
    per_fold = [weighted_average([x[y:y + PATCH[0], c:c + PATCH[1]] * (f + 1) for y, c in STARTS]) for f in range(2)]
    np.testing.assert_allclose(outcome.maps["patch_input"].numpy(), np.mean(per_fold, axis=0), rtol=1e-5, atol=1e-6)
    final = torch.stack(logits).mean(0).double().numpy()
    p = np.exp(final - final.max(0)) / np.exp(final - final.max(0)).sum(0)
    entropy = -(p * np.log(p)).sum(0)
    np.testing.assert_allclose(outcome.maps["entropy"].numpy(), entropy, rtol=1e-5)
    members = [np.exp(z.double().numpy()) / np.exp(z.double().numpy()).sum(0) for z in logits]
    mean = np.mean(members, axis=0)
    mi = -(mean * np.log(mean)).sum(0) - np.mean([-(q * np.log(q)).sum(0) for q in members], axis=0)
    np.testing.assert_allclose(outcome.maps["ensemble_mi"].numpy(), np.maximum(mi, 0), rtol=1e-4, atol=1e-7)
    assert outcome.scores["mahalanobis"] == pytest.approx(expected_m.mean(), rel=1e-6)
    assert outcome.scores["entropy"] == pytest.approx(entropy.mean(), rel=1e-6)
    assert outcome.scores["sum_of_scores"] == pytest.approx(expected_m.mean() + entropy.mean(), rel=1e-6)
    assert "sum_of_scores" not in outcome.maps and outcome.methods == [m.name for m in methods]
    assert outcome.input_finite


def test_nan_input_scores_nan_and_aggregations_follow_the_calibration(setup):
    methods, folds, context, data, bottlenecks, logits = setup
    scorer = CaseScorer([methods[1], methods[2]], folds, {"patch_input": "max_patch"}, region_based=False,
                        patch_size=PATCH, use_gaussian=True, map_device=torch.device("cpu"), tap_context=context)
    outcome = run_case(scorer, data, logits)
    patch_means = [outcome.maps["patch_input"].double().numpy()[y:y + PATCH[0], x:x + PATCH[1]].mean()
                   for y, x in STARTS]
    assert outcome.scores["patch_input"] == pytest.approx(max(patch_means), rel=1e-9)
    broken = data.clone()
    broken[0, 3, 4] = math.nan
    outcome = run_case(scorer, broken, logits)
    assert not outcome.input_finite and all(math.isnan(v) for v in outcome.scores.values())


def test_features_of_another_dimension_are_refused(setup):
    methods, folds, _, data, bottlenecks, logits = setup
    scorer = CaseScorer([methods[0]], folds, {}, region_based=False, patch_size=PATCH, use_gaussian=True,
                        map_device=torch.device("cpu"))
    scorer.begin_case(data)
    scorer.begin_fold(SHAPE, SLICERS, REVERT, torch.device("cpu"))
    scorer.add_bottleneck(torch.zeros(4, 3, 2, 2))
    with pytest.raises(OODStateError, match="12 dimensions but the mahalanobis state expects 16"):
        scorer.finish_window()


def test_voxelwise_maps_in_slabs_equal_the_whole_map(monkeypatch) -> None:
    """Logit methods' maps and the predicted foreground, computed in slabs to bound their temporaries at clinical
    sizes, equal the map computed on the whole volume at once (3D, several slabs and a ragged last one)."""
    from nnunet_ood import slabs as slab_module
    from nnunet_ood.inference import case_scorer
    from nnunet_ood.methods import REGISTRY, MethodKind
    from nnunet_ood.segmentation import predicted_foreground

    monkeypatch.setattr(slab_module, "VOXELWISE_SLAB_VOXELS", 7 * 9 * 2)  # slabs of 2 of the 11 planes
    logits = torch.randn(4, 11, 7, 9, generator=torch.Generator().manual_seed(0)) * 3
    params = [{"temperature": 1.7}]
    for method in (m for m in REGISTRY if m.kind is MethodKind.LOGITS):
        for region_based in (False, True):
            whole = method.voxel_map(logits, region_based, params)
            slabs = case_scorer.in_slabs(lambda part, m=method, r=region_based: m.voxel_map(part, r, params), logits,
                                         torch.float32)
            assert slabs.shape == whole.shape == (11, 7, 9)
            np.testing.assert_allclose(slabs.numpy(), whole.numpy(), rtol=1e-6, atol=1e-7, err_msg=method.name)
    fg = case_scorer.in_slabs(lambda part: predicted_foreground(part, False), logits, torch.bool)
    assert torch.equal(fg, logits.argmax(0) > 0)


def test_voxelwise_maps_in_cache_sized_slabs_match_numpy() -> None:
    """At the real slab size (one 512 x 512 plane per slab) every logit method's map, made in slabs as the case
    scorer makes it, equals a float64 numpy computation of its formula and the map made on the whole volume."""
    from test_methods_logits import numpy_reference

    from nnunet_ood import slabs as slab_module
    from nnunet_ood.inference import case_scorer
    from nnunet_ood.methods import REGISTRY, MethodKind

    logits = torch.randn(3, 3, 512, 512, generator=torch.Generator().manual_seed(1)) * 3
    assert len(list(slab_module.slab_slices(logits.shape[1:], slab_module.VOXELWISE_SLAB_VOXELS))) == 3
    params = [{"temperature": 1.7}]
    for method in (m for m in REGISTRY if m.kind is MethodKind.LOGITS):
        calls = []

        def fn(part, m=method, calls=calls):
            calls.append(part.shape[1])
            return m.voxel_map(part, False, params)

        slabs = case_scorer.in_slabs(fn, logits, torch.float32)
        assert calls == [1, 1, 1], method.name  # one plane per slab
        reference = numpy_reference(method.name, logits.numpy(), False, 1.7)
        np.testing.assert_allclose(slabs.numpy(), reference, rtol=1e-5, atol=1e-6, err_msg=method.name)
        np.testing.assert_allclose(slabs.numpy(), method.voxel_map(logits, False, params).numpy(), rtol=1e-6,
                                   atol=1e-7, err_msg=method.name)
