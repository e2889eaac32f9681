"""The corruption family: reproducible, graded, checked against numpy formulas; labels untouched or moved with the
image; a balanced corruption plan."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_ood.errors import OODInputError
from nnunet_ood.quality.corruptions import (
    CORRUPTIONS,
    HELD_OUT_SHIFTS,
    SEVERITIES,
    PlannedVersion,
    corrupt,
    corruption_names,
    corruption_plan,
)

FAMILY = corruption_names()
HELD_OUT = corruption_names(held_out=True)
ALL = FAMILY + HELD_OUT
# No random draw at all: every seed gives the same output.
SEED_FREE = {"contrast", "inversion", "blur", "posterize"}
# Random draws change the *kind* of change (which k-space lines, which direction), so only the average is graded.
RANDOM_STRENGTH = {"motion", "affine"}
SHAPES = {"2d": (1, 1, 48, 56), "3d": (2, 10, 28, 32)}  # non-square, so a swapped axis shows


def phantom(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A z-scored image (body, two structures, smooth texture) and its label: 0/1/2 inside, -1 outside the body."""
    c, *spatial = shape
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) if n > 1 else np.zeros(1) for n in spatial], indexing="ij")
    body = sum(g**2 for g in grids[1:]) + (grids[0] ** 2 if spatial[0] > 1 else 0) < 0.8
    label = np.where(body, 0, -1).astype(np.int16)
    for k, centre in ((1, (0.2, 0.3, -0.2)), (2, (-0.3, -0.25, 0.3))):
        d2 = sum((g - (cc if n > 1 else 0.0)) ** 2 for g, cc, n in zip(grids, centre, spatial))
        label[d2 < 0.3**2] = k
    images = []
    for ch in range(c):
        texture = ndimage.gaussian_filter(rng.normal(size=spatial), 1.5) * 0.5
        x = body * 1.0 + (label == 1) * (1.5 + ch) + (label == 2) * 2.5 + texture
        images.append((x - x[body].mean()) / x[body].std())
    return np.stack(images).astype(np.float32), label[None]


@pytest.fixture(scope="module")
def cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {dim: phantom(shape) for dim, shape in SHAPES.items()}


def mean_abs(a: torch.Tensor, b: np.ndarray) -> float:
    return float((a.double() - torch.from_numpy(b).double()).abs().mean())


# ---------------------------------------------------------------------------------------------------------------
# Registry


def test_registry_names_groups_and_held_out_are_disjoint():
    assert FAMILY == ["contrast", "gamma", "bias_field", "inversion", "remap", "noise", "blur", "resolution",
                      "motion", "ghosting", "spike", "affine"]
    assert len(HELD_OUT) == 2 and not set(HELD_OUT) & set(FAMILY)
    assert SEVERITIES == (1, 2, 3)
    for c in CORRUPTIONS + HELD_OUT_SHIFTS:
        assert c.group in {"intensity", "noise", "resolution", "artefact", "spatial"}
        assert c.summary and "\n" not in c.summary
        assert c.spatial == (c.group == "spatial")
    assert [c.name for c in CORRUPTIONS if c.spatial] == ["affine"]


# ---------------------------------------------------------------------------------------------------------------
# Every corruption: shapes, dtypes, finiteness, labels, inputs untouched


