"""A fold's OOD state on disk: round trip of every kind of method, and refusal of anything malformed.

No nnU-Net pipeline: the state is built from detectors fitted on random features, a small autoencoder and
hand-set parameters, then written and read back by nnunet_ood.fold_state.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from nnunet_ood.calibration import MethodCalibration
from nnunet_ood.detectors import KNNDetector, LatentMahalanobisDetector, MahalanobisDetector
from nnunet_ood.errors import OODStateError
from nnunet_ood.fold_state import (
    MANIFEST_NAME,
    FoldOODState,
    check_fingerprint,
    fold_ood_dir,
    load_fold_state,
    save_fold_state,
)
from nnunet_ood.methods.sd.autoencoder import BottleneckAutoencoder

FINGERPRINT = {"dataset_name": "Dataset1_X", "plans_name": "nnUNetPlans", "configuration": "2d", "fold": "0",
               "network_class": "PlainConvUNet", "architecture_sha256": "a" * 64, "patch_size": [16, 16],
               "num_input_channels": 1, "num_segmentation_heads": 3, "checkpoint": "checkpoint_final.pth",
               "weights_sha256": "b" * 64}


@pytest.fixture()
def state() -> FoldOODState:
    rng = np.random.default_rng(0)
    features, latents = rng.normal(size=(50, 6)), rng.normal(size=(50, 4))
    torch.manual_seed(0)
    calibration = {m: MethodCalibration(0.1 * i, 1.0 + i, 0.5 + i, 40, 10) for i, m in enumerate(
        ["mahalanobis", "knn", "sd", "latent_mahalanobis", "entropy", "temperature", "mc_dropout"])}
    calibration["entropy"].aggregation = "foreground_mean"
    calibration["temperature"] = MethodCalibration(0.01, 0.2, 0.1, 40, 10)  # 1 - a probability: in [0, 1]
    return FoldOODState(
        detectors={"mahalanobis": MahalanobisDetector().fit(features), "knn": KNNDetector(k=2).fit(features),
                   "latent_mahalanobis": LatentMahalanobisDetector().fit(latents)},
        shared={"sd_autoencoder": BottleneckAutoencoder(8, (4, 4), latent_dim=4)},
        method_params={"temperature": {"temperature": 1.7, "val_nll": 0.2},
                       "mc_dropout": {"rate": 0.2, "passes": 3, "stages": [0], "seed": 1}},
        fingerprint=dict(FINGERPRINT), calibration=calibration, provenance={"seed": 0, "sd_training": {"epochs": 2}})


def test_round_trip_of_every_kind(tmp_path, state):
    save_fold_state(str(tmp_path), state)
    loaded = load_fold_state(str(tmp_path), FINGERPRINT)
    assert loaded.methods == state.methods and loaded.calibration == state.calibration
    assert loaded.method_params == state.method_params and loaded.provenance == state.provenance
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(7, 6)))
    for name in ("mahalanobis", "knn"):
        torch.testing.assert_close(loaded.detectors[name].score(x), state.detectors[name].score(x))
    z = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(loaded.shared["sd_autoencoder"](z)[0], state.shared["sd_autoencoder"](z)[0])
    manifest = json.loads((tmp_path / "ood" / MANIFEST_NAME).read_text())
    assert manifest["methods"]["sd"]["file"] == "sd_autoencoder.safetensors"
    assert manifest["methods"]["entropy"] == {"file": None, "class": "OutputScore", "config": {},
                                              "calibration": state.calibration["entropy"].to_json()}
    # a subset loads only what it needs: no shared model without the methods that require it
    subset = load_fold_state(str(tmp_path), FINGERPRINT, ["knn", "temperature"])
    assert subset.methods == ["knn", "temperature"] and subset.shared == {} and list(subset.detectors) == ["knn"]


def test_save_replaces_atomically_and_cleans_stale_temporaries(tmp_path, state):
    stale = tmp_path / "ood.tmp-99999"
    (stale / "junk").mkdir(parents=True)
    save_fold_state(str(tmp_path), state)
    save_fold_state(str(tmp_path), state)
    assert sorted(os.listdir(tmp_path)) == ["ood"]


def test_tensor_files_hold_views_shared_memory_and_scalars_and_failed_writes_leave_nothing(tmp_path):
    from safetensors.torch import load_file

    from nnunet_ood.io.atomic import atomic_save_tensors

    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    tensors = {"full": base, "same": base, "row_view": base[1], "transposed": base.T, "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3)}
    path = tmp_path / "x.safetensors"
    atomic_save_tensors(path, tensors, {"note": "n"})
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor), key
    assert os.listdir(tmp_path) == ["x.safetensors"]
    with pytest.raises(TypeError):  # fails inside the write: the temporary file is removed
        atomic_save_tensors(tmp_path / "y.safetensors", {"a": base}, {"not a string": 1})
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_missing_methods_and_other_models_are_refused(tmp_path, state):
    save_fold_state(str(tmp_path), state)
    with pytest.raises(OODStateError, match=r"method\(s\) energy not fitted .* --ood energy"):
        load_fold_state(str(tmp_path), FINGERPRINT, ["energy"])
    other = dict(FINGERPRINT, weights_sha256="c" * 64)
    with pytest.raises(OODStateError, match="network weights differs"):
        load_fold_state(str(tmp_path), other)
    with pytest.raises(OODStateError, match=r"fold differs \('1' there, '0' here\)"):
        check_fingerprint(dict(FINGERPRINT, fold="1"), FINGERPRINT, "there")


def _edit(tmp_path, change) -> None:
    path = tmp_path / "ood" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.update(fingerprint=["not", "an", "object"]), "'fingerprint' is not a JSON object"),
    (lambda m: m["fingerprint"].update(weights_sha256=5), "weights_sha256"),
    (lambda m: m.update(methods=[]), "'methods' is not a JSON object"),
    (lambda m: m.update(methods={}), "lists no methods"),
    (lambda m: m["methods"].update(knn="a string"), "the entry of knn"),
    (lambda m: m["methods"]["knn"].update(file="../../etc/passwd"), "plain file name"),
    (lambda m: m["methods"]["knn"]["calibration"].update(low="zero"), "low = 'zero'"),
    (lambda m: m["methods"]["mahalanobis"]["calibration"].update(threshold=None), "threshold = None"),
    (lambda m: m["methods"]["entropy"]["calibration"].update(aggregation="median"), "aggregation"),
    (lambda m: m["methods"]["temperature"]["config"].update(temperature="hot"), "temperature"),
    (lambda m: m["methods"]["mc_dropout"]["config"].update(rate=3), "mc_dropout"),
    (lambda m: m["methods"].update(mystery=m["methods"]["entropy"]), "unknown method 'mystery'"),
    (lambda m: m.update(format_version=7), "format version 7"),
    (lambda m: m.pop("provenance"), "no 'provenance'"),
])
def test_malformed_manifest_gives_one_line_errors(tmp_path, state, change, needle):
    save_fold_state(str(tmp_path), state)
    _edit(tmp_path, change)
    with pytest.raises(OODStateError) as info:
        load_fold_state(str(tmp_path), FINGERPRINT)
    message = str(info.value)
    assert needle in message and "\n" not in message and "nnUNetv2_fit_ood" in message, message


def test_missing_state_names_the_fit_command(tmp_path):
    with pytest.raises(OODStateError, match="no fitted OOD state .* nnUNetv2_fit_ood"):
        load_fold_state(str(tmp_path), FINGERPRINT)
    assert fold_ood_dir("x") == os.path.join("x", "ood")


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
@pytest.mark.parametrize("old_format", [None, 1])
def test_states_pooled_in_floor_mode_are_refused_with_the_refit_command(tmp_path, state, method, old_format):
    """States written before the feature format was recorded (or with format 1) pooled in floor mode."""
    def downgrade(manifest):
        if old_format is None:
            manifest["methods"][method].pop("feature_format")
        else:
            manifest["methods"][method]["feature_format"] = old_format

    save_fold_state(str(tmp_path), state)
    manifest = json.loads((tmp_path / "ood" / MANIFEST_NAME).read_text())
    assert manifest["methods"][method]["feature_format"] == 2
    _edit(tmp_path, downgrade)
    with pytest.raises(OODStateError) as info:
        load_fold_state(str(tmp_path), FINGERPRINT, [method])
    message = str(info.value)
    assert "format 1" in message and message.endswith(f"--ood {method}") and "nnUNetv2_fit_ood -d" in message
    assert "\n" not in message
    kept = load_fold_state(str(tmp_path), FINGERPRINT, ["entropy", "latent_mahalanobis"])  # other methods still load
    assert kept.methods == ["entropy", "latent_mahalanobis"]
