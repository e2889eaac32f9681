"""The seeded smoke pipeline repeats bit for bit: train, fit and predict twice, compare everything.

Seeds alone did not make CPU runs repeat across machines: oneDNN's convolutions sum in another order with
another thread count or instruction set, so the seeded trainers also pin both (``pin_cpu_numerics``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

OOD_TRAINER = "nnUNetTrainerOOD_smoke"


def _model_fold(results: Path, dataset_name: str) -> Path:
    return results / dataset_name / f"{OOD_TRAINER}__nnUNetPlans__2d" / "fold_0"


def test_seeded_smoke_pipeline_twice_gives_identical_models_and_score_tables(tiny_project, test_images, tmp_path,
                                                                              run_command):
    again = dict(tiny_project.env, nnUNet_results=str(tmp_path / "results"))
    run_command(["nnUNetv2_train", "501", "2d", "0", "-tr", OOD_TRAINER, "-device", "cpu"], again)
    first = _model_fold(Path(tiny_project.env["nnUNet_results"]), tiny_project.dataset.name)
    second = _model_fold(tmp_path / "results", tiny_project.dataset.name)

    weights = [torch.load(f / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
               for f in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    state_files = sorted(p.name for p in (first / "ood").glob("*.safetensors"))
    assert state_files == sorted(p.name for p in (second / "ood").glob("*.safetensors")) and state_files
    for name in state_files:
        a, b = load_file(first / "ood" / name), load_file(second / "ood" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    tables = []
    for env, out in ((tiny_project.env, tmp_path / "pred_first"), (again, tmp_path / "pred_second")):
        run_command(["nnUNetv2_predict_ood", "-i", str(test_images), "-o", str(out), "-d", "501", "-c", "2d",
                     "-f", "0", "-tr", OOD_TRAINER, "-device", "cpu", "-npp", "0", "-nps", "0",
                     "--disable_progress_bar"], env)
        tables.append((out / "ood_scores.csv").read_text().splitlines())
    methods = {line.split(",")[1] for line in tables[0][1:]}
    assert len(tables[0]) - 1 == len(tiny_project.dataset.case_domain) * len(methods) and len(methods) > 3
    assert tables[0] == tables[1]  # every score, normalised score and flag, to the last digit
