"""Seeded, graded acquisition corruptions of nnU-Net's preprocessed cases: failure examples without new labels.

A case's preprocessed image ``(C, *spatial)`` (2D configurations: ``(C, 1, H, W)``) and label ``(1, *spatial)``
are corrupted by one member of :data:`CORRUPTIONS` at a severity of :data:`SEVERITIES`, then predicted by the
fold's model. :func:`corruption_plan` says which corruption, severity and seed each corrupted version of a case
gets, balanced over the combinations.

This module is the entry point (:func:`corrupt`, :func:`corruption_plan`, the input checks); the catalogue (names,
groups, summaries, parameters per severity) is :mod:`nnunet_ood.quality.corruption_catalogue`, the implementations
are :mod:`nnunet_ood.quality.corruption_transforms`.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nnunet_ood.errors import OODInputError
from nnunet_ood.quality.corruption_catalogue import (
    BY_NAME,
    CORRUPTIONS,
    GROUPS,
    HELD_OUT_SHIFTS,
    SEVERITIES,
    Corruption,
    corruption_names,
    known_names,
)
from nnunet_ood.quality.corruption_transforms import IMPLEMENTATIONS, Geometry, seed_int

__all__ = ["CORRUPTIONS", "GROUPS", "HELD_OUT_SHIFTS", "SEVERITIES", "Corruption", "PlannedVersion", "corrupt",
           "corruption_names", "corruption_plan"]


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
    if name not in BY_NAME:
        raise OODInputError(f"unknown corruption {name!r}; choose one of: {known_names()}")
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

    geo = Geometry(is_2d=spatial[0] == 1, spatial=spatial)
    corruption = BY_NAME[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), int(seed) % 2**64])
    lab_float = lab.to(torch.float32) if (lab is not None and corruption.spatial) else None
    with torch.random.fork_rng(devices=[]):
        # TorchIO draws from the global torch RNG (even its deterministic transforms, on every call): pin it.
        torch.manual_seed(seed_int(rng))
        out, moved = IMPLEMENTATIONS[name](img.clone(), lab_float, severity - 1, rng, geo)
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
    unknown = [n for n in requested if n not in BY_NAME]
    if unknown:
        raise OODInputError(f"unknown corruption(s) {', '.join(unknown)}; choose from: {known_names()}")
    chosen = [n for n in BY_NAME if n in set(requested)]  # registry order: independent of the caller's order
    if not chosen:
        raise OODInputError(f"names is empty; choose from: {known_names()}")
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
