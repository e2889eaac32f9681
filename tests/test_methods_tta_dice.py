"""``tta_dice``: pairwise Dice of nnU-Net's mirrored passes, against flips run by hand and a numpy Dice."""

from __future__ import annotations

import itertools
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from torch import nn

from nnunet_ood.methods import REGISTRY
from nnunet_ood.methods.base import FoldModels, TapContext
from nnunet_ood.methods.tta import mirror_axes_combinations
from nnunet_ood.methods.tta_dice import MirroredMaskTap, TTADice

SHAPE = (6, 8)
AXES = (0, 1)


class _TinyNet(nn.Module):
    """Not mirror-invariant: a position-dependent bias makes mirrored passes disagree. Class 3 never wins."""

    def __init__(self, mirror_invariant: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1 if mirror_invariant else 3, padding=0 if mirror_invariant else 1)
        bias = torch.zeros(1, 4, *SHAPE) if mirror_invariant else torch.randn(1, 4, *SHAPE)
        bias[:, 3] = -100.0
        self.bias = nn.Parameter(bias)

    def forward(self, x):
        return self.conv(x) + self.bias


def _context(net: nn.Module, region_based: bool = False, folds: int = 1) -> TapContext:
    return TapContext(network=net, folds=[FoldModels()] * folds, fold_names=[str(f) for f in range(folds)],
                      region_based=region_based, mirror_axes=AXES, device=torch.device("cpu"), method_params={},
                      predict_options={}, shape_of_bottleneck=lambda: ())