@pytest.mark.parametrize("dim", SHAPES)
@pytest.mark.parametrize("name", ALL)
def test_runs_on_2d_and_3d_keeping_shapes_dtypes_and_labels(name, dim, cases):
    image, label = cases[dim]
    image_before, label_before = image.copy(), label.copy()
    spatial = next(c for c in CORRUPTIONS + HELD_OUT_SHIFTS if c.name == name).spatial
    for severity in SEVERITIES:
        out, lab = corrupt(image, label, name, severity, seed=11)
        assert out.shape == image.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert lab.shape == label.shape and lab.dtype == torch.int16
        assert mean_abs(out, image) > 1e-3, "the corruption changed nothing"
        if spatial:
            assert set(torch.unique(lab).tolist()) <= {-1, 0, 1, 2}
        else:
            assert torch.equal(lab, torch.from_numpy(label))
        # Tensor input gives the same, and no label gives the same image.
        out_t, lab_t = corrupt(torch.from_numpy(image), torch.from_numpy(label), name, severity, seed=11)
        assert torch.equal(out, out_t) and torch.equal(lab, lab_t)
        out_n, lab_n = corrupt(image, None, name, severity, seed=11)
        assert lab_n is None and torch.equal(out, out_n)
    # Read-only arrays (memory maps) and other integer label types work too.
    frozen, small = image.copy(), label.astype(np.int8)
    frozen.setflags(write=False)
    out_r, lab_r = corrupt(frozen, small, name, 2, seed=11)
    assert torch.equal(out_r, corrupt(image, label, name, 2, seed=11)[0]) and lab_r.dtype == torch.int16
    np.testing.assert_array_equal(image, image_before)
    np.testing.assert_array_equal(label, label_before)


# ---------------------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("name", ALL)
def test_bitwise_deterministic_whatever_the_global_rng_and_leaves_it_unchanged(name, cases):
    image, label = cases["3d"]
    torch.manual_seed(123)
    np.random.seed(123)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    first = corrupt(image, label, name, 2, seed=5)
    assert torch.equal(torch.get_rng_state(), torch_state), "the global torch RNG was advanced"
    after = np.random.get_state()
    assert after[1].tolist() == np_state[1].tolist() and after[2:] == np_state[2:], "the global NumPy RNG changed"
    torch.manual_seed(999)
    np.random.seed(999)
    torch.rand(7)
    second = corrupt(image, label, name, 2, seed=5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])

    others = [corrupt(image, label, name, 2, seed=s)[0] for s in range(6)]
    distinct = len({o.numpy().tobytes() for o in others})
    if name in SEED_FREE:
        assert distinct == 1
    else:
        assert distinct > 1, "different seeds never changed the output"


# ---------------------------------------------------------------------------------------------------------------
# Severity grades the strength


@pytest.mark.parametrize("dim", SHAPES)
@pytest.mark.parametrize("name", ALL)
def test_distance_to_clean_grows_with_severity(name, dim, cases):
    image, label = cases[dim]
    distances = np.array([[mean_abs(corrupt(image, label, name, s, seed)[0], image) for s in SEVERITIES]
                          for seed in (0, 1, 2)])
    if name in RANDOM_STRENGTH:
        mean = distances.mean(0)
        assert mean[0] < mean[1] < mean[2], distances
        assert (distances[:, 2] > distances[:, 0]).all(), distances
    else:
        assert (np.diff(distances, axis=1) > 0).all(), distances


# ---------------------------------------------------------------------------------------------------------------
# Against independent formulas


@pytest.mark.parametrize("dim", SHAPES)
def test_contrast_and_inversion_match_numpy_brute_force(dim, cases):
    image, label = cases[dim]
    for severity, factor, weight in zip(SEVERITIES, (0.7, 0.5, 0.3), (1 / 3, 2 / 3, 1.0)):
        contrast = np.empty_like(image, dtype=np.float64)
        inversion = np.empty_like(image, dtype=np.float64)
        for c in range(image.shape[0]):
            x = image[c].astype(np.float64)
            m, lo, hi = x.sum() / x.size, x.min(), x.max()
            contrast[c] = m + factor * (x - m)
            inversion[c] = (1 - weight) * x + weight * (lo + hi - x)
        np.testing.assert_allclose(corrupt(image, label, "contrast", severity, 0)[0].numpy(), contrast, atol=1e-5)
        np.testing.assert_allclose(corrupt(image, label, "inversion", severity, 0)[0].numpy(), inversion, atol=1e-5)
    # Full inversion of the range maps the minimum onto the maximum.
    out = corrupt(image, None, "inversion", 3, 0)[0].numpy()
    for c in range(image.shape[0]):
        assert out[c].flat[image[c].argmin()] == pytest.approx(image[c].max(), abs=1e-5)


