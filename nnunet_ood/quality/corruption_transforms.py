"""The implementations of the corruptions of :mod:`nnunet_ood.quality.corruption_catalogue`, on nnU-Net's
preprocessed layout (see :mod:`nnunet_ood.quality.corruptions` for the conventions: in-plane axes, seeded draws,
TorchIO under a pinned torch RNG, intensity curves on each channel rescaled to [0, 1]).

Each takes the nnU-Net-layout float32 image, the label as float32 (or None), the severity index (0..2), the seeded
generator and the :class:`Geometry`, and returns ``(image, label)``; :data:`IMPLEMENTATIONS` names them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nnunet_ood.quality.corruption_catalogue import (
    AFFINE_DEGREES,
    AFFINE_SHIFT,
    AFFINE_ZOOM,
    BIAS_ORDER,
    BIAS_RATIO,
    BLUR_STD,
    CONTRAST_FACTOR,
    DOWNSAMPLING,
    GHOST_INTENSITY,
    GHOSTS,
    INVERSION_WEIGHT,
    LOG_GAMMA,
    MOTION_BAND,
    MOTION_DEGREES,
    MOTION_SHIFT,
    NOISE_STD,
    POSTERIZE_LEVELS,
    REMAP_DISPLACEMENT,
    REMAP_KNOTS,
    SIGMOID_CENTRE,
    SIGMOID_SLOPE,
    SPIKE_AMPLITUDE,
)

# --------------------------------------------------------------------------------------------------------------
# Geometry and helpers


@dataclass(frozen=True)
class Geometry:
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


def seed_int(rng: np.random.Generator) -> int:
    """A seed for TorchIO or torch from the seeded generator (one draw)."""
    return int(rng.integers(0, 2**31 - 1))


# --------------------------------------------------------------------------------------------------------------
# The corruptions. Each takes the nnU-Net-layout float32 image, the label as float32 (or None), the severity
# index (0..2), the seeded generator and the geometry, and returns (image, label).

Result = tuple[torch.Tensor, "torch.Tensor | None"]


def _contrast(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
              geo: Geometry) -> Result:
    mean = _channel_stat(x, "mean")
    return (mean + CONTRAST_FACTOR[level] * (x.double() - mean)).float(), label


def _gamma(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
           geo: Geometry) -> Result:
    tio = _torchio()
    sign = 1.0 if rng.random() < 0.5 else -1.0
    transform = tio.Gamma(gamma=float(np.exp(sign * LOG_GAMMA[level])))
    return _unit_curve(x, lambda u: _apply(transform, u.float()).double()), label


def _bias_field(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
                geo: Geometry) -> Result:
    tio = _torchio()
    n_coefficients = (BIAS_ORDER + 1) * (BIAS_ORDER + 2) * (BIAS_ORDER + 3) // 6
    direction = rng.uniform(-1.0, 1.0, n_coefficients)
    # Raw coefficients give fields whose strength depends on the dimension (3D has more active terms: up to 30x
    # max/min at coefficients 0.5). Scale the seeded polynomial so the field's max/min is the severity's ratio, and
    # centre its logarithm (the constant term is coefficient 0) so the mean brightness is kept.
    probe = np.zeros((1, *geo.tio_spatial), dtype=np.float32)
    log_field = np.log(tio.BiasField.generate_bias_field(probe, BIAS_ORDER, direction.tolist()).astype(np.float64))
    spread = float(log_field.max() - log_field.min())
    scale = np.log(BIAS_RATIO[level]) / spread if spread > 0 else 0.0
    coefficients = direction * scale
    coefficients[0] -= float(log_field.mean()) * scale
    transform = tio.BiasField(coefficients=coefficients.tolist(), order=BIAS_ORDER)
    u, lo, span = _to_unit(x)
    # In TorchIO's layout, so a 2D image's field is a polynomial of its two in-plane coordinates only.
    biased = geo.from_tio(_apply(transform, geo.to_tio(u.float())))
    return _from_unit(biased, lo, span), label


def _inversion(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
               geo: Geometry) -> Result:
    lo, hi = _channel_stat(x, "min"), _channel_stat(x, "max")
    w = INVERSION_WEIGHT[level]
    xd = x.double()
    return ((1 - w) * xd + w * (lo + hi - xd)).float(), label


def _remap(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
           geo: Geometry) -> Result:
    knots = np.linspace(0.0, 1.0, REMAP_KNOTS)
    shifts = rng.uniform(-1.0, 1.0, (x.shape[0], REMAP_KNOTS)) * REMAP_DISPLACEMENT[level]
    u, lo, span = _to_unit(x)
    flat = u.reshape(u.shape[0], -1).numpy()
    curved = np.stack([np.interp(flat[c], knots, knots + shifts[c]) for c in range(u.shape[0])])
    return _from_unit(torch.from_numpy(curved).reshape(u.shape), lo, span), label


def _noise(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
           geo: Geometry) -> Result:
    tio = _torchio()
    std = _channel_stat(x, "std")
    std = torch.where(std > 0, std, torch.ones_like(std))
    # Unit-std noise from TorchIO on zeros, scaled per channel: the clean part stays bit-exact.
    transform = tio.Noise(mean=0.0, std=NOISE_STD[level], seed=seed_int(rng))
    noise = _apply(transform, torch.zeros_like(x)).double()
    return (x.double() + noise * std).float(), label


def _blur(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
          geo: Geometry) -> Result:
    tio = _torchio()
    std = [0.0, 0.0, 0.0]
    for axis in geo.tio_in_plane:
        std[axis] = BLUR_STD[level]
    blurred = _apply(tio.Blur(std=tuple(std)), geo.to_tio(x))
    return geo.from_tio(blurred), label


def _resolution(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
                geo: Geometry) -> Result:
    # Written by hand: TorchIO's RandomAnisotropy samples the coarse grid by nearest neighbour from a grid shifted by
    # (factor - 1) / 2 voxels, so even factors also shift the image by half a voxel and factor 2 can differ more from
    # the clean image than factor 3. Averaging into coarse voxels (a thick slice / large pixel) and linear
    # interpolation back with aligned voxel centres changes the resolution only.
    import torch.nn.functional as F

    dim = 2 + int(rng.integers(0, 2))  # an in-plane axis of (C, X, Y, Z): tensor dim 2 or 3
    n = x.shape[dim]
    coarse = max(1, round(n / DOWNSAMPLING[level]))
    moved = x.movedim(dim, -1)
    lines = moved.reshape(-1, 1, n).double()
    low = F.interpolate(lines, size=coarse, mode="area")
    back = F.interpolate(low, size=n, mode="linear", align_corners=False)
    return back.reshape(moved.shape).movedim(-1, dim).float().contiguous(), label


def _motion(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
            geo: Geometry) -> Result:
    tio = _torchio()
    # TorchIO's Motion fills k-space (split along the last axis) from the clean image in the segment holding the
    # centre and from the moved images elsewhere. Two movements whose times bracket a central band: the band narrows
    # with severity (motion closer to the k-space centre) while the movements grow, so the severity grades the
    # artefact instead of saturating. The centre jitter (< half the narrowest band) keeps the centre in the band.
    centre = 0.5 + rng.uniform(-0.8, 0.8) * MOTION_BAND[-1] / 2
    times = np.array([centre - MOTION_BAND[level] / 2, centre + MOTION_BAND[level] / 2], dtype=np.float32)
    degrees = rng.uniform(-1.0, 1.0, (2, 3)) * MOTION_DEGREES[level]
    shifts = rng.uniform(-1.0, 1.0, (2, 3)) * MOTION_SHIFT[level] * np.asarray(geo.spatial, dtype=float)
    if geo.is_2d:
        degrees[:, 1:] = 0.0  # rotate about the out-of-plane axis 0 only
        shifts[:, 0] = 0.0
    # In TorchIO's 2D layout the last axis is the singleton, and the k-space split along it gives one rigidly moved
    # image instead of an artefact, so motion stays in nnU-Net's layout (last axis in-plane) for 2D and 3D alike.
    transform = tio.Motion(degrees=degrees, translation=shifts, times=times, image_interpolation="linear")
    return _apply(transform, x), label


def _ghosting(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
              geo: Geometry) -> Result:
    tio = _torchio()
    ghosts = int(rng.integers(GHOSTS[0], GHOSTS[1] + 1))
    axis = geo.tio_in_plane[int(rng.integers(0, 2))]
    transform = tio.Ghosting(num_ghosts=ghosts, axis=axis, intensity=GHOST_INTENSITY[level], restore=None)
    return geo.from_tio(_apply(transform, geo.to_tio(x))), label


def _spike(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
           geo: Geometry) -> Result:
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
        amplitude = SPIKE_AMPLITUDE[level] * (float(std[c]) if std[c] > 0 else 1.0)
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
            geo: Geometry) -> Result:
    tio = _torchio()
    rotation = (1 if rng.random() < 0.5 else -1) * AFFINE_DEGREES[level]
    zoom = AFFINE_ZOOM[level] ** (1 if rng.random() < 0.5 else -1)
    direction = rng.uniform(-1.0, 1.0, 2)
    direction /= max(np.linalg.norm(direction), 1e-6)
    degrees = [0.0, 0.0, 0.0]
    degrees[geo.tio_normal] = rotation
    scales = [zoom, zoom, zoom]
    scales[geo.tio_normal] = 1.0  # in-plane only: a 3D volume's slices move exactly like 2D images
    translation = [0.0, 0.0, 0.0]
    for d, axis in zip(direction, geo.tio_in_plane):
        translation[axis] = float(d * AFFINE_SHIFT[level] * geo.tio_spatial[axis])
    transform = tio.Affine(scales=tuple(scales), degrees=tuple(degrees), translation=tuple(translation),
                           default_pad_value="minimum", default_pad_label=0, image_interpolation="linear",
                           label_interpolation="nearest")
    subject = transform(_subject(geo.to_tio(x), None if label is None else geo.to_tio(label)))
    image = geo.from_tio(subject["image"].data.to(torch.float32))
    moved = None if label is None else geo.from_tio(subject["label"].data.to(torch.float32))
    return image, moved


def _posterize(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
               geo: Geometry) -> Result:
    levels = POSTERIZE_LEVELS[level]
    # Bin centres of `levels` equal bins over the channel's range.
    return _unit_curve(x, lambda u: ((u * levels).floor().clamp(max=levels - 1) + 0.5) / levels), label


def _sigmoid_contrast(x: torch.Tensor, label: torch.Tensor | None, level: int, rng: np.random.Generator,
                      geo: Geometry) -> Result:
    centre = rng.uniform(*SIGMOID_CENTRE)
    slope = SIGMOID_SLOPE[level]
    low, high = 1 / (1 + np.exp(slope * centre)), 1 / (1 + np.exp(-slope * (1 - centre)))

    def curve(u: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(slope * (u - centre)) - low) / (high - low)  # rescaled to map [0, 1] onto [0, 1]

    return _unit_curve(x, curve), label


IMPLEMENTATIONS: dict[str, Callable[..., Result]] = {
    "contrast": _contrast, "gamma": _gamma, "bias_field": _bias_field, "inversion": _inversion, "remap": _remap,
    "noise": _noise, "blur": _blur, "resolution": _resolution, "motion": _motion, "ghosting": _ghosting,
    "spike": _spike, "affine": _affine, "posterize": _posterize, "sigmoid_contrast": _sigmoid_contrast,
}
