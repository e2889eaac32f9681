"""Seeded, graded acquisition corruptions of nnU-Net's preprocessed cases: failure examples without new labels.

A case's preprocessed image ``(C, *spatial)`` (2D configurations: ``(C, 1, H, W)``) and label ``(1, *spatial)``
are corrupted by one member of :data:`CORRUPTIONS` at a severity of :data:`SEVERITIES`, then predicted by the
fold's model. :func:`corruption_plan` says which corruption, severity and seed each corrupted version of a case
gets, balanced over the combinations.

Conventions:

* Spatial axis 0 is the out-of-plane axis (nnU-Net puts the lowest-resolution axis first, and 2D data has a
  singleton there). Resolution changes, blur, translations and rotations act in-plane (axes 1 and 2); a 2D
  image is never touched along its singleton axis.
* All random draws come from a NumPy generator seeded by ``(name, seed)`` only, never by the severity: the
  severities of one seed share the direction of the change (rotation sign, bias-field coefficients, noise
  pattern, ...) and only its strength grows, so severity alone sets the strength.
* TorchIO's deterministic transforms (``Gamma``, ``BiasField``, ``Noise``, ``Blur``, ``Motion``,
  ``Ghosting``, ``Spike``, ``Affine``) are called with these parameters; ``RandomAnisotropy`` with a fixed
  axis and a ``(v, v)`` range. TorchIO draws from the global torch RNG on every call, so everything runs in
  ``torch.random.fork_rng`` with a seeded generator: outputs are bitwise reproducible and the caller's RNG
  state is left as it was.
* Intensity curves (gamma, bias field, remap, spike, posterize, sigmoid) act on each channel rescaled to
  ``[0, 1]`` by its min/max and are mapped back to the channel's range, so z-scored data works; noise and blur
  act in the data's own units (noise in units of the channel's standard deviation).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nnunet_ood.errors import OODInputError

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
_CONTRAST_FACTOR = (0.7, 0.5, 0.3)
_LOG_GAMMA = (0.4, 0.7, 1.0)
_BIAS_RATIO = (1.5, 2.5, 4.0)
_BIAS_ORDER = 3
_INVERSION_WEIGHT = (1 / 3, 2 / 3, 1.0)
_REMAP_KNOTS = 9
_REMAP_DISPLACEMENT = (0.1, 0.2, 0.35)
_NOISE_STD = (0.1, 0.25, 0.5)
_BLUR_STD = (0.8, 1.5, 2.5)
_DOWNSAMPLING = (2.0, 3.0, 4.0)
_MOTION_BAND = (0.5, 0.25, 0.1)
_MOTION_DEGREES = (2.0, 4.0, 6.0)
_MOTION_SHIFT = (0.01, 0.02, 0.03)
_GHOST_INTENSITY = (0.35, 0.65, 0.95)
_GHOSTS = (2, 6)
_SPIKE_AMPLITUDE = (0.25, 0.5, 1.0)
_AFFINE_DEGREES = (10.0, 20.0, 35.0)
_AFFINE_ZOOM = (1.1, 1.25, 1.45)
_AFFINE_SHIFT = (0.03, 0.06, 0.1)
_POSTERIZE_LEVELS = (8, 4, 2)
_SIGMOID_SLOPE = (8.0, 16.0, 32.0)
_SIGMOID_CENTRE = (0.35, 0.65)


def _per_severity(values: Sequence[float], fmt: str = "{:g}") -> str:
    return "/".join(fmt.format(v) for v in values)


CORRUPTIONS: tuple[Corruption, ...] = (
    Corruption("contrast", "intensity",
               f"contrast reduced about the channel mean, x -> m + f (x - m), f = {_per_severity(_CONTRAST_FACTOR)}",
               False),
    Corruption("gamma", "intensity",
               f"gamma curve on the [0, 1]-rescaled channel, |log gamma| = {_per_severity(_LOG_GAMMA)}, "
               "sign from the seed", False),
    Corruption("bias_field", "intensity",
               f"multiplicative smooth bias field exp(seeded polynomial of order {_BIAS_ORDER}) on the [0, 1]-rescaled "
               f"channel, field max/min {_per_severity(_BIAS_RATIO)}, geometric mean 1", False),
    Corruption("inversion", "intensity",
               "blend of x and its inversion within the channel's range, weight "
               f"{_per_severity(_INVERSION_WEIGHT, '{:.2g}')}", False),
    Corruption("remap", "intensity",
               f"seeded piecewise-linear intensity curve ({_REMAP_KNOTS} knots, not necessarily monotone) on the "
               f"[0, 1]-rescaled channel, knot displacement up to {_per_severity(_REMAP_DISPLACEMENT)}", False),
    Corruption("noise", "noise",
               f"additive Gaussian noise, std {_per_severity(_NOISE_STD)} x the channel's std", False),
    Corruption("blur", "resolution",
               f"in-plane Gaussian blur, std {_per_severity(_BLUR_STD)} voxels", False),
    Corruption("resolution", "resolution",
               f"down-sampling by {_per_severity(_DOWNSAMPLING)} (averaging, i.e. partial volume) along a seeded "
               "in-plane axis, linear up-sampling back", False),
    Corruption("motion", "artefact",
               "MRI motion: k-space outside a central band of width "
               f"{_per_severity(_MOTION_BAND)} (along spatial axis 2) acquired in two moved positions, rotation up to "
               f"{_per_severity(_MOTION_DEGREES)} degrees, shift up to "
               f"{_per_severity([100 * v for v in _MOTION_SHIFT])} % of each axis (2D: in-plane only)", False),
    Corruption("ghosting", "artefact",
               f"MRI ghosting: {_GHOSTS[0]}-{_GHOSTS[1]} ghosts along a seeded in-plane axis, k-space planes "
               f"attenuated by {_per_severity(_GHOST_INTENSITY)}", False),
    Corruption("spike", "artefact",
               "MRI spike (herringbone): one k-space spike away from the centre, stripes of amplitude "
               f"{_per_severity(_SPIKE_AMPLITUDE)} x the channel's std", False),
    Corruption("affine", "spatial",
               f"in-plane rotation {_per_severity(_AFFINE_DEGREES)} degrees, zoom x{_per_severity(_AFFINE_ZOOM)} "
               f"(in or out), shift {_per_severity([100 * v for v in _AFFINE_SHIFT])} % of the in-plane size; "
               "image linear, label nearest, shape kept", True),
)

HELD_OUT_SHIFTS: tuple[Corruption, ...] = (
    Corruption("posterize", "intensity",
               f"intensities quantised to {_per_severity(_POSTERIZE_LEVELS)} levels within the channel's range",
               False),
    Corruption("sigmoid_contrast", "intensity",
               f"steep sigmoid curve on the [0, 1]-rescaled channel, slope {_per_severity(_SIGMOID_SLOPE)}, centre "
               f"seeded in [{_SIGMOID_CENTRE[0]}, {_SIGMOID_CENTRE[1]}]", False),
)

_BY_NAME: dict[str, Corruption] = {c.name: c for c in CORRUPTIONS + HELD_OUT_SHIFTS}


def corruption_names(held_out: bool = False) -> list[str]:
    """Names of the calibration family (``held_out=False``) or of the held-out shifts (``held_out=True``)."""
    return [c.name for c in (HELD_OUT_SHIFTS if held_out else CORRUPTIONS)]


# --------------------------------------------------------------------------------------------------------------
# Geometry and helpers


@dataclass(frozen=True)
class _Geometry:
    """Where the planes are. nnU-Net layout: spatial axis 0 is out-of-plane (singleton for 2D data)."""

    is_2d: bool
    spatial: tuple[int, ...]  # nnU-Net spatial shape

    @property
    def tio_in_plane(self) -> tuple[int, int]:
        """In-plane axes in TorchIO's layout (2D data is permuted to (C, H, W, 1))."""
        return (0, 1) if self.is_2d else (1, 2)

    @property
    def tio_normal(self) -> int:
        return 2 if self.is_2d else 0

    @property
    def tio_spatial(self) -> tuple[int, int, int]:
        return (self.spatial[1], self.spatial[2], 1) if self.is_2d else tuple(self.spatial)  # type: ignore[return-value]

    def to_tio(self, x: torch.Tensor) -> torch.Tensor:
        """nnU-Net layout -> TorchIO layout: TorchIO calls an image 2D when its *last* axis is a singleton."""
        return x.permute(0, 2, 3, 1).contiguous() if self.is_2d else x

    def from_tio(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).contiguous() if self.is_2d else x


