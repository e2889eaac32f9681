"""The one score normalisation (:mod:`nnunet_ood.normalization`): a float and an array give the same bits, and every
reader of a calibration's bounds accepts exactly the bounds :func:`usable_bounds` accepts."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from nnunet_ood.calibration import MethodCalibration
from nnunet_ood.evaluation.outputs import normalized_threshold
from nnunet_ood.io.map_dtypes import normalization_bounds
from nnunet_ood.normalization import bounds_from_scores, normalize, usable_bounds
from nnunet_ood.reports.ranking import calibration_bounds

SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1e-300, -1e300, 1.0, -1.0, 2.0, 3.4e38]
BOUNDS = [(0.0, 1.0), (-0.0, 0.0), (1.0, 1.0), (-3.0, 7.0), (2.0, 6.0), (-1e40, 1e40), (1e-300, 1e300)]
UNUSABLE = [(2.0, 1.0), (0.0, math.nan), (math.nan, 1.0), (-math.inf, 1.0), (0.0, math.inf)]


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _reference(score: float, low: float, high: float) -> float:
    """The formula written out in Python floats."""
    if math.isnan(score):
        return math.nan
    if high == low:
        return 1.0 if score > low else 0.0
    return (min(max(score, low), high) - low) / (high - low)


@pytest.mark.parametrize(("low", "high"), BOUNDS)
def test_a_float_and_an_array_give_the_same_bits(low: float, high: float) -> None:
    rng = np.random.default_rng(0)
    values = np.array([*SPECIAL, low, high, *rng.uniform(-20, 20, 50)])
    array = normalize(values, low, high)
    assert array.dtype == np.float64 and array.shape == values.shape
    for value, normalized in zip(values, array):
        scalar = normalize(float(value), low, high)
        assert type(scalar) is float
        assert _bits(scalar) == _bits(float(normalized)) or (math.isnan(scalar) and math.isnan(normalized))
        reference = _reference(float(value), low, high)
        assert _bits(scalar) == _bits(reference) or (math.isnan(scalar) and math.isnan(reference))


def test_equal_bounds_give_a_step_and_nan_stays_nan() -> None:
    assert [normalize(s, 1.0, 1.0) for s in (0.0, 1.0, 2.0)] == [0.0, 0.0, 1.0]
    np.testing.assert_array_equal(normalize(np.array([0.0, 1.0, 2.0, np.nan]), 1.0, 1.0), [0.0, 0.0, 1.0, np.nan])
    assert math.isnan(normalize(math.nan, 0.0, 1.0))


@pytest.mark.parametrize(("low", "high"), UNUSABLE)
def test_unusable_bounds_are_refused_everywhere(low: float, high: float) -> None:
    assert not usable_bounds(low, high)
    with pytest.raises(ValueError, match="finite bounds"):
        normalize(1.0, low, high)
    with pytest.raises(ValueError, match="finite bounds"):
        normalize(np.ones(3), low, high)
    calibration = MethodCalibration(low, high, 0.5)
    assert calibration.bounds_problem() is not None
    assert normalization_bounds({"m": calibration}) == {"m": None}
    assert calibration_bounds({"calibration": {"m": {"low": low, "high": high}}}) == {}
    assert normalized_threshold({"low": low, "high": high, "threshold": 0.5}) is None


@pytest.mark.parametrize(("low", "high"), BOUNDS)
def test_usable_bounds_are_accepted_everywhere(low: float, high: float) -> None:
    assert usable_bounds(low, high)
    calibration = MethodCalibration(low, high, 0.5)
    assert calibration.bounds_problem() is None
    assert normalization_bounds({"m": calibration}) == {"m": (low, high)}
    assert calibration_bounds({"calibration": {"m": {"low": low, "high": high}}}) == {"m": (low, high)}
    assert normalized_threshold({"low": low, "high": high, "threshold": 0.5}) == normalize(0.5, low, high)


def test_bounds_from_scores() -> None:
    assert bounds_from_scores([1.0, 3.0, 2.0]) == (1.0, 6.0)
    assert bounds_from_scores([-3.0, -1.0, 2.0]) == (-3.0, 7.0)


def test_equal_bounds_choose_an_overlay_by_the_normalised_score() -> None:
    """Equal bounds have no scale beyond them: the tie-break falls back to the normalised score (no division by 0)."""
    from nnunet_ood.reports.ranking import MethodScore, overlay_method

    scores = {"a": MethodScore(2.0, 1.0, True), "b": MethodScore(5.0, 1.0, True)}
    assert overlay_method(scores, ["a", "b"], None, {"a": (1.0, 1.0), "b": (0.0, 4.0)}) == "b"
    assert overlay_method(scores, ["a", "b"], None, {"a": (1.0, 1.0), "b": (1.0, 1.0)}) == "a"
