"""Segmentation Distortion end to end on the tiny project: fitted by nnUNetTrainerOOD, scored by the predictor.

References: two complete forward passes of the network per patch (without the AE, and with r(x) put in
place of the bottleneck by a plain forward hook on the last encoder stage), Gaussian-weighted in numpy.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from nnunet_ood.cli import predict as predict_entry
from nnunet_ood.inference.predictor import nnUNetOODPredictor
from nnunet_ood.methods import DEFAULT_FIT_METHODS
from nnunet_ood.methods.sd.autoencoder import BottleneckAutoencoder

OOD_TRAINER = "nnUNetTrainerOOD_smoke"


@pytest.fixture(scope="module")
def scored_case(preprocessed_case):
    predictor, data = preprocessed_case(None, "shift_strong")
    predictor.predict_logits_from_preprocessed_data(data)
    return predictor, data, predictor.ood_results[-1]


def brute_force_maps(predictor: nnUNetOODPredictor, data: torch.Tensor, state=None) -> dict[str, np.ndarray]:
    """SD and latent-Mahalanobis maps from complete forward passes, patch by patch, accumulated in numpy; also
    ``logits`` and ``logits_ae``, the Gaussian-weighted logits of the case without and with the AE."""
    net, state = predictor.network, state or predictor.ood_states[0]
    ae = state.shared["sd_autoencoder"]
    patch = tuple(predictor.configuration_manager.patch_size)
    padded, revert = pad_nd_image(data.numpy(), patch, "constant", {"value": 0}, True, None)
    slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
    weights = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    weights = weights.double().numpy()
    numerator = {m: np.zeros(padded.shape[1:]) for m in ("sd", "latent_mahalanobis")}
    heads = predictor.label_manager.num_segmentation_heads
    numerator.update({m: np.zeros((heads, *padded.shape[1:])) for m in ("logits", "logits_ae")})
    denominator = np.zeros(padded.shape[1:])
    captured = {}

    def replace_bottleneck(module, inputs, output):
        captured["z"] = ae.encode(output)
        return ae(output)[0]

    stage = net.encoder.stages[-1]
    for sl in slicers:
        x = torch.from_numpy(padded[sl][None])
        with torch.no_grad():
            logits = net(x).double()
            handle = stage.register_forward_hook(replace_bottleneck)
            try:
                logits_ae = net(x).double()
            finally:
                handle.remove()
        p, q = torch.softmax(logits, 1).numpy(), torch.softmax(logits_ae, 1).numpy()
        sd = ((p - q) ** 2).mean(axis=1)[0]
        lm = float(state.detectors["latent_mahalanobis"].score(captured["z"])[0])
        region = sl[1:]
        numerator["sd"][region] += sd * weights
        numerator["latent_mahalanobis"][region] += lm * weights
        numerator["logits"][(slice(None), *region)] += logits[0].numpy() * weights
        numerator["logits_ae"][(slice(None), *region)] += logits_ae[0].numpy() * weights
        denominator[region] += weights
    crop = tuple(revert[1:])
    return {m: (num / denominator)[(..., *crop)] for m, num in numerator.items()}


def foreground_dice(a: np.ndarray, b: np.ndarray, n_classes: int) -> float:
    """Mean Dice over the foreground classes of two label maps (both empty: 1)."""
    values = []
    for c in range(1, n_classes):
        x, y = a == c, b == c
        total = x.sum() + y.sum()
        values.append(1.0 if total == 0 else 2 * (x & y).sum() / total)
    return float(np.mean(values))


def test_trainer_stores_autoencoder_and_reports_agreement(tiny_project):
    ood_dir = tiny_project.model(OOD_TRAINER) / "fold_0" / "ood"
    manifest = json.loads((ood_dir / "ood_state.json").read_text())
    assert list(manifest["methods"]) == list(DEFAULT_FIT_METHODS)
    assert manifest["methods"]["sd"]["file"] == "sd_autoencoder.safetensors"
    assert (ood_dir / "latent_mahalanobis.safetensors").is_file()
    dice = manifest["provenance"]["sd_val_dice_with_without_ae"]
    assert len(dice) == manifest["provenance"]["n_val_cases"] and all(0 <= d <= 1 for d in dice.values())
    history = manifest["provenance"]["sd_training"]
    faithful = [loss for loss, d in zip(history["val_loss"], history["val_dice_with_without_ae"]) if d >= 0.99]
    if faithful:  # the stopping rule: the lowest loss among epochs that keep the segmentations
        assert history["best_val_loss"] == min(faithful) and history["best_val_dice"] >= 0.99
    else:
        assert history["best_val_dice"] == max(history["val_dice_with_without_ae"])


def test_agreement_report_equals_whole_cases_segmented_with_and_without_the_ae(tiny_project):
    """The fit records the Dice with and without the AE during its validation pass (no pass of its own): it must
    equal the Dice of the validation cases assembled by hand from complete forward passes with and without r(x)."""
    from nnunet_ood.fitting import FitOptions
    from nnunet_ood.fitting.pipeline import _fit_context
    from nnunet_ood.fold_state import load_fold_state

    model = tiny_project.model(OOD_TRAINER)
    recorded = json.loads((model / "fold_0" / "ood" / "ood_state.json").read_text())["provenance"]
    recorded = recorded["sd_val_dice_with_without_ae"]
    context = _fit_context(str(model), 0, FitOptions(progress=False))
    state = load_fold_state(str(model / "fold_0"), None, ["sd", "latent_mahalanobis"], device="cpu")
    n_classes = context.label_manager.num_segmentation_heads
    assert sorted(recorded) == sorted(context.val_keys)
    for key in context.val_keys:
        assembled = brute_force_maps(context.predictor, context.load_case(key), state)
        expected = foreground_dice(assembled["logits"].argmax(0), assembled["logits_ae"].argmax(0), n_classes)
        assert recorded[key] == pytest.approx(expected, abs=1e-6)
    assert min(recorded.values()) < 1  # the smoke AE changes some voxels: the check sees a difference


def test_sd_and_latent_mahalanobis_equal_brute_force(scored_case):
    predictor, data, result = scored_case
    expected = brute_force_maps(predictor, data)
    for method in ("sd", "latent_mahalanobis"):
        got = result.maps[method]
        np.testing.assert_allclose(got, expected[method], rtol=1e-4, atol=1e-9)
        assert result.scores[method]["score"] == pytest.approx(expected[method].mean(), rel=1e-4)
    assert result.scores["sd"]["score"] > 0


def test_autoencoder_of_another_shape_is_refused(tiny_project, test_images, tmp_path, fails_with, predict_argv):
    model = tiny_project.model("nnUNetTrainerOOD_10epochs")
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(tiny_project.model(OOD_TRAINER), model)
    try:
        ood = model / "fold_0" / "ood"
        BottleneckAutoencoder(7, (3, 3), latent_dim=16).save(ood)  # replaces the fitted one
        out = tmp_path / "out"
        fails_with(predict_entry.main, predict_argv(test_images, out, "nnUNetTrainerOOD_10epochs"),
                   "SD autoencoder of fold 0 expects bottlenecks of shape (7, 3, 3)", "nnUNetv2_fit_ood --ood sd")
        assert not out.exists()
        # without the AE methods the same state still serves mahalanobis
        predict_entry.main(predict_argv(test_images, out, "nnUNetTrainerOOD_10epochs", "--ood", "mahalanobis"))
        assert (out / "ood_scores.csv").is_file()
    finally:
        shutil.rmtree(model, ignore_errors=True)
