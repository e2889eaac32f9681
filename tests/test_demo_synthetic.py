"""The synthetic demo dataset: layout, geometry, labels, determinism and real domain shifts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import uniform_filter

from nnunet_ood.demo.synthetic import DEMO_DOMAINS, DemoDataset, generate_demo_dataset

N_TRAIN, N_TEST = 4, 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return generate_demo_dataset(tmp_path_factory.mktemp("raw"), dataset_id=501, seed=0,
                                 n_train=N_TRAIN, n_test_per_domain=N_TEST, size=64)


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _zscore(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.mean()) / a.std()


def _domain_images(ds: DemoDataset, domain: str) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(_read(ds.images_ts[domain] / f"{c}_0000.nii.gz"), _read(ds.labels_ts[domain] / f"{c}.nii.gz"))
            for c in ds.cases(domain)]


def test_layout_and_dataset_json(demo: DemoDataset) -> None:
    d = demo.dataset_dir
    assert demo.name == "Dataset501_OODDemo" and d.name == demo.name
    assert demo.domains == ["id", "shift_mild", "shift_strong", "far_ood"]
    tr = [f"train_{i:03d}" for i in range(N_TRAIN)]
    assert sorted(p.name for p in (d / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in tr]
    assert sorted(p.name for p in (d / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in tr]
    for dom in DEMO_DOMAINS:
        assert demo.images_ts[dom] == d / f"imagesTs_{dom}"
        assert demo.labels_ts[dom] == d / f"labelsTs_{dom}"
        cases = [f"{dom}_{i:03d}" for i in range(N_TEST)]
        assert sorted(p.name for p in demo.images_ts[dom].iterdir()) == [f"{c}_0000.nii.gz" for c in cases]
        assert sorted(p.name for p in demo.labels_ts[dom].iterdir()) == [f"{c}.nii.gz" for c in cases]
        assert demo.cases(dom) == cases
    # case names are unique across domains
    assert len(demo.case_domain) == N_TEST * len(DEMO_DOMAINS)
    js = json.loads((d / "dataset.json").read_text())
    assert js["channel_names"] == {"0": "MRI"}
    assert js["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert js["numTraining"] == N_TRAIN and js["file_ending"] == ".nii.gz"
    assert json.loads((d / "test_domains.json").read_text()) == demo.case_domain


def test_geometry_dtypes_and_labels(demo: DemoDataset) -> None:
    files = sorted(demo.dataset_dir.glob("images*/*.nii.gz"))
    assert len(files) == N_TRAIN + N_TEST * len(DEMO_DOMAINS)
    for f in files:
        img = sitk.ReadImage(str(f))
        assert img.GetDimension() == 2 and img.GetSize() == (64, 64)
        assert img.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_allclose(img.GetSpacing(), demo.spacing, rtol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), demo.origin, rtol=1e-6)
        assert demo.spacing[0] != demo.spacing[1]  # anisotropic, so axis swaps show
        lab_path = f.parent.parent / f.parent.name.replace("images", "labels") / f.name.replace("_0000", "")
        lab = sitk.ReadImage(str(lab_path))
        assert lab.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_allclose(lab.GetSpacing(), demo.spacing, rtol=1e-6)
        np.testing.assert_allclose(lab.GetOrigin(), demo.origin, rtol=1e-6)
        values = set(np.unique(sitk.GetArrayFromImage(lab)).tolist())
        assert values <= {0, 1, 2}
        if "far_ood" in f.name:
            assert values == {0}
        else:
            assert 1 in values  # every in-anatomy case shows at least one organ


def test_deterministic_in_seed(demo: DemoDataset, tmp_path: Path) -> None:
    same = generate_demo_dataset(tmp_path / "a", seed=0, n_train=N_TRAIN, n_test_per_domain=N_TEST)
    other = generate_demo_dataset(tmp_path / "b", seed=1, n_train=N_TRAIN, n_test_per_domain=N_TEST)
    for rel in ["imagesTr/train_001_0000.nii.gz", "labelsTr/train_001.nii.gz",
                "imagesTs_shift_strong/shift_strong_002_0000.nii.gz",
                "imagesTs_far_ood/far_ood_003_0000.nii.gz"]:
        ref = _read(demo.dataset_dir / rel)
        np.testing.assert_array_equal(_read(same.dataset_dir / rel), ref)
        assert not np.array_equal(_read(other.dataset_dir / rel), ref)


def test_regeneration_removes_stale_cases(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path, n_train=3, n_test_per_domain=3, size=32)
    ds = generate_demo_dataset(tmp_path, n_train=2, n_test_per_domain=1, size=32)
    assert len(list(ds.images_tr.iterdir())) == 2
    assert len(list(ds.images_ts["id"].iterdir())) == 1


def _hf_energy(z: np.ndarray) -> float:
    """Mean squared residual after a 3x3 box filter: high-frequency (noise) energy."""
    return float(((z - uniform_filter(z, 3, mode="nearest")) ** 2).mean())


def _contrast(z: np.ndarray, lab: np.ndarray) -> float:
    """Organ-minus-background mean of a z-scored image, in units of the background noise+texture."""
    return float((z[lab >= 1].mean() - z[lab == 0].mean()) / z[lab == 0].std())


def test_domains_differ_after_zscoring(demo: DemoDataset) -> None:
    hf, con = {}, {}
    for dom in DEMO_DOMAINS:
        pairs = _domain_images(demo, dom)
        hf[dom] = np.mean([_hf_energy(_zscore(im)) for im, _ in pairs])
        if dom != "far_ood":
            con[dom] = np.mean([_contrast(_zscore(im), lab) for im, lab in pairs])
    # z-scoring removes gain and offset, not the contrast-to-noise ratio or the noise share.
    assert hf["id"] < hf["shift_mild"] < hf["shift_strong"]
    assert hf["shift_strong"] > 3 * hf["id"]
    assert con["id"] > con["shift_mild"] > con["shift_strong"]
    assert con["shift_strong"] < 0.5 * con["id"]


def test_test_id_matches_training_scanner(demo: DemoDataset) -> None:
    tr = [_zscore(_read(p)) for p in sorted(demo.images_tr.glob("*.nii.gz"))]
    te = [_zscore(im) for im, _ in _domain_images(demo, "id")]
    hf_tr, hf_te = np.mean([_hf_energy(z) for z in tr]), np.mean([_hf_energy(z) for z in te])
    assert hf_te == pytest.approx(hf_tr, rel=0.3)


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path, n_train=0)
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path, size=8)
