"""Small multi-domain 2D segmentation dataset in nnU-Net v2 raw format, used by the demo.

Each image shows one or two bright elliptical "organs" (label 1), some with a brighter inner
"lesion" (label 2), on a smoothly textured background. Four test domains mimic scanners:

* ``id``: the training scanner (same generator as ``imagesTr``).
* ``shift_mild``: lower contrast-to-noise ratio, a mild multiplicative bias field, slight blur.
* ``shift_strong``: much lower contrast-to-noise ratio, a strong bias field and blur.
* ``far_ood``: not this anatomy at all (checkerboards, stripes, many small dark dots); the
  label maps are written but empty.

nnU-Net z-scores every image (channel name "MRI"), an affine map per image, so every shift
here is one an affine intensity map cannot undo: contrast relative to noise and texture, a
spatially varying gain, blur, and different structure. Each scanner also applies its own
global gain and offset, which z-scoring removes, as it would for real scanners.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

DEMO_DOMAINS: tuple[str, ...] = ("id", "shift_mild", "shift_strong", "far_ood")
DEMO_LABELS: dict[str, int] = {"background": 0, "organ": 1, "lesion": 2}
# Anisotropic spacing and an off-zero origin, so that a swapped axis or a lost origin in the
# pipeline shows up as a geometry mismatch instead of passing silently.
DEMO_SPACING: tuple[float, float] = (0.8, 0.7)  # SimpleITK order (x, y)
DEMO_ORIGIN: tuple[float, float] = (12.5, -30.0)
FILE_ENDING = ".nii.gz"


@dataclass(frozen=True)
class _Scanner:
    """Acquisition parameters of one simulated scanner (tissue intensities are in units of
    the background level, which is 1)."""

    organ_contrast: float  # organ minus background, before bias field and noise
    lesion_contrast: float  # lesion minus organ
    texture_std: float  # amplitude of the smooth tissue texture
    noise_std: float  # additive white noise after blur and bias (thermal noise)
    bias_strength: float  # log-amplitude of the multiplicative bias field
    blur_sigma: float  # Gaussian point-spread function, in pixels
    gain: float  # global scanner gain and offset: removed by z-scoring
    offset: float


_SCANNERS: dict[str, _Scanner] = {
    "id": _Scanner(1.0, 0.8, 0.12, 0.08, 0.0, 0.0, gain=400.0, offset=50.0),
    "shift_mild": _Scanner(0.75, 0.6, 0.12, 0.13, 0.25, 0.5, gain=900.0, offset=-100.0),
    "shift_strong": _Scanner(0.45, 0.35, 0.12, 0.25, 0.7, 1.5, gain=120.0, offset=10.0),
}


@dataclass
class DemoDataset:
    """Where :func:`generate_demo_dataset` wrote the dataset and how its test cases split."""

    name: str
    dataset_dir: Path
    domains: list[str]
    images_ts: dict[str, Path]  # domain -> folder of test images (``<case>_0000.nii.gz``)
    labels_ts: dict[str, Path]  # domain -> folder of reference labels (``<case>.nii.gz``)
    case_domain: dict[str, str] = field(default_factory=dict)  # test case -> domain
    train_cases: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=lambda: dict(DEMO_LABELS))
    spacing: tuple[float, float] = DEMO_SPACING
    origin: tuple[float, float] = DEMO_ORIGIN

    @property
    def images_tr(self) -> Path:
        """Folder of training images."""
        return self.dataset_dir / "imagesTr"

    @property
    def labels_tr(self) -> Path:
        """Folder of training labels."""
        return self.dataset_dir / "labelsTr"

    @property
    def images_site(self) -> Path:
        """Folder of a site's own labelled in-distribution cases (new subjects of the training scanner), for
        ``nnUNetv2_calibrate_ood -l``."""
        return self.dataset_dir / "imagesSite"

    @property
    def labels_site(self) -> Path:
        """Reference labels of :attr:`images_site`."""
        return self.dataset_dir / "labelsSite"

    def cases(self, domain: str) -> list[str]:
        """Test case names of one domain, sorted."""
        return sorted(c for c, d in self.case_domain.items() if d == domain)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each of shape (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy, xx


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
             angle: float) -> np.ndarray:
    """Boolean mask of a rotated ellipse."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u = (c * dx + s * dy) / rx
    v = (-s * dx + c * dy) / ry
    return u * u + v * v <= 1.0


