"""The fit's passes and bookkeeping: cross-fitted calibration, the fold split, keeping what is not re-fitted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnunet_ood.calibration import MethodCalibration
from nnunet_ood.detectors import MahalanobisDetector
from nnunet_ood.detectors.cross_fitting import assign_parts
from nnunet_ood.fitting.options import FitOptions
from nnunet_ood.fitting.split import fold_split
from nnunet_ood.io.state import FoldOODState
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


def test_calibration_pass_cross_fits_the_training_cases(tiny_project):
    """Each training case is scored by a detector fitted from scratch on the other parts' cases."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_ood.aggregation import importance_weights, patch_scores_to_maps
    from nnunet_ood.fitting.passes import EncoderPass, FitContext, calibration_pass, feature_statistics_pass
    from nnunet_ood.fitting.pipeline import _fold_predictor
    from nnunet_ood.fitting.split import preprocessed_folders
    from nnunet_ood.methods.features import Mahalanobis
    from nnunet_ood.sliding_window import pad_and_layout

    options = FitOptions(methods=("mahalanobis",), calibration_parts=3, progress=False)
    predictor = _fold_predictor(str(tiny_project.model("nnUNetTrainer_1epoch")), 0, options)
    base, folder = preprocessed_folders(predictor.plans_manager.dataset_name,
                                        predictor.configuration_manager.data_identifier)
    dataset_class = infer_dataset_class(folder)
    train, val = fold_split(base, dataset_class.get_identifiers(folder), 0)
    context = FitContext(predictor, options, 0, dataset_class, folder, list(train), list(val))
    parts = assign_parts(train, 3, options.seed)
    encoder = EncoderPass(context)
    method = Mahalanobis()
    try:
        part_detectors, n_patches = feature_statistics_pass(context, encoder, [method], FoldModels(), parts, 3)
        from nnunet_ood.detectors.cross_fitting import merge_parts

        models = FoldModels(detectors={"mahalanobis": merge_parts(part_detectors["mahalanobis"],
                                                                  MahalanobisDetector())})
        scores = calibration_pass(context, encoder, [method], models, part_detectors, parts, 3, {})
        features = {k: torch.cat([method.features(b, models) for b in encoder.bottlenecks(context.load_case(k))[1]])
                    for k in [*train, *val]}
    finally:
        encoder.remove()
    assert n_patches == sum(f.shape[0] for k, f in features.items() if k in train)

    def case_score(detector, key):
        _, layout = pad_and_layout(predictor, context.load_case(key))
        maps = patch_scores_to_maps(detector.score(features[key])[:, None], layout,
                                    importance_weights(layout.patch_size, True, torch.device("cpu")))
        return float(maps.double().mean())

    everything = MahalanobisDetector().fit(torch.cat([features[k] for k in train]))
    for key in val:
        assert scores[key]["mahalanobis"] == pytest.approx(case_score(everything, key), rel=1e-6)
    for part in range(3):
        held_out = MahalanobisDetector().fit(torch.cat([features[k] for k in train if parts[k] != part]))
        for key in (k for k in train if parts[k] == part):
            assert scores[key]["mahalanobis"] == pytest.approx(case_score(held_out, key), rel=1e-6)


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
