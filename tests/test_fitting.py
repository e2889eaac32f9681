"""The fit's passes and bookkeeping: cross-fitted calibration, the fold split, keeping what is not re-fitted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnunet_ood.calibration import MethodCalibration
from nnunet_ood.detectors import MahalanobisDetector
from nnunet_ood.detectors.cross_fitting import assign_parts
from nnunet_ood.fitting.split import fold_split
from nnunet_ood.fold_state import FoldOODState
from nnunet_ood.methods import REGISTRY, FoldModels


def test_fold_split_follows_the_splits_file_and_nnunets_fallback(tmp_path):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    keys = [f"case_{i:02d}" for i in range(10)]
    expected = generate_crossval_split(keys, seed=12345, n_splits=5)
    assert fold_split(str(tmp_path), keys, 2) == (expected[2]["train"], expected[2]["val"])
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": keys[:7], "val": keys[7:]}]))
    assert fold_split(str(tmp_path), keys, 0) == (keys[:7], keys[7:])
    train, val = fold_split(str(tmp_path), keys, 3)  # beyond the file: nnU-Net's seeded 80:20 split
    assert len(train) == 8 and sorted(train + val) == keys
    assert fold_split(str(tmp_path), keys, "all") == (keys, keys)


def test_training_cases_are_cross_fitted(fit_context):
    """Each kept training case is scored by a detector fitted from scratch on the other parts' cases."""
    from nnunet_ood.aggregation import importance_weights, patch_scores_to_maps
    from nnunet_ood.detectors.cross_fitting import merge_parts
    from nnunet_ood.fitting.passes import EncoderPass, feature_statistics_pass, training_case_scores
    from nnunet_ood.methods.features import Mahalanobis
    from nnunet_ood.sliding_window import pad_and_layout

    context = fit_context(calibration_parts=3)
    train, val = context.train_keys, context.val_keys
    parts = assign_parts(train, 3, 0)
    kept = set(train[::2])  # half of the training cases are scored for the normalisation
    encoder, method = EncoderPass(context), Mahalanobis()
    try:
        stats = feature_statistics_pass(context, encoder, [method], FoldModels(), parts, 3, kept)
        features = {k: torch.cat([method.features(b, FoldModels())
                                  for b in encoder.bottlenecks(context.load_case(k))[1]]) for k in [*train, *val]}
    finally:
        encoder.remove()
    assert stats.n_patches == stats.n_total_patches == sum(features[k].shape[0] for k in train)
    assert set(stats.kept_features) == kept
    models = FoldModels(detectors={"mahalanobis": merge_parts(stats.part_detectors["mahalanobis"],
                                                              MahalanobisDetector())})
    scores = training_case_scores(context, [method], models, stats, parts, 3, {})
    assert set(scores) == kept

    def case_score(detector, key):
        _, layout = pad_and_layout(context.predictor, context.load_case(key))
        maps = patch_scores_to_maps(detector.score(features[key])[:, None], layout,
                                    importance_weights(layout.patch_size, True, torch.device("cpu")))
        return float(maps.double().mean())

    for part in range(3):
        held_out = MahalanobisDetector().fit(torch.cat([features[k] for k in train if parts[k] != part]))
        for key in (k for k in kept if parts[k] == part):
            assert scores[key]["mahalanobis"] == pytest.approx(case_score(held_out, key), rel=1e-6)
    everything = MahalanobisDetector().fit(torch.cat([features[k] for k in train]))
    torch.testing.assert_close(models.detectors["mahalanobis"].score(features[val[0]]),
                               everything.score(features[val[0]]), rtol=1e-6, atol=0)


def test_patch_sample_is_bounded_uniform_and_repeatable(fit_context):
    from nnunet_ood.fitting.passes import EncoderPass, patch_sample
    from nnunet_ood.sliding_window import pad_and_layout

    context = fit_context(max_patches=50)
    encoder = EncoderPass(context)
    try:
        sample, total = patch_sample(context, encoder, context.train_keys)
        again, _ = patch_sample(context, encoder, context.train_keys)
        counts = {k: pad_and_layout(context.predictor, context.load_case(k))[1].num_patches for k in context.train_keys}
    finally:
        encoder.remove()
    assert total == sum(counts.values()) > 50
    assert sum(len(v) for v in sample.values()) == 50
    assert all(np.array_equal(sample[k], again[k]) for k in sample)  # seeded
    assert all(len(set(v.tolist())) == len(v) and (v < counts[k]).all() for k, v in sample.items())


def test_validation_pass_scores_as_inference_does(fit_context, tiny_project):
    """The fit's validation pass and a prediction with the stored state give the same case scores."""
    from nnunet_ood.inference.predictor import nnUNetOODPredictor

    model = tiny_project.model("nnUNetTrainerOOD_smoke")
    state = json.loads((model / "fold_0" / "ood" / "ood_state.json").read_text())
    context = fit_context()
    predictor = nnUNetOODPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), [0])
    for key in context.val_keys[:2]:
        predictor.predict_logits_from_preprocessed_data(context.load_case(key))
        result = predictor.ood_results[-1]
        for method, values in state["provenance"]["val_case_scores"].items():
            assert result.scores[method]["score"] == pytest.approx(values[key], rel=1e-5, abs=1e-9), method


def test_partial_refit_keeps_what_is_not_refitted_exactly():
    from nnunet_ood.fitting.pipeline import _merge_kept

    calibration = {m: MethodCalibration(0.0, 1.0, 0.5) for m in ("mahalanobis", "temperature", "entropy")}
    kept = FoldOODState(method_params={"temperature": {"temperature": 1.3}}, fingerprint={"fold": "0"},
                        calibration={m: calibration[m] for m in ("temperature", "entropy")},
                        provenance={"temperature": {"temperature": 1.3}, "seed": 1,
                                    "train_case_scores": {"temperature": {"a": 0.1}, "entropy": {"a": 0.2},
                                                          "mahalanobis": {"a": 9.0}},
                                    "feature_dim": {"mahalanobis": 3}})
    new = FoldOODState(detectors={"mahalanobis": MahalanobisDetector().fit(np.eye(3))}, fingerprint={"fold": "0"},
                       calibration={"mahalanobis": MethodCalibration(2.0, 3.0, 2.5)},
                       provenance={"seed": 2, "train_case_scores": {"mahalanobis": {"a": 7.0}},
                                   "feature_dim": {"mahalanobis": 3}})
    merged = _merge_kept(new, kept)
    assert merged.methods == [m.name for m in REGISTRY if m.name in ("mahalanobis", "temperature", "entropy")]
    assert merged.method_params == {"temperature": {"temperature": 1.3}}
    assert merged.provenance["temperature"] == {"temperature": 1.3} and merged.provenance["seed"] == 2
    assert merged.provenance["train_case_scores"] == {"temperature": {"a": 0.1}, "entropy": {"a": 0.2},
                                                      "mahalanobis": {"a": 7.0}}
    assert merged.calibration["mahalanobis"].low == 2.0 and merged.calibration["entropy"] == calibration["entropy"]