def _torchio() -> Any:
    # Imported on use: torchio is slow to import and most of the package never needs it.
    import torchio

    return torchio


def _subject(image: torch.Tensor, label: torch.Tensor | None = None) -> Any:
    tio = _torchio()
    eye = np.eye(4)  # unit spacing: TorchIO's millimetres are voxels here
    images = {"image": tio.ScalarImage(tensor=image, affine=eye)}
    if label is not None:
        images["label"] = tio.LabelMap(tensor=label, affine=eye)
    return tio.Subject(**images)


def _apply(transform: Any, image: torch.Tensor) -> torch.Tensor:
    """Run a TorchIO transform on a (C, *spatial) float32 tensor in TorchIO's layout."""
    return transform(_subject(image))["image"].data.to(torch.float32)


def _channel_stat(x: torch.Tensor, op: str) -> torch.Tensor:
    """Per-channel statistic in float64, shaped to broadcast against x."""
    flat = x.reshape(x.shape[0], -1).double()
    reduce: dict[str, Callable[[], torch.Tensor]] = {
        "min": lambda: flat.amin(1), "max": lambda: flat.amax(1), "mean": lambda: flat.mean(1),
        "std": lambda: flat.std(1, unbiased=False),
    }
    value = reduce[op]()
    return value.reshape(-1, *([1] * (x.dim() - 1)))