def test_gamma_is_a_power_curve_of_the_rescaled_channel(cases):
    image, _ = cases["3d"]
    for severity, log_gamma in zip(SEVERITIES, (0.4, 0.7, 1.0)):
        out = corrupt(image, None, "gamma", severity, seed=3)[0].numpy()
        errors = []
        for sign in (1, -1):
            ref = np.empty_like(image, dtype=np.float64)
            for c in range(image.shape[0]):
                lo, hi = float(image[c].min()), float(image[c].max())
                ref[c] = lo + (hi - lo) * ((image[c] - lo) / (hi - lo)) ** np.exp(sign * log_gamma)
            errors.append(np.abs(out - ref).max())
        assert min(errors) < 1e-4 < max(errors)


def test_noise_has_the_requested_std_per_channel(cases):
    image, _ = cases["3d"]
    for severity, k in zip(SEVERITIES, (0.1, 0.25, 0.5)):
        residual = corrupt(image, None, "noise", severity, seed=4)[0].numpy().astype(np.float64) - image
        for c in range(image.shape[0]):
            assert residual[c].std() == pytest.approx(k * image[c].std(), rel=0.05)
            assert abs(residual[c].mean()) < 0.05 * k * image[c].std()
        assert abs(np.corrcoef(residual[0].ravel(), residual[1].ravel())[0, 1]) < 0.1  # channels independent


@pytest.mark.parametrize("dim", SHAPES)
def test_blur_is_an_in_plane_gaussian(dim, cases):
    image, _ = cases[dim]
    for severity, sigma in zip(SEVERITIES, (0.8, 1.5, 2.5)):
        out = corrupt(image, None, "blur", severity, seed=0)[0].numpy()
        ref = np.stack([ndimage.gaussian_filter(image[c].astype(np.float64), (0, sigma, sigma))
                        for c in range(image.shape[0])])
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_resolution_acts_in_plane_and_averages_coarse_voxels():
    # Varying along the out-of-plane axis only: nothing to change in-plane.
    slices = np.broadcast_to(np.arange(10, dtype=np.float32)[None, :, None, None] ** 2, (1, 10, 28, 32)).copy()
    for seed in range(4):
        np.testing.assert_allclose(corrupt(slices, None, "resolution", 3, seed)[0].numpy(), slices, atol=1e-4)
    # A checkerboard averages to zero over pairs of voxels along either in-plane axis (factor 2, severity 1).
    i, j = np.meshgrid(np.arange(28), np.arange(32), indexing="ij")
    checker = np.broadcast_to(((-1.0) ** (i + j)).astype(np.float32), (1, 10, 28, 32)).copy()
    for seed in range(4):
        np.testing.assert_allclose(corrupt(checker, None, "resolution", 1, seed)[0].numpy(), 0, atol=1e-5)