def _smooth_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Smooth zero-mean unit-std random field (Gaussian-filtered white noise)."""
    f = gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def _bias_field(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """Multiplicative bias field exp(strength * p) with p a random quadratic in [-1, 1]:
    a slowly varying gain, like a receive-coil profile."""
    yy, xx = _grid(size)
    y, x = 2 * yy / (size - 1) - 1, 2 * xx / (size - 1) - 1
    coef = rng.uniform(-1, 1, 5)
    p = coef[0] * x + coef[1] * y + coef[2] * x * y + coef[3] * x * x + coef[4] * y * y
    p = p / (np.abs(p).max() + 1e-12)
    return np.exp(strength * p)


def _anatomy(rng: np.random.Generator, size: int) -> np.ndarray:
    """Label map with one or two organs (1), each possibly holding a lesion (2)."""
    yy, xx = _grid(size)
    label = np.zeros((size, size), dtype=np.uint8)
    n_organs = 1 + int(rng.random() < 0.5)
    for k in range(n_organs):  # at most two objects: the loop is over shapes, not pixels
        scale = 1.0 if k == 0 else 0.7  # the second organ is smaller
        ry, rx = rng.uniform(0.12, 0.24, 2) * size * scale
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        angle = rng.uniform(0, np.pi)
        organ = _ellipse(yy, xx, cy, cx, ry, rx, angle)
        label[organ & (label == 0)] = 1
        if rng.random() < 0.6:
            # Lesion: a smaller ellipse offset inside the organ, clipped to it.
            f = rng.uniform(0.3, 0.5)
            oy, ox = rng.uniform(-0.3, 0.3, 2) * np.array([ry, rx])
            lesion = _ellipse(yy, xx, cy + oy, cx + ox, ry * f, rx * f, rng.uniform(0, np.pi))
            label[lesion & organ] = 2
    return label


def _acquire(rng: np.random.Generator, label: np.ndarray, sc: _Scanner) -> np.ndarray:
    """Simulate the image a scanner records of a label map."""
    size = label.shape[0]
    tissue = (1.0 + sc.organ_contrast * (label >= 1) + sc.lesion_contrast * (label == 2))
    tissue = tissue + sc.texture_std * _smooth_field(rng, size, sigma=2.0)
    if sc.blur_sigma > 0:
        tissue = gaussian_filter(tissue, sc.blur_sigma, mode="nearest")
    if sc.bias_strength > 0:
        tissue = tissue * _bias_field(rng, size, sc.bias_strength)
    img = tissue + sc.noise_std * rng.standard_normal((size, size))
    return (sc.gain * img + sc.offset).astype(np.float32)


def _far_ood(rng: np.random.Generator, size: int, kind: int) -> np.ndarray:
    """An image that is not this anatomy: a rotated checkerboard, sinusoidal stripes, or many
    small dark dots on a bright background (inverted polarity)."""
    yy, xx = _grid(size)
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    period = rng.uniform(6, 16)
    if kind == 0:
        img = 1.0 + ((np.floor(u / period) + np.floor(v / period)) % 2)
    elif kind == 1:
        img = 1.5 + 0.5 * np.sin(2 * np.pi * u / period)
    else:
        n = int(rng.integers(15, 30))
        cy, cx = rng.uniform(0, size, (2, n))
        r = rng.uniform(1.5, 3.5, n)
        # (n, size, size) distance stack: small and fully vectorised.
        d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
        img = 2.0 - (d2 <= r[:, None, None] ** 2).any(axis=0)
    img = img + 0.08 * rng.standard_normal((size, size))
    return (400.0 * img + 50.0).astype(np.float32)


def _write(arr: np.ndarray, path: Path) -> None:
    """Write a 2D array as NIfTI with the demo geometry."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(DEMO_SPACING)
    img.SetOrigin(DEMO_ORIGIN)
    sitk.WriteImage(img, str(path), useCompression=True)


def _case_rng(seed: int, stream: int, idx: int) -> np.random.Generator:
    """Independent generator per case, so a case does not depend on how many others exist."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, idx]))


def _clear(folder: Path) -> None:
    """Create a folder, removing stale NIfTI files a previous run with other counts left."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*" + FILE_ENDING):
        f.unlink()


def _write_training_cases(ds: DemoDataset, seed: int, n_train: int, size: int) -> None:
    """``train_XXX``: cases of the ``id`` scanner, in ``imagesTr`` / ``labelsTr``."""
    _clear(ds.images_tr)
    _clear(ds.labels_tr)
    for i in range(n_train):
        case = f"train_{i:03d}"
        rng = _case_rng(seed, 0, i)
        label = _anatomy(rng, size)
        _write(_acquire(rng, label, _SCANNERS["id"]), ds.images_tr / f"{case}_0000{FILE_ENDING}")
        _write(label, ds.labels_tr / f"{case}{FILE_ENDING}")
        ds.train_cases.append(case)


