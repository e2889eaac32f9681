"""Output-based scores (max_softmax, entropy, energy, kl_uniform, temperature) against numpy references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_ood.methods import REGISTRY, MethodKind
from nnunet_ood.methods.logits import Temperature, fit_temperature, negative_log_likelihood

LOGIT_METHODS = [m.name for m in REGISTRY if m.kind is MethodKind.LOGITS]

OOD_TRAINER = "nnUNetTrainerOOD_smoke"


def numpy_reference(method: str, logits: np.ndarray, region_based: bool, t: float = 1.0) -> np.ndarray:
    """Direct numpy formulas from METHODS.md §3 (float64)."""
    z = logits.astype(np.float64) / (t if method == "temperature" else 1.0)
    if region_based:
        p = 1 / (1 + np.exp(-z))
        h = -(p * np.log(p) + (1 - p) * np.log(1 - p))
        if method in ("max_softmax", "temperature"):
            return 1 - np.maximum(p, 1 - p).mean(0)
        if method == "entropy":
            return h.mean(0)
        if method == "kl_uniform":
            return (h - np.log(2)).mean(0)
        return (-np.log(np.exp(z / 2) + np.exp(-z / 2))).mean(0)
    e = np.exp(z - z.max(0, keepdims=True))
    p = e / e.sum(0, keepdims=True)
    h = -(p * np.log(p)).sum(0)
    if method in ("max_softmax", "temperature"):
        return 1 - p.max(0)
    if method == "entropy":
        return h
    if method == "kl_uniform":
        return -(np.log(z.shape[0]) - h)  # -KL(p || uniform)
    return -np.log(np.exp(z).sum(0))  # energy, T = 1


@pytest.mark.parametrize("region_based", [False, True])
@pytest.mark.parametrize("method", LOGIT_METHODS)
def test_each_score_matches_numpy(method, region_based):
    logits = np.random.default_rng(0).normal(0, 3, size=(3, 5, 6, 7))
    got = REGISTRY[method].voxel_map(torch.from_numpy(logits), region_based, [{"temperature": 2.5}]).numpy()
    np.testing.assert_allclose(got, numpy_reference(method, logits, region_based, 2.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("region_based", [False, True])
def test_fitted_temperature_lowers_the_nll(region_based):
    rng = np.random.default_rng(1)
    n, c = 4000, 3
    targets = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), targets] += 1.5
    logits *= 4.0  # overconfident: the right temperature is well above 1
    if region_based:
        masks = np.eye(c, dtype=bool)[targets]
        t, nll_1, nll_t = fit_temperature(torch.from_numpy(logits), torch.from_numpy(masks), True)
        z = logits / t
        reference = np.mean(np.logaddexp(0, z) - masks * z)  # binary cross-entropy with logits
    else:
        t, nll_1, nll_t = fit_temperature(torch.from_numpy(logits), torch.from_numpy(targets), False)
        z = logits / t
        log_p = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
        reference = -np.mean(log_p[np.arange(n), targets])
    assert t > 1.5 and nll_t < nll_1
    assert nll_t == pytest.approx(reference, rel=1e-9)
    # a minimum: nudging the temperature either way does not lower the NLL
    for factor in (0.9, 1.1):
        other = negative_log_likelihood(
            torch.from_numpy(logits), torch.from_numpy(masks if region_based else targets), region_based, t * factor)
        assert other >= nll_t - 1e-9


@pytest.fixture(scope="module")
def predicted_case(preprocessed_case):
    predictor, data = preprocessed_case(list(LOGIT_METHODS), "shift_mild")
    logits = predictor.predict_logits_from_preprocessed_data(data)
    return predictor, data, logits.numpy(), predictor.ood_results[-1]


def test_predictor_maps_equal_numpy_on_its_logits(predicted_case, tiny_project):
    predictor, _, logits, result = predicted_case
    manifest = json.loads((tiny_project.model(OOD_TRAINER) / "fold_0" / "ood" / "ood_state.json").read_text())
    t = manifest["methods"]["temperature"]["config"]["temperature"]
    assert t == pytest.approx(Temperature.temperature([s.method_params["temperature"] for s in predictor.ood_states]))
    for method in LOGIT_METHODS:
        expected = numpy_reference(method, logits, region_based=False, t=t)
        got = result.maps[method]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert result.scores[method]["score"] == pytest.approx(expected.mean(), rel=1e-4, abs=1e-7)
    provenance = manifest["provenance"]["temperature"]
    assert provenance["val_nll"] <= provenance["val_nll_at_1"]


def test_output_scores_add_no_forward_pass(predicted_case, tiny_project):
    predictor, data, _, _ = predicted_case
    stock = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    stock.initialize_from_trained_model_folder(str(tiny_project.model(OOD_TRAINER)), [0])
    counts = {}
    for name, p in (("stock", stock), ("ood", predictor)):
        counts[name] = 0

        def count(module, inputs, output, name=name):
            counts[name] += 1

        handle = p.network.register_forward_hook(count)
        try:
            p.predict_logits_from_preprocessed_data(data)
        finally:
            handle.remove()
    assert counts["ood"] == counts["stock"] > 0