@pytest.mark.parametrize("dim", SHAPES)
def test_bias_field_has_the_severity_ratio_and_keeps_the_geometric_mean(dim):
    flat = np.ones(SHAPES[dim][1:], dtype=np.float32)[None]
    centre = (0, *(n // 2 for n in flat.shape[1:]))
    flat[centre] = 0.0  # the rescaled channel is then the field itself everywhere else (its extremes lie outside)
    keep = np.ones(flat.shape, bool)
    keep[centre] = False
    for severity, ratio in zip(SEVERITIES, (1.5, 2.5, 4.0)):
        for seed in range(3):
            field = corrupt(flat, None, "bias_field", severity, seed)[0].numpy()[keep].astype(np.float64)
            assert field.max() / field.min() == pytest.approx(ratio, rel=0.03)
            assert np.exp(np.log(field).mean()) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("dim", SHAPES)
def test_k_space_artefacts_keep_the_mean_and_spike_has_the_requested_amplitude(dim, cases):
    image, _ = cases[dim]
    for name in ("ghosting", "spike", "motion"):
        for severity in SEVERITIES:
            out = corrupt(image, None, name, severity, seed=2)[0].numpy().astype(np.float64)
            # The k-space centre (DC) is kept by all three.
            np.testing.assert_allclose(out.mean(axis=tuple(range(1, 4))), image.mean(axis=(1, 2, 3)), atol=1e-4)
    for severity, amplitude in zip(SEVERITIES, (0.25, 0.5, 1.0)):
        stripes = corrupt(image, None, "spike", severity, seed=2)[0].numpy().astype(np.float64) - image
        for c in range(image.shape[0]):
            assert np.abs(stripes[c]).max() == pytest.approx(amplitude * image[c].std(), rel=0.05)


@pytest.mark.parametrize("dim", SHAPES)
def test_motion_moves_2d_images_in_plane_and_narrows_the_clean_band(dim, cases, monkeypatch):
    import torchio

    seen = []
    real = torchio.Motion

    def spy(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(torchio, "Motion", spy)
    image, _ = cases[dim]
    for severity, band, degrees in zip(SEVERITIES, (0.5, 0.25, 0.1), (2.0, 4.0, 6.0)):
        corrupt(image, None, "motion", severity, seed=6)
        params = seen[-1]
        times = np.asarray(params["times"])
        assert times[0] < 0.5 < times[1] and times[1] - times[0] == pytest.approx(band, abs=1e-6)
        rotation, shift = np.asarray(params["degrees"]), np.asarray(params["translation"])
        assert np.abs(rotation).max() <= degrees
        if dim == "2d":  # nnU-Net layout (1, H, W): rotation about axis 0 only, no shift along it
            assert (rotation[:, 1:] == 0).all() and (shift[:, 0] == 0).all() and (rotation[:, 0] != 0).all()
        else:
            assert (rotation != 0).all()


@pytest.mark.parametrize("dim", SHAPES)
def test_held_out_and_remap_stay_within_their_bounds(dim, cases):
    image, _ = cases[dim]
    lo = image.min(axis=(1, 2, 3), keepdims=True)
    hi = image.max(axis=(1, 2, 3), keepdims=True)
    for severity, levels, displacement in zip(SEVERITIES, (8, 4, 2), (0.1, 0.2, 0.35)):
        posterized = corrupt(image, None, "posterize", severity, 0)[0].numpy()
        for c in range(image.shape[0]):
            assert len(np.unique(posterized[c])) <= levels
        assert (posterized >= lo - 1e-5).all() and (posterized <= hi + 1e-5).all()
        sigmoid = corrupt(image, None, "sigmoid_contrast", severity, 0)[0].numpy()
        assert (sigmoid >= lo - 1e-5).all() and (sigmoid <= hi + 1e-5).all()
        remapped = corrupt(image, None, "remap", severity, 0)[0].numpy()
        assert (np.abs(remapped - image) <= displacement * (hi - lo) + 1e-5).all()


# ---------------------------------------------------------------------------------------------------------------
# Affine: the label follows the image, in-plane only


VALUE_OF_LABEL = {0: 0.0, -1: 10.0, 1: 20.0, 2: 30.0}


def coded_image(label: np.ndarray, seed: int = 0) -> np.ndarray:
    """Image = a value per label (0 the minimum, like the affine's image padding) + a small smooth background."""
    rng = np.random.default_rng(seed)
    background = ndimage.gaussian_filter(rng.normal(size=label.shape[1:]), 3)
    background = 0.4 * (background - background.min()) / (np.ptp(background) + 1e-12)
    value = np.vectorize(VALUE_OF_LABEL.get)(label[0])
    return (value + background)[None].astype(np.float32)


@pytest.mark.parametrize("dim", SHAPES)
def test_affine_moves_the_label_with_the_image(dim, cases):
    _, label = cases[dim]
    image = coded_image(label)
    decode = {round(v / 10): k for k, v in VALUE_OF_LABEL.items()}
    for severity in SEVERITIES:
        for seed in range(3):
            out, moved = corrupt(image, label, "affine", severity, seed)
            decoded = np.vectorize(decode.get)(np.clip(np.round(out.numpy()[0] / 10), 0, 3))
            moved = moved.numpy()[0]
            # Away from label edges (where linear interpolation blends values) the two must agree.
            edge = np.zeros_like(moved, dtype=bool)
            for value in np.unique(moved):
                region = moved == value
                edge |= ndimage.binary_dilation(region, np.ones((1, 3, 3), bool)) & ~region
            agree = (decoded == moved)[~edge].mean()
            assert agree >= 0.99, (severity, seed, agree)
            assert not np.array_equal(moved, label[0]), "the label did not move"
            assert (moved == -1).any(), "ignore (-1) values were lost"


def test_affine_is_in_plane_and_a_volume_moves_like_its_slices(cases):
    image, label = cases["3d"]
    # The same minimum in every slice, so the image padding (the channel minimum) is the same slice-wise.
    image = image.copy()
    image[:, :, 0, 0] = image.min(axis=(1, 2, 3))[:, None]
    # Slice k carries an offset of 100 k: any mixing between slices would leave the slice's range.
    offsets = 100.0 * np.arange(image.shape[1], dtype=np.float32)[None, :, None, None]
    for severity in SEVERITIES:
        out, moved = corrupt(image, label, "affine", severity, seed=1)
        slices = [corrupt(image[:, k : k + 1], label[:, k : k + 1], "affine", severity, seed=1)
                  for k in range(image.shape[1])]
        assert torch.equal(out, torch.cat([s[0] for s in slices], dim=1))
        assert torch.equal(moved, torch.cat([s[1] for s in slices], dim=1))
        shifted = corrupt(image + offsets, None, "affine", severity, seed=1)[0].numpy()
        for c in range(image.shape[0]):
            for k in range(image.shape[1]):
                values = shifted[c, k][shifted[c, k] > image[c].min() + 1e-3]  # padding: the channel's minimum
                lo, hi = image[c, k].min() + offsets[0, k].min(), image[c, k].max() + offsets[0, k].max()
                assert values.size > 0.5 * shifted[c, k].size
                assert values.min() >= lo - 1e-3 and values.max() <= hi + 1e-3


def test_affine_2d_zooms_in_plane_by_the_severity_factor():
    label = np.zeros((1, 1, 96, 96), np.int16)
    yy, xx = np.mgrid[:96, :96]
    label[0, 0][(yy - 48) ** 2 + (xx - 48) ** 2 < 12**2] = 1  # a disc in the middle stays inside the image
    image = coded_image(label)
    for severity, zoom in zip(SEVERITIES, (1.1, 1.25, 1.45)):
        ratios = [float((corrupt(image, label, "affine", severity, s)[1] == 1).sum() / (label == 1).sum())
                  for s in range(4)]
        for r in ratios:
            assert min(abs(r - zoom**2), abs(r - zoom**-2)) < 0.1 * r, (severity, ratios)


# ---------------------------------------------------------------------------------------------------------------
# The plan


def plan_counts(plan: list[PlannedVersion]) -> Counter:
    return Counter((p.corruption, p.severity) for p in plan)


@pytest.mark.parametrize("n_cases,per_case", [(24, 3), (12, 12), (13, 5), (7, 1), (36, 2)])
def test_plan_is_balanced_and_never_repeats_a_corruption_in_a_case(n_cases, per_case):
    cases = [f"case_{i:03d}" for i in range(n_cases)]
    plan = corruption_plan(cases, per_case, seed=0)
    assert len(plan) == n_cases * per_case
    n_combinations = len(FAMILY) * len(SEVERITIES)
    counts = plan_counts(plan)
    full = [counts.get((n, s), 0) for n in FAMILY for s in SEVERITIES]
    assert max(full) - min(full) <= 1
    if n_cases * per_case % n_combinations == 0:
        assert set(full) == {n_cases * per_case // n_combinations}
    for case in cases:
        versions = [p for p in plan if p.case == case]
        assert [p.version for p in versions] == list(range(1, per_case + 1))
        assert len({p.corruption for p in versions}) == per_case
    assert len({p.seed for p in plan}) == len(plan)
    assert all(0 <= p.seed < 2**32 for p in plan)


def test_plan_is_deterministic_independent_of_order_and_depends_on_the_seed():
    cases = [f"c{i}" for i in range(30)]
    plan = corruption_plan(cases, 4, seed=7)
    assert plan == corruption_plan(list(reversed(cases)), 4, seed=7)
    assert plan == corruption_plan(tuple(sorted(cases, key=lambda c: hash(c))), 4, seed=7)
    assert plan == corruption_plan(cases, 4, seed=7, names=list(reversed(FAMILY)))
    assert plan != corruption_plan(cases, 4, seed=8)
    assert [p.case for p in plan] == sorted(p.case for p in plan)
    # A case's plan depends on the seed and its name only through the planned seeds, not the other cases' order.
    subset = corruption_plan(cases[:10], 4, seed=7)
    seeds = {(p.case, p.version): p.seed for p in plan}
    assert all(seeds[(p.case, p.version)] == p.seed for p in subset)


def test_plan_with_names_edge_cases_and_errors():
    assert corruption_plan(["a", "b"], 0, seed=1) == []
    assert corruption_plan([], 3, seed=1) == []
    plan = corruption_plan([f"c{i}" for i in range(6)], 2, seed=1, names=["noise", "posterize", "blur"])
    assert {p.corruption for p in plan} == {"noise", "posterize", "blur"}
    assert set(plan_counts(plan).values()) == {12 // 9, 12 // 9 + 1} or max(plan_counts(plan).values()) <= 2
    with pytest.raises(OODInputError, match="unknown corruption.*choose from: contrast"):
        corruption_plan(["a"], 1, seed=0, names=["gamma", "jpeg"])
    with pytest.raises(OODInputError, match="per_case"):
        corruption_plan(["a"], 3, seed=0, names=["gamma", "noise"])
    with pytest.raises(OODInputError, match="per_case"):
        corruption_plan(["a"], -1, seed=0)
    with pytest.raises(OODInputError, match="duplicates"):
        corruption_plan(["a", "a"], 1, seed=0)


def test_planned_versions_can_be_corrupted(cases):
    image, label = cases["2d"]
    for version in corruption_plan(["only"], len(FAMILY), seed=3):
        out, lab = corrupt(image, label, version.corruption, version.severity, version.seed)
        assert out.shape == image.shape and lab.shape == label.shape


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_one_line_errors(cases):
    image, label = cases["2d"]
    bad = [
        (lambda: corrupt(image, label, "jpeg", 1, 0), "unknown corruption 'jpeg'"),
        (lambda: corrupt(image, label, "noise", 4, 0), "severity 4"),
        (lambda: corrupt(image, label, "noise", 1, 0.5), "seed"),
        (lambda: corrupt(image[0], label, "noise", 1, 0), "image has shape"),
        (lambda: corrupt(np.full_like(image, np.nan), label, "noise", 1, 0), "NaN"),
        (lambda: corrupt(image, label[:, :, :10], "noise", 1, 0), "label has shape"),
        (lambda: corrupt(image, label + 0.5, "noise", 1, 0), "non-integer"),
        (lambda: corrupt(image.tolist(), label, "noise", 1, 0), "torch.Tensor or a numpy array"),
    ]
    for call, message in bad:
        with pytest.raises(OODInputError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