def _write_test_domain(ds: DemoDataset, d_idx: int, domain: str, seed: int, n_cases: int, size: int) -> None:
    """``<domain>_XXX``: the test cases of one domain (its stream ``d_idx``), in ``imagesTs_<domain>`` /
    ``labelsTs_<domain>``."""
    ds.images_ts[domain] = ds.dataset_dir / f"imagesTs_{domain}"
    ds.labels_ts[domain] = ds.dataset_dir / f"labelsTs_{domain}"
    _clear(ds.images_ts[domain])
    _clear(ds.labels_ts[domain])
    for i in range(n_cases):
        case = f"{domain}_{i:03d}"
        rng = _case_rng(seed, d_idx, i)
        if domain == "far_ood":
            img = _far_ood(rng, size, kind=i % 3)
            label = np.zeros((size, size), dtype=np.uint8)
        else:
            label = _anatomy(rng, size)
            img = _acquire(rng, label, _SCANNERS[domain])
        _write(img, ds.images_ts[domain] / f"{case}_0000{FILE_ENDING}")
        _write(label, ds.labels_ts[domain] / f"{case}{FILE_ENDING}")
        ds.case_domain[case] = domain


def _write_site_cases(ds: DemoDataset, seed: int, n_site: int, size: int) -> None:
    """``site_XXX``: new subjects of the ``id`` scanner, in ``imagesSite`` / ``labelsSite``."""
    _clear(ds.images_site)
    _clear(ds.labels_site)
    for i in range(n_site):  # its own stream, after the test domains': the other cases do not change
        rng = _case_rng(seed, len(DEMO_DOMAINS) + 1, i)
        label = _anatomy(rng, size)
        _write(_acquire(rng, label, _SCANNERS["id"]), ds.images_site / f"site_{i:03d}_0000{FILE_ENDING}")
        _write(label, ds.labels_site / f"site_{i:03d}{FILE_ENDING}")


def _write_descriptions(ds: DemoDataset, n_train: int) -> None:
    """``dataset.json`` and ``test_domains.json`` (the case -> domain map)."""
    dataset_json = {
        "channel_names": {"0": "MRI"},  # "MRI" -> nnU-Net z-scores each image on its own
        "labels": dict(DEMO_LABELS),
        "numTraining": n_train,
        "file_ending": FILE_ENDING,
        "name": ds.name,
        "description": "nnunet-ood synthetic demo: ellipse organs/lesions; test domains "
                       + ", ".join(DEMO_DOMAINS),
    }
    (ds.dataset_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    # The case -> domain map, so that a later step can group results without this object.
    (ds.dataset_dir / "test_domains.json").write_text(json.dumps(ds.case_domain, indent=2))


def generate_demo_dataset(nnunet_raw: str | os.PathLike, dataset_id: int = 501, seed: int = 0,
                          n_train: int = 60, n_test_per_domain: int = 16,
                          size: int = 64, n_site: int = 0) -> DemoDataset:
    """Write the demo dataset under ``<nnunet_raw>/Dataset<id>_OODDemo`` and describe it.

    Training cases ``train_XXX`` come from the ``id`` scanner; test cases are named
    ``<domain>_XXX`` (unique across domains) in ``imagesTs_<domain>`` / ``labelsTs_<domain>``.
    ``n_site`` more cases ``site_XXX`` of the ``id`` scanner, new subjects, go to ``imagesSite`` / ``labelsSite``:
    a site's labelled calibration cases.
    The output is a deterministic function of the arguments. Existing NIfTI files in the
    dataset's own folders are replaced.
    """
    if n_train < 1 or n_test_per_domain < 0 or n_site < 0 or size < 16:
        raise ValueError("need n_train >= 1, n_test_per_domain >= 0, n_site >= 0 and size >= 16")
    name = f"Dataset{dataset_id:03d}_OODDemo"
    ds = DemoDataset(name=name, dataset_dir=Path(nnunet_raw) / name, domains=list(DEMO_DOMAINS), images_ts={},
                     labels_ts={})
    _write_training_cases(ds, seed, n_train, size)
    for d_idx, domain in enumerate(DEMO_DOMAINS, start=1):
        _write_test_domain(ds, d_idx, domain, seed, n_test_per_domain, size)
    _write_site_cases(ds, seed, n_site, size)
    _write_descriptions(ds, n_train)
    return ds