def _passes(net: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    """nnU-Net's passes of a patch, as its _internal_maybe_mirror_and_predict runs them; the logits flipped back."""
    with torch.no_grad():
        outputs = [net(x)] + [torch.flip(net(torch.flip(x, f)), f) for f in mirror_axes_combinations(AXES)]
    return [o.double().numpy() for o in outputs]


def _run_patch(tap: MirroredMaskTap, net: nn.Module, x: torch.Tensor, fold: int, index: int) -> list[np.ndarray]:
    """The passes of a patch with the tap armed, as the case scorer drives it."""
    tap.before_patch(fold)
    passes = _passes(net, x)
    tap.after_patch(x, index)
    with torch.no_grad():
        net(x)  # passes after the patch are not counted
    return passes


def _masks(logits: np.ndarray, region_based: bool) -> np.ndarray:
    """``(B, K, *patch)`` foreground masks of ``(B, C, *patch)`` logits, in numpy."""
    if region_based:
        return 1 / (1 + np.exp(-logits)) > 0.5
    labels = logits.argmax(1)
    return np.stack([labels == k for k in range(1, logits.shape[1])], axis=1)


def _gaussian() -> np.ndarray:
    weights = compute_gaussian(SHAPE, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    return weights.double().numpy()


def _reference_counts(passes: list[np.ndarray], region_based: bool,
                      weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair and class, weighted sums of A_i & A_j and of A_i + A_j; the share of disagreeing pairs per voxel."""
    masks = [_masks(p, region_based) for p in passes]
    pairs = list(itertools.combinations(range(len(masks)), 2))
    classes = range(masks[0].shape[1])
    overlap = np.array([[(weights * (masks[i][:, k] & masks[j][:, k])).sum() for k in classes] for i, j in pairs])
    total = np.array([[(weights * (masks[i][:, k].astype(float) + masks[j][:, k])).sum() for k in classes]
                      for i, j in pairs])
    differ = np.mean([(masks[i] != masks[j]).any(1) for i, j in pairs], axis=0)
    return overlap, total, differ


def _reference_score(overlap: np.ndarray, total: np.ndarray) -> float:
    dice = np.where(total > 0, 2 * overlap / np.where(total > 0, total, 1), 1.0)
    return 1.0 - dice.mean()


def _case(tap: MirroredMaskTap | None, net: nn.Module, patches: list[list[torch.Tensor]], region_based: bool = False,
          weights: np.ndarray | None = None) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
    """Run the patches of each fold through the tap (if any); ``(reference score, [(tap's map, reference map)])``."""
    weights = _gaussian() if weights is None else weights
    overlap = total = 0
    maps = []
    for fold, fold_patches in enumerate(patches):
        for index, x in enumerate(fold_patches):
            passes = _passes(net, x) if tap is None else _run_patch(tap, net, x, fold, index)
            o, t, differ = _reference_counts(passes, region_based, weights)
            overlap, total = overlap + o, total + t
            maps.append((None if tap is None else tap.disagreement.numpy(), differ))
    return _reference_score(overlap, total), maps


def _score(tap: MirroredMaskTap) -> float:
    """The case score as the case scorer reads it (``CaseView.taps``)."""
    return TTADice().case_score(torch.zeros(SHAPE), SimpleNamespace(taps={TTADice.tap: tap}))


@pytest.mark.parametrize("region_based", [False, True])
def test_map_and_case_score_match_a_numpy_dice_over_flips_by_hand(region_based):
    torch.manual_seed(0)
    net = _TinyNet().eval()
    tap = MirroredMaskTap(_context(net, region_based, folds=2))
    patches = [[torch.randn(1, 1, *SHAPE) for _ in range(3)] for _ in range(2)]  # two folds of three patches
    try:
        expected, maps = _case(tap, net, patches, region_based)
        for got, want in maps:
            assert got.shape == (1, *SHAPE) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, atol=1e-7)
        assert sum(want.sum() for _, want in maps) > 0  # the passes do disagree
        score = _score(tap)
        assert score == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert 0 < score < 1
        uniform, _ = _case(None, net, patches, region_based, np.ones(SHAPE))
        assert score != pytest.approx(uniform, rel=1e-6)  # the Gaussian weighting matters
        with pytest.raises(RuntimeError, match="no patch"):
            tap.take_score()  # read once: the tap has started afresh
        tap.before_patch(0)
        with torch.no_grad():
            net(patches[0][0])
        with pytest.raises(RuntimeError, match="mirrored passes"):
            tap.after_patch(patches[0][0], 0)  # only one pass: no mirroring
    finally:
        tap.remove()
    assert not net._forward_hooks


def test_a_class_empty_in_every_pass_counts_as_dice_one():
    torch.manual_seed(1)
    net = _TinyNet().eval()
    tap = MirroredMaskTap(_context(net))
    try:
        x = torch.randn(1, 1, *SHAPE)
        passes = _run_patch(tap, net, x, 0, 0)
        overlap, total, _ = _reference_counts(passes, False, _gaussian())
        assert (total[:, 2] == 0).all() and (total[:, :2] > 0).all()  # class 3 never wins
        dice = (2 * overlap[:, :2] / total[:, :2]).sum() + len(total)  # + Dice 1 per pair for class 3
        assert _score(tap) == pytest.approx(1 - dice / overlap.size, rel=1e-9)
    finally:
        tap.remove()


@pytest.mark.parametrize("region_based", [False, True])
def test_identical_passes_give_zero(region_based):
    torch.manual_seed(2)
    net = _TinyNet(mirror_invariant=True).eval()  # a pointwise network: flipping commutes with it
    tap = MirroredMaskTap(_context(net, region_based))
    try:
        for index in range(3):
            _run_patch(tap, net, torch.randn(1, 1, *SHAPE), 0, index)
            assert not tap.disagreement.any()
        assert _score(tap) == 0.0
    finally:
        tap.remove()


def test_cases_in_a_row_and_a_retried_fold_score_as_each_alone():
    torch.manual_seed(3)
    net = _TinyNet().eval()
    a, b = ([[torch.randn(1, 1, *SHAPE) for _ in range(2)] for _ in range(2)] for _ in range(2))
    alone = {}
    for name, patches in (("a", a), ("b", b)):
        tap = MirroredMaskTap(_context(net, folds=2))
        _case(tap, net, patches)
        alone[name] = _score(tap)
        tap.remove()
    assert alone["a"] != pytest.approx(alone["b"])
    tap = MirroredMaskTap(_context(net, folds=2))
    try:
        expected_a, _ = _case(tap, net, a)
        assert _score(tap) == pytest.approx(alone["a"], rel=1e-12) == pytest.approx(expected_a, rel=1e-9)
        assert _case(tap, net, b)[0] == pytest.approx(_score(tap), rel=1e-9)
        # a case whose score was never read (an error in the prediction) does not leak into the next one
        _case(tap, net, [a[0]])
        _case(tap, net, b)
        assert _score(tap) == pytest.approx(alone["b"], rel=1e-12)
        # a fold retried from its first patch (nnU-Net's retry on the CPU) is counted once
        _run_patch(tap, net, a[0][0], 0, 0)
        _run_patch(tap, net, a[0][1], 0, 1)
        _run_patch(tap, net, b[1][0], 1, 0)  # fold 1 begins with other patches, then is retried
        _run_patch(tap, net, a[1][0], 1, 0)
        _run_patch(tap, net, a[1][1], 1, 1)
        assert _score(tap) == pytest.approx(alone["a"], rel=1e-12)
        # fold 0's first patch starts the case: an aborted case's later folds are dropped, not only fold 0's counts
        _case(tap, net, a[:1] + [a[1][:1]])
        expected_b0, _ = _case(tap, net, b[:1])
        assert _score(tap) == pytest.approx(expected_b0, rel=1e-9)
    finally:
        tap.remove()


def test_registered_after_tta_needs_mirroring_and_is_not_a_default():
    names = REGISTRY.names
    assert names[names.index("tta") + 1] == "tta_dice"
    method = REGISTRY["tta_dice"]
    assert method.requires.mirroring and not method.fit_by_default and method.score_range == (0.0, 1.0)


def _brute_force_case(predictor, data: torch.Tensor) -> tuple[np.ndarray, float]:
    """The map and case score of one case from the predictor's network, every flip and count by hand."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    patch = tuple(predictor.configuration_manager.patch_size)
    region_based = predictor.label_manager.has_regions
    padded, revert = pad_nd_image(data.numpy(), patch, "constant", {"value": 0}, True, None)
    weights = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    weights = weights.double().numpy()
    numerator, denominator = np.zeros(padded.shape[1:]), np.zeros(padded.shape[1:])
    axes = [a + 2 for a in predictor.allowed_mirroring_axes]
    flips = [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
    overlap = total = 0
    for sl in predictor._internal_get_sliding_window_slicers(padded.shape[1:]):
        x = torch.from_numpy(padded[sl][None])
        with torch.no_grad():
            passes = [predictor.network(x).double().numpy()] + [
                torch.flip(predictor.network(torch.flip(x, f)), f).double().numpy() for f in flips]
        masks = [_masks(p, region_based)[0] for p in passes]  # (K, *patch)
        pairs = list(itertools.combinations(range(len(masks)), 2))
        overlap = overlap + np.array([[(weights * (masks[i][k] & masks[j][k])).sum() for k in range(len(masks[0]))]
                                      for i, j in pairs])
        total = total + np.array([[(weights * masks[i][k]).sum() + (weights * masks[j][k]).sum()
                                   for k in range(len(masks[0]))] for i, j in pairs])
        numerator[sl[1:]] += np.mean([(masks[i] != masks[j]).any(0) for i, j in pairs], axis=0) * weights
        denominator[sl[1:]] += weights
    return (numerator / denominator)[tuple(revert[1:])], _reference_score(overlap, total)


def test_fit_and_predict_end_to_end(tiny_project, tmp_path):
    """Fitted with ``--ood tta_dice`` on a copy of the stock model; predicted cases against the brute force, and
    the fit's validation scores (one scorer for every case in a row) against cases predicted one at a time."""
    from nnunet_ood.fitting.options import FitOptions
    from nnunet_ood.fitting.pipeline import _fit_context, fit_fold
    from nnunet_ood.inference.predictor import nnUNetOODPredictor

    model = tmp_path / "model"
    shutil.copytree(tiny_project.model("nnUNetTrainer_1epoch"), model,
                    ignore=shutil.ignore_patterns("ood", "fold_[1-9]"))
    options = FitOptions(methods=("tta_dice",), progress=False)
    state = fit_fold(str(model), 0, options)
    val_scores = state.provenance["val_case_scores"]["tta_dice"]
    assert len(val_scores) >= 2 and all(0 <= s <= 1 for s in val_scores.values())
    assert len(set(val_scores.values())) > 1

    context = _fit_context(str(model), 0, options)
    for key in list(val_scores)[-2:]:  # each case alone, in a fresh predictor
        predictor = nnUNetOODPredictor(device=torch.device("cpu"), allow_tqdm=False, ood_methods=["tta_dice"])
        predictor.initialize_from_trained_model_folder(str(model), [0])
        data = context.load_case(key)
        predictor.predict_logits_from_preprocessed_data(data)
        result = predictor.ood_results[-1]
        score = result.scores["tta_dice"]["score"]
        assert 0 <= score <= 1
        assert score == pytest.approx(val_scores[key], rel=1e-6, abs=1e-12)
        expected_map, expected_score = _brute_force_case(predictor, data)
        assert score == pytest.approx(expected_score, rel=1e-6, abs=1e-12)
        np.testing.assert_allclose(result.maps["tta_dice"], expected_map, rtol=1e-5, atol=1e-7)