def _to_unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each channel rescaled to [0, 1] by its min/max (float64), with the min and span to map back."""
    lo, hi = _channel_stat(x, "min"), _channel_stat(x, "max")
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # a constant channel maps to 0 and back unchanged
    return ((x.double() - lo) / span).clamp(0, 1), lo, span


def _from_unit(u: torch.Tensor, lo: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    return (u.double() * span + lo).float()


def _unit_curve(x: torch.Tensor, curve: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    u, lo, span = _to_unit(x)
    return _from_unit(curve(u), lo, span)


def _seed_int(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


# --------------------------------------------------------------------------------------------------------------
# The corruptions. Each takes the nnU-Net-layout float32 image, the label as float32 (or None), the severity
# index (0..2), the seeded generator and the geometry, and returns (image, label).

_Result = tuple[torch.Tensor, "torch.Tensor | None"]


def _contrast(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
              geo: _Geometry) -> _Result:
    mean = _channel_stat(x, "mean")
    return (mean + _CONTRAST_FACTOR[level] * (x.double() - mean)).float(), label


def _gamma(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
           geo: _Geometry) -> _Result:
    tio = _torchio()
    sign = 1.0 if rng.random() < 0.5 else -1.0
    transform = tio.Gamma(gamma=float(np.exp(sign * _LOG_GAMMA[level])))
    return _unit_curve(x, lambda u: _apply(transform, u.float()).double()), label


def _bias_field(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
                geo: _Geometry) -> _Result:
    tio = _torchio()
    n_coefficients = (_BIAS_ORDER + 1) * (_BIAS_ORDER + 2) * (_BIAS_ORDER + 3) // 6
    direction = rng.uniform(-1.0, 1.0, n_coefficients)
    # Raw coefficients give fields whose strength depends on the dimension (3D has more active terms: up to 30x
    # max/min at coefficients 0.5). Scale the seeded polynomial so the field's max/min is the severity's ratio, and
    # centre its logarithm (the constant term is coefficient 0) so the mean brightness is kept.
    probe = np.zeros((1, *geo.tio_spatial), dtype=np.float32)
    log_field = np.log(tio.BiasField.generate_bias_field(probe, _BIAS_ORDER, direction.tolist()).astype(np.float64))
    spread = float(log_field.max() - log_field.min())
    scale = np.log(_BIAS_RATIO[level]) / spread if spread > 0 else 0.0
    coefficients = direction * scale
    coefficients[0] -= float(log_field.mean()) * scale
    transform = tio.BiasField(coefficients=coefficients.tolist(), order=_BIAS_ORDER)
    u, lo, span = _to_unit(x)
    # In TorchIO's layout, so a 2D image's field is a polynomial of its two in-plane coordinates only.
    biased = geo.from_tio(_apply(transform, geo.to_tio(u.float())))
    return _from_unit(biased, lo, span), label


def _inversion(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
               geo: _Geometry) -> _Result:
    lo, hi = _channel_stat(x, "min"), _channel_stat(x, "max")
    w = _INVERSION_WEIGHT[level]
    xd = x.double()
    return ((1 - w) * xd + w * (lo + hi - xd)).float(), label


def _remap(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
           geo: _Geometry) -> _Result:
    knots = np.linspace(0.0, 1.0, _REMAP_KNOTS)
    shifts = rng.uniform(-1.0, 1.0, (x.shape[0], _REMAP_KNOTS)) * _REMAP_DISPLACEMENT[level]
    u, lo, span = _to_unit(x)
    flat = u.reshape(u.shape[0], -1).numpy()
    curved = np.stack([np.interp(flat[c], knots, knots + shifts[c]) for c in range(u.shape[0])])
    return _from_unit(torch.from_numpy(curved).reshape(u.shape), lo, span), label


def _noise(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
           geo: _Geometry) -> _Result:
    tio = _torchio()
    std = _channel_stat(x, "std")
    std = torch.where(std > 0, std, torch.ones_like(std))
    # Unit-std noise from TorchIO on zeros, scaled per channel: the clean part stays bit-exact.
    transform = tio.Noise(mean=0.0, std=_NOISE_STD[level], seed=_seed_int(rng))
    noise = _apply(transform, torch.zeros_like(x)).double()
    return (x.double() + noise * std).float(), label


def _blur(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
          geo: _Geometry) -> _Result:
    tio = _torchio()
    std = [0.0, 0.0, 0.0]
    for axis in geo.tio_in_plane:
        std[axis] = _BLUR_STD[level]
    blurred = _apply(tio.Blur(std=tuple(std)), geo.to_tio(x))
    return geo.from_tio(blurred), label


def _resolution(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
                geo: _Geometry) -> _Result:
    # Written by hand: TorchIO's RandomAnisotropy samples the coarse grid by nearest neighbour from a grid shifted by
    # (factor - 1) / 2 voxels, so even factors also shift the image by half a voxel and factor 2 can differ more from
    # the clean image than factor 3. Averaging into coarse voxels (a thick slice / large pixel) and linear
    # interpolation back with aligned voxel centres changes the resolution only.
    import torch.nn.functional as F

    dim = 2 + int(rng.integers(0, 2))  # an in-plane axis of (C, X, Y, Z): tensor dim 2 or 3
    n = x.shape[dim]
    coarse = max(1, round(n / _DOWNSAMPLING[level]))
    moved = x.movedim(dim, -1)
    lines = moved.reshape(-1, 1, n).double()
    low = F.interpolate(lines, size=coarse, mode="area")
    back = F.interpolate(low, size=n, mode="linear", align_corners=False)
    return back.reshape(moved.shape).movedim(-1, dim).float().contiguous(), label


def _motion(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
            geo: _Geometry) -> _Result:
    tio = _torchio()
    # TorchIO's Motion fills k-space (split along the last axis) from the clean image in the segment holding the
    # centre and from the moved images elsewhere. Two movements whose times bracket a central band: the band narrows
    # with severity (motion closer to the k-space centre) while the movements grow, so the severity grades the
    # artefact instead of saturating. The centre jitter (< half the narrowest band) keeps the centre in the band.
    centre = 0.5 + rng.uniform(-0.8, 0.8) * _MOTION_BAND[-1] / 2
    times = np.array([centre - _MOTION_BAND[level] / 2, centre + _MOTION_BAND[level] / 2], dtype=np.float32)
    degrees = rng.uniform(-1.0, 1.0, (2, 3)) * _MOTION_DEGREES[level]
    shifts = rng.uniform(-1.0, 1.0, (2, 3)) * _MOTION_SHIFT[level] * np.asarray(geo.spatial, dtype=float)
    if geo.is_2d:
        degrees[:, 1:] = 0.0  # rotate about the out-of-plane axis 0 only
        shifts[:, 0] = 0.0
    # In TorchIO's 2D layout the last axis is the singleton, and the k-space split along it gives one rigidly moved
    # image instead of an artefact, so motion stays in nnU-Net's layout (last axis in-plane) for 2D and 3D alike.
    transform = tio.Motion(degrees=degrees, translation=shifts, times=times, image_interpolation="linear")
    return _apply(transform, x), label


def _ghosting(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
              geo: _Geometry) -> _Result:
    tio = _torchio()
    ghosts = int(rng.integers(_GHOSTS[0], _GHOSTS[1] + 1))
    axis = geo.tio_in_plane[int(rng.integers(0, 2))]
    transform = tio.Ghosting(num_ghosts=ghosts, axis=axis, intensity=_GHOST_INTENSITY[level], restore=None)
    return geo.from_tio(_apply(transform, geo.to_tio(x))), label


def _spike(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
           geo: _Geometry) -> _Result:
    tio = _torchio()
    # Away from the k-space centre (0.5 after TorchIO's fftshift), else the spike is only a brightness offset.
    position = rng.uniform(0.0, 1.0, 3)
    for axis in geo.tio_in_plane:
        position[axis] = 0.5 + (1 if rng.random() < 0.5 else -1) * rng.uniform(0.1, 0.4)
    data = geo.to_tio(x)
    std = _channel_stat(x, "std").flatten()
    out = []
    for c in range(data.shape[0]):
        # TorchIO's spike is `intensity` x the spectrum's maximum, i.e. stripes of amplitude intensity * max / N,
        # which depends on the normalisation and content. Solve for the intensity giving `amplitude` x the channel's
        # std instead (std 1 for a constant channel, as for the noise).
        peak = float(torch.fft.fftn(data[c]).abs().max())
        amplitude = _SPIKE_AMPLITUDE[level] * (float(std[c]) if std[c] > 0 else 1.0)
        if peak > 0:
            intensity = amplitude * data[c].numel() / peak
            spiked = _apply(tio.Spike(spikes_positions=position[None, :], intensity=intensity), data[c : c + 1])
        else:  # an all-zero channel: add the stripes directly
            spiked = data[c : c + 1] + amplitude * _apply(
                tio.Spike(spikes_positions=position[None, :], intensity=1.0), torch.ones_like(data[c : c + 1])
            ) - amplitude
        out.append(spiked)
    return geo.from_tio(torch.cat(out)), label


def _affine(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
            geo: _Geometry) -> _Result:
    tio = _torchio()
    rotation = (1 if rng.random() < 0.5 else -1) * _AFFINE_DEGREES[level]
    zoom = _AFFINE_ZOOM[level] ** (1 if rng.random() < 0.5 else -1)
    direction = rng.uniform(-1.0, 1.0, 2)
    direction /= max(np.linalg.norm(direction), 1e-6)
    degrees = [0.0, 0.0, 0.0]
    degrees[geo.tio_normal] = rotation
    scales = [zoom, zoom, zoom]
    scales[geo.tio_normal] = 1.0  # in-plane only: a 3D volume's slices move exactly like 2D images
    translation = [0.0, 0.0, 0.0]
    for d, axis in zip(direction, geo.tio_in_plane):
        translation[axis] = float(d * _AFFINE_SHIFT[level] * geo.tio_spatial[axis])
    transform = tio.Affine(scales=tuple(scales), degrees=tuple(degrees), translation=tuple(translation),
                           default_pad_value="minimum", default_pad_label=0, image_interpolation="linear",
                           label_interpolation="nearest")
    subject = transform(_subject(geo.to_tio(x), None if label is None else geo.to_tio(label)))
    image = geo.from_tio(subject["image"].data.to(torch.float32))
    moved = None if label is None else geo.from_tio(subject["label"].data.to(torch.float32))
    return image, moved


def _posterize(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
               geo: _Geometry) -> _Result:
    levels = _POSTERIZE_LEVELS[level]
    # Bin centres of `levels` equal bins over the channel's range.
    return _unit_curve(x, lambda u: ((u * levels).floor().clamp(max=levels - 1) + 0.5) / levels), label


def _sigmoid_contrast(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
                      geo: _Geometry) -> _Result:
    centre = rng.uniform(*_SIGMOID_CENTRE)
    slope = _SIGMOID_SLOPE[level]
    low, high = 1 / (1 + np.exp(slope * centre)), 1 / (1 + np.exp(-slope * (1 - centre)))

    def curve(u: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(slope * (u - centre)) - low) / (high - low)  # rescaled to map [0, 1] onto [0, 1]

    return _unit_curve(x, curve), label


_IMPLEMENTATIONS: dict[str, Callable[..., _Result]] = {
    "contrast": _contrast, "gamma": _gamma, "bias_field": _bias_field, "inversion": _inversion, "remap": _remap,
    "noise": _noise, "blur": _blur, "resolution": _resolution, "motion": _motion, "ghosting": _ghosting,
    "spike": _spike, "affine": _affine, "posterize": _posterize, "sigmoid_contrast": _sigmoid_contrast,
}


# --------------------------------------------------------------------------------------------------------------
# Public entry points


def _known_names() -> str:
    return ", ".join(_BY_NAME)


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        # Copy read-only arrays (memory maps, blosc2 reads): torch.from_numpy warns on them; we never write anyway.
        array = np.ascontiguousarray(value) if value.flags.writeable else np.array(value)
        return torch.from_numpy(array)
    raise OODInputError(f"{what} is a {type(value).__name__}; pass a torch.Tensor or a numpy array")


def _check_label(label: Any, spatial: tuple[int, ...]) -> torch.Tensor:
    lab = _as_tensor(label, "label")
    if tuple(lab.shape) != (1, *spatial):
        raise OODInputError(f"label has shape {tuple(lab.shape)}, expected {(1, *spatial)} (one channel, the "
                            "image's spatial shape); pass the case's preprocessed segmentation")
    if lab.is_floating_point():
        if not torch.isfinite(lab).all() or not torch.equal(lab, lab.round()):
            raise OODInputError("label has non-integer values; pass the integer segmentation (-1 for ignore)")
    elif lab.dtype == torch.bool or lab.is_complex():
        raise OODInputError(f"label has dtype {lab.dtype}; pass the integer segmentation (-1 for ignore)")
    if lab.numel() and (int(lab.min()) < -32768 or int(lab.max()) > 32767):  # python ints: no int8 wrap-around
        raise OODInputError("label values do not fit int16; pass class indices (0..32767, -1 for ignore)")
    return lab


def corrupt(image: Any, label: Any, name: str, severity: int,
            seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Corrupt one preprocessed case with corruption ``name`` at ``severity`` (1..3), reproducibly.

    image: torch.Tensor or np.ndarray ``(C, *spatial)`` float in nnU-Net's preprocessed layout (2D configurations:
    ``(C, 1, H, W)``); label: the same-shaped ``(1, *spatial)`` integer segmentation (may hold -1) or None.
    Returns the float32 image and the int16 label (or None) as CPU torch tensors with the input shapes. Non-spatial
    corruptions return the label's values unchanged; spatial ones move it like the image (nearest neighbour,
    padded-in area 0). Deterministic for (name, severity, seed): same inputs, bitwise identical outputs, whatever
    the global torch/NumPy RNG state, which is left unchanged. The random draws depend on (name, seed) only, so the
    severities of one seed differ in strength, not in direction. Names of :data:`HELD_OUT_SHIFTS` are accepted too.
    """
    if name not in _BY_NAME:
        raise OODInputError(f"unknown corruption {name!r}; choose one of: {_known_names()}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise OODInputError(f"severity {severity!r} is not one of {SEVERITIES}; pass 1 (mild) to 3 (strong)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise OODInputError(f"seed {seed!r} is not an integer; pass an int, e.g. PlannedVersion.seed")
    img = _as_tensor(image, "image")
    if img.dim() != 4 or min(img.shape) < 1:
        raise OODInputError(f"image has shape {tuple(img.shape)}; pass nnU-Net's preprocessed (C, X, Y, Z) array "
                            "(2D configurations: (C, 1, H, W))")
    if not (img.is_floating_point() or img.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32)):
        raise OODInputError(f"image has dtype {img.dtype}; pass a float array")
    img = img.to(torch.float32)
    if not torch.isfinite(img).all():
        raise OODInputError("image has NaN or infinite values; pass the case's finite preprocessed array")
    spatial = tuple(int(s) for s in img.shape[1:])
    lab = None if label is None else _check_label(label, spatial)

    geo = _Geometry(is_2d=spatial[0] == 1, spatial=spatial)
    corruption = _BY_NAME[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), int(seed) % 2**64])
    lab_float = lab.to(torch.float32) if (lab is not None and corruption.spatial) else None
    with torch.random.fork_rng(devices=[]):
        # TorchIO draws from the global torch RNG (even its deterministic transforms, on every call): pin it.
        torch.manual_seed(_seed_int(rng))
        out, moved = _IMPLEMENTATIONS[name](img.clone(), lab_float, severity - 1, rng, geo)
    out = out.to(torch.float32).contiguous()
    if tuple(out.shape) != tuple(img.shape) or not torch.isfinite(out).all():  # a bug here, not bad input
        raise RuntimeError(f"corruption {name} gave shape {tuple(out.shape)} or non-finite values")
    if lab is None:
        return out, None
    if corruption.spatial:
        assert moved is not None
        return out, moved.round().to(torch.int16).contiguous()
    return out, lab.to(torch.int16).clone()


