"""Small PNG thumbnails of one slice: grey image, label overlays, a heat overlay of an uncertainty map.

Pictures are composed as RGB arrays with numpy (vectorised; no figure per thumbnail) and encoded with matplotlib's
``imsave``. Sizes follow the slice's physical extent (in-plane spacing), longest side :data:`THUMBNAIL_SIZE`
pixels, nearest-neighbour resampling (labels stay labels).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

THUMBNAIL_SIZE = 168  # pixels of the longest side
WINDOW_PERCENTILES = (0.5, 99.5)  # grey window of the image: robust to a few bright or dark voxels
MAP_PERCENTILES = (1.0, 99.0)  # heat scale of a method: its shown maps' values between these percentiles
LABEL_ALPHA = 0.45  # fill opacity of label overlays (boundaries are opaque)
HEAT_ALPHA = 0.7  # opacity of the heat overlay at the top of the scale (0 at the bottom)
HEAT_BASE_DIM = 0.55  # the image under a heat overlay is darkened so that the colours stand out
HEAT_COLORMAP = "turbo"
NO_IMAGE_GREY = 0.18  # background where the input image is missing
#: label colours (RGB in [0, 1]), label k gets colour (k - 1) mod len
LABEL_COLORS = np.array([[0.12, 0.47, 0.71], [1.0, 0.5, 0.05], [0.17, 0.63, 0.17], [0.84, 0.15, 0.16],
                         [0.58, 0.4, 0.74], [0.55, 0.34, 0.29], [0.89, 0.47, 0.76], [0.74, 0.74, 0.13],
                         [0.09, 0.75, 0.81]])


@dataclass(frozen=True)
class HeatScale:
    """Values mapped to the bottom and top of the heat colour map (shared by every thumbnail of a method)."""

    low: float
    high: float


def thumbnail_shape(shape: tuple[int, int], spacing_yx: tuple[float, float], size: int = THUMBNAIL_SIZE) \
        -> tuple[int, int]:
    """``(height, width)`` in pixels: the slice's physical aspect ratio, longest side ``size``."""
    height_mm, width_mm = shape[0] * spacing_yx[0], shape[1] * spacing_yx[1]
    if not (np.isfinite(height_mm) and np.isfinite(width_mm)) or height_mm <= 0 or width_mm <= 0:
        height_mm, width_mm = float(shape[0]), float(shape[1])  # broken spacing: voxel aspect
    scale = size / max(height_mm, width_mm)
    return max(1, round(height_mm * scale)), max(1, round(width_mm * scale))


def resize_nearest(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a 2D array (or ``(H, W, C)``) to ``shape``."""
    rows = np.minimum((np.arange(shape[0]) + 0.5) * array.shape[0] / shape[0], array.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * array.shape[1] / shape[1], array.shape[1] - 1).astype(int)
    return array[rows[:, None], cols[None, :]]


def window(image: np.ndarray) -> np.ndarray:
    """Grey values in [0, 1]: the finite values between the :data:`WINDOW_PERCENTILES` percentiles; non-finite -> 0."""
    image = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros(image.shape)
    low, high = np.percentile(image[finite], WINDOW_PERCENTILES)
    if high <= low:
        return np.where(finite, 0.5, 0.0)  # a constant image: mid grey
    return np.where(finite, np.clip((image - low) / (high - low), 0.0, 1.0), 0.0)


def grey_rgb(image: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W, 3)`` grey picture of ``image`` at ``shape`` (a flat dark grey when there is no image)."""
    if image is None:
        return np.full((*shape, 3), NO_IMAGE_GREY)
    return np.repeat(resize_nearest(window(image), shape)[..., None], 3, axis=2)


def label_overlay(base: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``base`` with each foreground label filled semi-transparently and its boundary drawn opaque.

    ``labels`` must already have ``base``'s height and width (resize with :func:`resize_nearest`).
    """
    labels = np.asarray(labels).astype(np.int64)
    foreground = labels > 0
    colors = LABEL_COLORS[(np.maximum(labels, 1) - 1) % len(LABEL_COLORS)]
    # a boundary pixel has a 4-neighbour with another label (the picture's border counts as background)
    padded = np.pad(labels, 1, mode="constant", constant_values=-1)
    boundary = foreground & ((padded[:-2, 1:-1] != labels) | (padded[2:, 1:-1] != labels) |
                             (padded[1:-1, :-2] != labels) | (padded[1:-1, 2:] != labels))
    alpha = np.where(boundary, 1.0, np.where(foreground, LABEL_ALPHA, 0.0))[..., None]
    return base * (1.0 - alpha) + colors * alpha


def heat_scale(values: list[np.ndarray]) -> HeatScale | None:
    """The shared heat scale of a method's shown map slices: the smallest of their :data:`MAP_PERCENTILES`\\ [0]
    percentiles to the largest of their [1] percentiles (finite values); None without finite values."""
    lows, highs = [], []
    for v in values:
        finite = np.asarray(v, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        if finite.size:
            low, high = np.percentile(finite, MAP_PERCENTILES)
            lows.append(low)
            highs.append(high)
    return HeatScale(float(min(lows)), float(max(highs))) if lows else None


def normalized_heat(values: np.ndarray, scale: HeatScale) -> np.ndarray:
    """``values`` on ``scale`` clipped to [0, 1]; NaN and +inf (could not be scored) -> 1, -inf -> 0. A degenerate
    scale (low == high) gives 1 above it and 0 elsewhere."""
    values = np.asarray(values, dtype=np.float64)
    if scale.high > scale.low:
        out = (np.clip(values, scale.low, scale.high) - scale.low) / (scale.high - scale.low)
    else:
        out = (values > scale.low).astype(np.float64)
    return np.where(np.isnan(values), 1.0, out)


def heat_overlay(base: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``base`` (darkened) with ``heat`` (in [0, 1], ``base``'s height and width) as colours whose opacity grows
    with heat."""
    from matplotlib import colormaps

    colors = colormaps[HEAT_COLORMAP](heat)[..., :3]
    alpha = (HEAT_ALPHA * heat)[..., None]
    return HEAT_BASE_DIM * base * (1.0 - alpha) + colors * alpha


def png_bytes(rgb: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` picture in [0, 1] as PNG bytes."""
    from matplotlib.image import imsave

    buffer = io.BytesIO()
    imsave(buffer, np.clip(rgb, 0.0, 1.0), format="png")
    return buffer.getvalue()
