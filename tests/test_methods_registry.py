"""The registry of methods: derived lists and flags, the checks users see, and light command-line imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nnunet_ood.cli import fit as fit_cli
from nnunet_ood.cli import predict as predict_cli
from nnunet_ood.errors import OODInputError, OODStateError
from nnunet_ood.fitting.options import FitOptions
from nnunet_ood.methods import (
    DEFAULT_FIT_METHODS,
    FITTABLE_METHODS,
    REGISTRY,
    LogitMethod,
    MethodKind,
    MethodRegistry,
    resolve_fit_methods,
)
from nnunet_ood.methods.features import KNNConfig
from nnunet_ood.methods.mc_dropout import MCDropoutConfig
from nnunet_ood.methods.options import flag_fields
from nnunet_ood.methods.sd import SDPredictConfig, SDTrainingConfig


def test_lists_are_derived_from_the_method_objects():
    assert FITTABLE_METHODS == ("mahalanobis", "knn", "sd", "latent_mahalanobis", "max_softmax", "entropy", "energy",
                                "kl_uniform", "temperature", "tta", "tta_dice", "mc_dropout", "quality")
    assert DEFAULT_FIT_METHODS == tuple(m for m in FITTABLE_METHODS if m not in ("tta_dice", "mc_dropout"))
    assert [m.name for m in REGISTRY if m.kind is MethodKind.FOLD_ENSEMBLE] == \
        ["ensemble_entropy", "ensemble_mi", "pairwise_dice"]
    assert all(m.summary and m.kind in MethodKind for m in REGISTRY)
    with pytest.raises(ValueError, match="two methods"):
        MethodRegistry([REGISTRY["entropy"], REGISTRY["entropy"]])


def test_fit_resolution_adds_partners_and_names_the_known_methods():
    assert resolve_fit_methods(["latent_mahalanobis", "entropy"]) == ["sd", "latent_mahalanobis", "entropy"]
    assert resolve_fit_methods(["tta", "mahalanobis", "tta"]) == ["mahalanobis", "tta"]
    with pytest.raises(OODInputError, match="unknown OOD method.*ensemble_mi.*choose from mahalanobis"):
        resolve_fit_methods(["ensemble_mi"])


def test_prediction_checks_give_todays_messages():
    with pytest.raises(OODInputError, match="unknown OOD method 'foo'; the known methods are mahalanobis"):
        REGISTRY.check_requested(["foo"], 1, True)
    with pytest.raises(OODStateError, match="compare the members of a fold ensemble; predict with several folds"):
        REGISTRY.check_requested(["ensemble_entropy", "entropy"], 1, True)
    with pytest.raises(OODStateError, match="tta measures the disagreement of nnU-Net's mirrored passes"):
        REGISTRY.check_requested(["tta"], 1, False)
    with pytest.raises(OODStateError, match="tta, tta_dice measure the disagreement of nnU-Net's mirrored passes"):
        REGISTRY.check_requested(["tta", "tta_dice"], 1, False)
    assert REGISTRY.check_requested(None, 1, False) is None
    assert REGISTRY.check_requested(["pairwise_dice", "knn"], 2, True) == ["knn"]
    methods, notes = REGISTRY.methods_in_use(None, ["mahalanobis", "tta"], 1, False)
    assert [m.name for m in methods] == ["mahalanobis"] and notes == [
        "note: mirroring is off, so the tta score is not computed"]
    methods, _ = REGISTRY.methods_in_use(None, ["entropy", "mahalanobis"], 3, True)
    assert [m.name for m in methods] == ["entropy", "mahalanobis", "ensemble_entropy", "ensemble_mi", "pairwise_dice"]
    methods, _ = REGISTRY.methods_in_use(["ensemble_mi", "entropy"], ["entropy"], 2, True)
    assert [m.name for m in methods] == ["entropy", "ensemble_mi"]


def test_every_option_field_is_a_flag_of_its_command():
    fit_flags = set(fit_cli.build_parser()._option_string_actions)
    for config in (SDTrainingConfig, KNNConfig, MCDropoutConfig):
        for field in flag_fields(config):
            assert field.metadata["flag"] in fit_flags
    assert {"--sd_latent", "--sd_channels", "--sd_lr", "--sd_batch_size", "--sd_iterations", "--sd_max_epochs",
            "--sd_patience", "--sd_val_batches", "--knn_k", "--knn_bank", "--mc_dropout_rate", "--mc_dropout_passes",
            "--mc_dropout_stages"} <= fit_flags
    assert "--sd_batched_decoder" in predict_cli.build_parser()._option_string_actions
    args = fit_cli.build_parser().parse_args(["-d", "1", "-c", "2d", "--sd_latent", "8", "--knn_k", "3",
                                              "--mc_dropout_stages", "0", "2", "--seed", "4", "--ood", "knn", "sd"])
    options = FitOptions.from_args(args)
    assert options.methods == ("knn", "sd", "latent_mahalanobis")
    assert options.config(SDTrainingConfig).latent_dim == 8 and options.config(KNNConfig).k == 3
    assert options.config(MCDropoutConfig) == MCDropoutConfig(stages=(0, 2), seed=4)
    predict_args = predict_cli.build_parser().parse_args(["-i", "x", "-o", "y", "-d", "1", "-c", "2d",
                                                          "--sd_batched_decoder"])
    assert REGISTRY.configs_from_args(predict_args, "predict") == {"sd_predict": SDPredictConfig(True)}


def test_fit_options_are_checked():
    with pytest.raises(OODInputError, match="cannot aggregate"):
        FitOptions(methods=("entropy",), aggregations={"knn": "mean"})
    with pytest.raises(OODInputError, match="cannot aggregate"):
        FitOptions(aggregations={"entropy": "median"})
    with pytest.raises(OODInputError, match="--calibration_parts"):
        FitOptions(calibration_parts=0)
    with pytest.raises(OODInputError, match=r"method_configs\['sd'\] must be a SDTrainingConfig"):
        FitOptions(method_configs={"sd": KNNConfig()})
    with pytest.raises(OODInputError, match="--knn_k must be at least 1"):
        KNNConfig(k=0)


def test_command_lines_parse_before_importing_torch():
    """Argument errors appear before torch and nnU-Net are imported; the trainer folder needs neither."""
    code = (
        "import sys\n"
        "from nnunet_ood.cli import fit, predict, trainer_dir\n"
        "for main, argv in ((fit.main, ['-d', '1', '-c', '2d', '--knn_k', '0']),\n"
        "                   (fit.main, ['-d', '1', '-c', '2d', '--seed', '-1']),\n"
        "                   (predict.main, ['-i', 'x', '-o', 'y', '-d', '1', '-c', '2d', '-step_size', '0']),\n"
        "                   (predict.main, ['-i', 'x', '-o', 'y', '-d', '1', '-c', '2d', '--ood', 'foo'])):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 2\n"
        "trainer_dir.main([])\n"
        "print('heavy:', sorted(m for m in ('torch', 'nnunetv2.inference') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("heavy: []"), proc.stdout
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 4 and all(e.startswith("error: ") for e in errors), errors
    assert "--knn_k" in errors[0] and "--seed" in errors[1] and "-step_size" in errors[2]
    assert "unknown OOD method 'foo'" in errors[3]
    assert proc.stdout.splitlines()[0].endswith("trainers/ext")


class Margin(LogitMethod):
    """What a newcomer writes for a new logit-based score (docs/architecture.md): 1 - (p_max - p_second)."""

    name = "margin"
    summary = "1 - (largest minus second largest class probability), per voxel"

    def voxel_map(self, logits, region_based, fold_params):
        top2 = logits.float().softmax(dim=0).topk(2, dim=0).values
        return 1 - (top2[0] - top2[1])


def test_a_new_logit_method_is_one_class_and_one_registry_entry():
    import numpy as np
    import torch
    from scipy.special import softmax

    from nnunet_ood.inference.case_scorer import CaseScorer
    from nnunet_ood.methods import FoldModels

    registry = MethodRegistry([*REGISTRY, Margin()])
    assert "margin" in registry and registry.resolve_fit(["margin"])[0].name == "margin"
    logits = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 6, 5)))
    scorer = CaseScorer([registry["margin"]], [FoldModels()], {}, region_based=False, patch_size=(6, 5),
                        use_gaussian=True, map_device=torch.device("cpu"))
    scorer.begin_case(logits)
    scorer.begin_fold((6, 5), [(slice(None), slice(0, 6), slice(0, 5))], (slice(0, 6), slice(0, 5)),
                      torch.device("cpu"))
    scorer.finish_window()
    scorer.end_fold(logits)
    outcome = scorer.finish_case(logits)
    p = np.sort(softmax(logits.numpy(), axis=0), axis=0)
    expected = 1 - (p[-1] - p[-2])
    np.testing.assert_allclose(outcome.maps["margin"].numpy(), expected, rtol=1e-5)
    assert outcome.scores["margin"] == pytest.approx(expected.mean(), rel=1e-5)