@dataclass(frozen=True)
class PlannedVersion:
    """One corrupted version of a case: ``corrupt(image, label, corruption, severity, seed)``."""

    case: str
    version: int  # 1..per_case (0 is the clean case)
    corruption: str
    severity: int
    seed: int


def _version_seed(seed: int, case: str, version: int) -> int:
    return zlib.crc32(f"{seed}\x00{case}\x00{version}".encode())


def corruption_plan(cases: Sequence[str], per_case: int, seed: int,
                    names: Sequence[str] | None = None) -> list[PlannedVersion]:
    """``per_case`` corrupted versions of every case, covering the (corruption, severity) combinations evenly.

    The combinations are laid out as a seeded stream of ``len(SEVERITIES)`` blocks; every block holds each
    corruption once (same seeded corruption order in every block, a seeded severity per corruption and block, each
    severity once per corruption over the blocks). The cases, sorted and then shuffled by ``seed``, take consecutive
    runs of ``per_case`` items of this stream, cyclically from a seeded offset. Hence every combination occurs
    ``floor`` or ``ceil`` of ``len(cases) * per_case / n_combinations`` times, and no case gets a corruption twice
    (a run of at most ``len(names)`` items never repeats one). Deterministic under ``seed``, independent of the
    order of ``cases`` and ``names``. Sorted by case, then version. ``names`` defaults to :data:`CORRUPTIONS`;
    held-out shift names are accepted.
    """
    if isinstance(per_case, bool) or not isinstance(per_case, (int, np.integer)) or per_case < 0:
        raise OODInputError(f"per_case {per_case!r} must be an integer >= 0 (corrupted versions per case)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise OODInputError(f"seed {seed!r} is not an integer; pass an int")
    if isinstance(cases, str):
        raise OODInputError("cases is a single string; pass a list of case identifiers")
    case_list = sorted(str(c) for c in cases)
    if len(set(case_list)) != len(case_list):
        raise OODInputError("cases contains duplicates; pass each case identifier once")
    requested = corruption_names() if names is None else [str(n) for n in names]
    unknown = [n for n in requested if n not in _BY_NAME]
    if unknown:
        raise OODInputError(f"unknown corruption(s) {', '.join(unknown)}; choose from: {_known_names()}")
    chosen = [n for n in _BY_NAME if n in set(requested)]  # registry order: independent of the caller's order
    if not chosen:
        raise OODInputError(f"names is empty; choose from: {_known_names()}")
    if per_case > len(chosen):
        raise OODInputError(f"per_case={per_case} exceeds the {len(chosen)} corruptions, so a case would get one "
                            f"twice; pass per_case <= {len(chosen)} or more names")
    if per_case == 0 or not case_list:
        return []

    rng = np.random.default_rng([int(seed) % 2**64, zlib.crc32(b"corruption_plan")])
    order = [chosen[i] for i in rng.permutation(len(chosen))]
    severity_of = {n: [SEVERITIES[i] for i in rng.permutation(len(SEVERITIES))] for n in order}
    stream = [(n, severity_of[n][block]) for block in range(len(SEVERITIES)) for n in order]
    offset = int(rng.integers(0, len(stream)))
    case_order = [case_list[i] for i in rng.permutation(len(case_list))]
    position = {case: i for i, case in enumerate(case_order)}

    plan = []
    for case in case_list:
        start = offset + position[case] * per_case
        for version in range(1, per_case + 1):
            corruption, severity = stream[(start + version - 1) % len(stream)]
            plan.append(PlannedVersion(case, version, corruption, severity, _version_seed(int(seed), case, version)))
    return plan
