"""The corruption family's catalogue: names, groups, one-line summaries and the parameters per severity (no torch).

:data:`CORRUPTIONS` is the family that makes the failure table's corrupted versions, :data:`HELD_OUT_SHIFTS` the
shifts kept out of it for testing; :mod:`nnunet_ood.quality.corruption_transforms` implements each of them with
these parameters and :func:`nnunet_ood.quality.corruptions.corrupt` applies one. The summaries are built from the
parameters, so the summaries, the docs and the code cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SEVERITIES: tuple[int, ...] = (1, 2, 3)

GROUPS: tuple[str, ...] = ("intensity", "noise", "resolution", "artefact", "spatial")


@dataclass(frozen=True)
class Corruption:
    """One corruption: its name, group, a one-line summary with its parameters per severity, and whether it moves
    content (then the label is transformed alike, with nearest-neighbour interpolation)."""

    name: str
    group: str
    summary: str
    spatial: bool


# Parameters per severity (index severity - 1). Kept as module constants so the summaries, the docs and the
# code cannot disagree.
CONTRAST_FACTOR = (0.7, 0.5, 0.3)
LOG_GAMMA = (0.4, 0.7, 1.0)
BIAS_RATIO = (1.5, 2.5, 4.0)
BIAS_ORDER = 3
INVERSION_WEIGHT = (1 / 3, 2 / 3, 1.0)
REMAP_KNOTS = 9
REMAP_DISPLACEMENT = (0.1, 0.2, 0.35)
NOISE_STD = (0.1, 0.25, 0.5)
BLUR_STD = (0.8, 1.5, 2.5)
DOWNSAMPLING = (2.0, 3.0, 4.0)
MOTION_BAND = (0.5, 0.25, 0.1)
MOTION_DEGREES = (2.0, 4.0, 6.0)
MOTION_SHIFT = (0.01, 0.02, 0.03)
GHOST_INTENSITY = (0.35, 0.65, 0.95)
GHOSTS = (2, 6)
SPIKE_AMPLITUDE = (0.25, 0.5, 1.0)
AFFINE_DEGREES = (10.0, 20.0, 35.0)
AFFINE_ZOOM = (1.1, 1.25, 1.45)
AFFINE_SHIFT = (0.03, 0.06, 0.1)
POSTERIZE_LEVELS = (8, 4, 2)
SIGMOID_SLOPE = (8.0, 16.0, 32.0)
SIGMOID_CENTRE = (0.35, 0.65)


def per_severity(values: Sequence[float], fmt: str = "{:g}") -> str:
    """The values of the severities 1/2/3, for a summary."""
    return "/".join(fmt.format(v) for v in values)


CORRUPTIONS: tuple[Corruption, ...] = (
    Corruption("contrast", "intensity",
               f"contrast reduced about the channel mean, x -> m + f (x - m), f = {per_severity(CONTRAST_FACTOR)}",
               False),
    Corruption("gamma", "intensity",
               f"gamma curve on the [0, 1]-rescaled channel, |log gamma| = {per_severity(LOG_GAMMA)}, "
               "sign from the seed", False),
    Corruption("bias_field", "intensity",
               f"multiplicative smooth bias field exp(seeded polynomial of order {BIAS_ORDER}) on the [0, 1]-rescaled "
               f"channel, field max/min {per_severity(BIAS_RATIO)}, geometric mean 1", False),
    Corruption("inversion", "intensity",
               "blend of x and its inversion within the channel's range, weight "
               f"{per_severity(INVERSION_WEIGHT, '{:.2g}')}", False),
    Corruption("remap", "intensity",
               f"seeded piecewise-linear intensity curve ({REMAP_KNOTS} knots, not necessarily monotone) on the "
               f"[0, 1]-rescaled channel, knot displacement up to {per_severity(REMAP_DISPLACEMENT)}", False),
    Corruption("noise", "noise",
               f"additive Gaussian noise, std {per_severity(NOISE_STD)} x the channel's std", False),
    Corruption("blur", "resolution",
               f"in-plane Gaussian blur, std {per_severity(BLUR_STD)} voxels", False),
    Corruption("resolution", "resolution",
               f"down-sampling by {per_severity(DOWNSAMPLING)} (averaging, i.e. partial volume) along a seeded "
               "in-plane axis, linear up-sampling back", False),
    Corruption("motion", "artefact",
               "MRI motion: k-space outside a central band of width "
               f"{per_severity(MOTION_BAND)} (along spatial axis 2) acquired in two moved positions, rotation up to "
               f"{per_severity(MOTION_DEGREES)} degrees, shift up to "
               f"{per_severity([100 * v for v in MOTION_SHIFT])} % of each axis (2D: in-plane only)", False),
    Corruption("ghosting", "artefact",
               f"MRI ghosting: {GHOSTS[0]}-{GHOSTS[1]} ghosts along a seeded in-plane axis, k-space planes "
               f"attenuated by {per_severity(GHOST_INTENSITY)}", False),
    Corruption("spike", "artefact",
               "MRI spike (herringbone): one k-space spike away from the centre, stripes of amplitude "
               f"{per_severity(SPIKE_AMPLITUDE)} x the channel's std", False),
    Corruption("affine", "spatial",
               f"in-plane rotation {per_severity(AFFINE_DEGREES)} degrees, zoom x{per_severity(AFFINE_ZOOM)} "
               f"(in or out), shift {per_severity([100 * v for v in AFFINE_SHIFT])} % of the in-plane size; "
               "image linear, label nearest, shape kept", True),
)

HELD_OUT_SHIFTS: tuple[Corruption, ...] = (
    Corruption("posterize", "intensity",
               f"intensities quantised to {per_severity(POSTERIZE_LEVELS)} levels within the channel's range",
               False),
    Corruption("sigmoid_contrast", "intensity",
               f"steep sigmoid curve on the [0, 1]-rescaled channel, slope {per_severity(SIGMOID_SLOPE)}, centre "
               f"seeded in [{SIGMOID_CENTRE[0]}, {SIGMOID_CENTRE[1]}]", False),
)

BY_NAME: dict[str, Corruption] = {c.name: c for c in CORRUPTIONS + HELD_OUT_SHIFTS}


def corruption_names(held_out: bool = False) -> list[str]:
    """Names of the calibration family (``held_out=False``) or of the held-out shifts (``held_out=True``)."""
    return [c.name for c in (HELD_OUT_SHIFTS if held_out else CORRUPTIONS)]


def known_names() -> str:
    """Every corruption's name, for error messages."""
    return ", ".join(BY_NAME)
