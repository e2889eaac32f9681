"""Segmentation properties, Dice and the failure table, against numpy / scikit-image computed by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from skimage.measure import label as skimage_label

from nnunet_ood.quality.properties import (
    COMPONENTS,
    property_names,
    reference_volumes,
    segmentation_dice,
    segmentation_properties,
)
from nnunet_ood.quality.table import CLEAN, FailureTable, dice_by_severity_png, read_failure_table


def labels_manager(n_classes: int = 3, ignore: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(has_regions=False, foreground_labels=list(range(1, n_classes)), foreground_regions=None,
                           ignore_label=ignore, has_ignore_label=ignore is not None)


def regions_manager() -> SimpleNamespace:
    return SimpleNamespace(has_regions=True, foreground_labels=[1, 2], foreground_regions=[(1, 2), (2,)],
                           ignore_label=None, has_ignore_label=False)


def numpy_dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2 * (a & b).sum() / total


def one_hot_logits(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([(labels == c) * 5.0 - 2.5 for c in range(n_classes)])).float()


def test_dice_per_class_against_numpy():
    rng = np.random.default_rng(0)
    predicted = rng.integers(0, 3, (1, 12, 14))
    reference = rng.integers(-1, 3, (1, 1, 12, 14))  # -1: outside nnU-Net's nonzero mask = background
    ref = np.maximum(reference[0], 0)
    expected = np.mean([numpy_dice(predicted == c, ref == c) for c in (1, 2)])
    assert segmentation_dice(one_hot_logits(predicted, 3), reference, labels_manager()) == pytest.approx(expected)


def test_dice_leaves_out_the_ignore_label_and_counts_empty_classes_as_one():
    rng = np.random.default_rng(1)
    predicted = rng.integers(0, 2, (6, 7, 8))  # class 2 never predicted
    reference = rng.integers(0, 2, (1, 6, 7, 8))
    reference[0, :2] = 3  # ignore label
    valid = reference[0] != 3
    expected = np.mean([numpy_dice((predicted == 1) & valid, (reference[0] == 1) & valid), 1.0])
    got = segmentation_dice(one_hot_logits(predicted, 3), reference, labels_manager(3, ignore=3))
    assert got == pytest.approx(expected)


def test_region_based_dice_and_volumes():
    rng = np.random.default_rng(2)
    logits = torch.from_numpy(rng.normal(size=(2, 10, 11))).float()
    reference = rng.integers(0, 3, (1, 10, 11))
    region_a, region_b = logits[0].numpy() > 0, logits[1].numpy() > 0
    expected = np.mean([numpy_dice(region_a, np.isin(reference[0], [1, 2])), numpy_dice(region_b, reference[0] == 2)])
    assert segmentation_dice(logits, reference, regions_manager()) == pytest.approx(expected)
    reference_volume = {"region1": 30.0, "region2": 7.0}
    props = segmentation_properties(logits, regions_manager(), reference_volume)
    assert props["volume_region1"] == pytest.approx(math.log((region_a.sum() + 1) / 31))
    assert props["volume_region2"] == pytest.approx(math.log((region_b.sum() + 1) / 8))


def test_volumes_and_components_against_numpy_and_skimage():
    rng = np.random.default_rng(3)
    predicted = (rng.random((1, 20, 20)) > 0.8).astype(int) * rng.integers(1, 3, (1, 20, 20))
    props = segmentation_properties(one_hot_logits(predicted, 3), labels_manager(), {"1": 10.0, "2": 0.0})
    assert props["volume_1"] == pytest.approx(math.log(((predicted == 1).sum() + 1) / 11))
    assert props["volume_2"] == pytest.approx(math.log((predicted == 2).sum() + 1))
    n = skimage_label(predicted[0] > 0, connectivity=1).max()
    assert n > 3 and props[COMPONENTS] == pytest.approx(math.log1p(n))
    assert property_names(labels_manager()) == ["volume_1", "volume_2", COMPONENTS]


@pytest.mark.parametrize("regions", [False, True])
def test_properties_of_large_volumes_are_made_in_slabs(monkeypatch, regions: bool) -> None:
    """Above a slab's size the masks are made slab by slab (the argmax of a clinical volume is 630 MB of int64):
    volumes and components equal numpy's and scikit-image's on the whole volume, components crossing slabs
    counted once."""
    from nnunet_ood import slabs

    monkeypatch.setattr(slabs, "SLAB_VOXELS", 3 * 9 * 8)  # slabs of 3 of the 10 planes, a ragged last one
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.normal(size=(3, 10, 9, 8))).float()
    manager = regions_manager() if regions else labels_manager()
    props = segmentation_properties(logits[:2] if regions else logits, manager,
                                    {"region1": 4.0, "region2": 2.0} if regions else {"1": 4.0, "2": 2.0})
    x = logits.numpy()
    if regions:
        masks = {"volume_region1": (x[0] > 0, 4.0), "volume_region2": (x[1] > 0, 2.0)}
    else:
        labels = x.argmax(0)
        masks = {"volume_1": (labels == 1, 4.0), "volume_2": (labels == 2, 2.0)}
    for name, (mask, reference) in masks.items():
        assert props[name] == pytest.approx(math.log((mask.sum() + 1) / (reference + 1)))
    foreground = np.logical_or.reduce([mask for mask, _ in masks.values()])
    assert props[COMPONENTS] == pytest.approx(math.log1p(skimage_label(foreground, connectivity=1).max()))


def test_reference_volumes_are_medians():
    rng = np.random.default_rng(4)
    segs = [rng.integers(0, 3, (1, 9, 9)) for _ in range(5)]
    expected = {str(c): float(np.median([(s == c).sum() for s in segs])) for c in (1, 2)}
    assert reference_volumes(segs, labels_manager()) == pytest.approx(expected)


def test_failure_table_round_trips_through_csv():
    table = FailureTable(["mahalanobis", "volume_1"])
    table.add("a", 0, CLEAN, 0, 0.9, {"mahalanobis": 1.5, "volume_1": -0.1})
    table.add("a", 1, "noise", 2, 0.4, {"mahalanobis": math.nan, "volume_1": 0.3})
    table.add("b", 0, CLEAN, 0, 0.8, {"mahalanobis": 2.0, "volume_1": 0.0})
    text = table.to_csv({"oof_risk": [0.1, 0.5, 0.2]})
    assert text.splitlines()[0] == "case,version,corruption,severity,dice,oof_risk,mahalanobis,volume_1"
    back = read_failure_table(text, extra=("oof_risk",))
    assert back.features == table.features and back.groups == ["a", "a", "b"]
    np.testing.assert_array_equal(back.matrix(), table.matrix())
    np.testing.assert_array_equal(back.dice, [0.9, 0.4, 0.8])
    assert dice_by_severity_png(back)[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError):
        table.add("c", 0, CLEAN, 0, 1.0, {"mahalanobis": 1.0})


def test_quality_options_check_the_corruption_budget():
    from nnunet_ood.errors import OODInputError
    from nnunet_ood.methods.quality import FAMILY_SIZE, QualityConfig
    from nnunet_ood.quality.corruptions import CORRUPTIONS

    assert FAMILY_SIZE == len(CORRUPTIONS)
    QualityConfig(corruptions_per_case=6, corruptions_per_version=2)
    for bad in ({"corruptions_per_case": 7, "corruptions_per_version": 2}, {"corruptions_per_version": 0},
                {"corruptions_per_case": -1}, {"fail_below": 0.0}, {"max_silent_failures": 1.0}, {"confidence": 1.0},
                {"confidence": 0.0}, {"risk_control": "foo"}, {"unusual_level": 1.0}, {"unusual_level": -0.1}):
        with pytest.raises(OODInputError):
            QualityConfig(**bad)
    QualityConfig(unusual_level=0.0, risk_control="crc", confidence=0.5)  # 0 = no gate
