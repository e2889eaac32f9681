"""Benchmark: the cost of ``fit_fold`` as a multiple of nnU-Net's own validation of the fold.

For each dataset, a small real model is trained once (``nnUNetTrainerOOD_smoke``, nnU-Net's default
plans with the patch halved along every axis and one stage less, so that every case has several
sliding-window patches, as real cases do: 9 per 2D image, 27 per 3D volume), then, in one process and
alternating, two things are timed on the same machine:

* ``validation``: what nnU-Net does to validate the fold: a predictor loads the fold and predicts every
  validation case from its preprocessed data, sliding window and test-time mirroring as at default
  inference (export of the segmentations left out);
* ``fit``: ``fit_fold`` with the default methods without those requiring a shared model (``sd``: its training is
  a schedule chosen by the user, reported separately in docs/benchmarks.md) and without the methods that learn from the
  failure table (``quality``: its corruption pass has a budget of its own, measured by bench_quality.py).

The ratio fit / validation is the target (at most 1.5). Two 2D training sets of different size show how
the cost grows with the number of cases (both should grow linearly); a small 3D set shows 3d_fullres.

Usage::

    python benchmarks/bench_fit.py [--work FOLDER] [--repeats 2] [--datasets 2d-40 2d-80 3d-40]

About 10 minutes on 2 CPU cores for the 2D sets, 30 more for the 3D one (training the models included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from machine import machine_description

TRAINER = "nnUNetTrainerOOD_smoke"
# key: (label, dataset id, configuration, cases in the dataset; fold 0 trains on 4/5 of them)
DATASETS = {"2d-40": ("2d, 40 training cases", 511, "2d", 50), "2d-80": ("2d, 80 training cases", 512, "2d", 100),
            "3d-40": ("3d_fullres, 40 training cases", 513, "3d_fullres", 50)}


def _run(cmd: list[str], env: dict[str, str]) -> None:
    exe = Path(sys.executable).parent / cmd[0]
    proc = subprocess.run([str(exe) if exe.exists() else cmd[0], *cmd[1:]], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _write_3d_dataset(raw: Path, dataset_id: int, n_train: int) -> str:
    """Bright ellipsoids (label 1) in noisy volumes of 48 x 72 x 72 voxels."""
    name = f"Dataset{dataset_id}_Bench3D"
    folder = raw / name
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (48, 72, 72)
    zz, yy, xx = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
    for i in range(n_train):
        c, r = rng.uniform(0.35, 0.65, 3) * shape, rng.uniform(0.15, 0.3, 3) * shape
        label = ((((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2) <= 1)
        image = 100 + 80 * label + rng.normal(0, 10, label.shape)
        for array, path in ((image.astype(np.float32), folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz"),
                            (label.astype(np.uint8), folder / "labelsTr" / f"case_{i:03d}.nii.gz")):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing((1.0, 1.0, 2.0))
            sitk.WriteImage(img, str(path))
    (folder / "dataset.json").write_text(
        '{"channel_names": {"0": "MRI"}, "labels": {"background": 0, "blob": 1}, '
        f'"numTraining": {n_train}, "file_ending": ".nii.gz"}}')
    return name


def use_work_folder(work: Path) -> dict[str, str]:
    """nnU-Net's folders under ``work``, in this process's environment too; returns the environment."""
    from nnunet_ood.ext_trainer import trainer_dir

    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"), nnUNet_compile="0", nnUNet_extTrainer=trainer_dir(),
               nnUNet_def_n_proc="2")
    os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet")})
    return env


def halve_patch(preprocessed: Path, dataset_name: str, configuration: str) -> None:
    """Half the planned patch along every axis and drop the network's last stage (preprocessing is unchanged)."""
    import json

    plans_file = preprocessed / dataset_name / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"][configuration]
    kwargs = config["architecture"]["arch_kwargs"]
    config["patch_size"] = [p // 2 for p in config["patch_size"]]
    kwargs["n_stages"] -= 1
    for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_conv_per_stage_decoder"):
        kwargs[key] = kwargs[key][:-1]
    plans_file.write_text(json.dumps(plans, indent=2))


def build(work: Path, dataset_id: int, configuration: str, n_train: int) -> Path:
    """Train the benchmark model of one dataset (once per work folder); returns its model folder."""
    from nnunet_ood.demo.synthetic import generate_demo_dataset

    env = use_work_folder(work)
    if configuration == "2d":
        name = generate_demo_dataset(work / "raw", dataset_id, seed=0, n_train=n_train, n_test_per_domain=0,
                                     size=192).name
    else:
        name = _write_3d_dataset(work / "raw", dataset_id, n_train)
    model = work / "results" / name / f"{TRAINER}__nnUNetPlans__{configuration}"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        print(f"training {name} {configuration} ({n_train} cases) ...", flush=True)
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "2"], env)
        halve_patch(work / "preprocessed", name, configuration)
        _run(["nnUNetv2_train", str(dataset_id), configuration, "0", "-tr", TRAINER, "-device", "cpu"],
             dict(env, nnUNet_n_proc_DA="0"))
    return model


def time_validation(model: Path) -> tuple[float, int, int]:
    """nnU-Net's validation of fold 0 without export: (seconds, validation cases, training cases)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_ood.fitting.split import fold_split, preprocessed_folders
    from nnunet_ood.methods.context import as_tensor

    start = time.perf_counter()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), [0], "checkpoint_final.pth")
    base, folder = preprocessed_folders(predictor.plans_manager.dataset_name,
                                        predictor.configuration_manager.data_identifier)
    dataset_class = infer_dataset_class(folder)
    train, val = fold_split(base, dataset_class.get_identifiers(folder), 0)
    dataset = dataset_class(folder, val)
    for key in val:
        predictor.predict_logits_from_preprocessed_data(as_tensor(dataset.load_case(key)[0]))
    return time.perf_counter() - start, len(val), len(train)


def time_fit(model: Path) -> float:
    from nnunet_ood.fitting import FitOptions, fit_fold
    from nnunet_ood.methods import DEFAULT_FIT_METHODS, REGISTRY

    methods = tuple(m for m in DEFAULT_FIT_METHODS
                    if not REGISTRY[m].requires.shared and not REGISTRY[m].needs_failure_table)
    start = time.perf_counter()
    fit_fold(str(model), 0, FitOptions(methods=methods, progress=False))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="folder for the benchmark models (kept; default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats (default: 2)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS),
                        help="which datasets to time (default: all)")
    args = parser.parse_args(argv)
    temp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or temp.name).resolve()
    torch.set_num_threads(os.cpu_count() or 1)
    models = {label: build(work / label.split(",")[0].replace(" ", ""), dataset_id, configuration, n)
              for key, (label, dataset_id, configuration, n) in DATASETS.items() if key in args.datasets}
    print(f"Machine: {machine_description()}")
    print("\n| dataset | nnU-Net validation of fold 0 (s) | fit_fold, default methods without sd (s) | ratio "
          "| target |\n|---|---:|---:|---:|---|", flush=True)
    ok = True
    for label, model in models.items():
        use_work_folder(model.parents[2])  # work/results/<dataset>/<model>
        times = {"validation": [], "fit": []}
        with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
            time_validation(model)  # warm-up: imports, allocator, thread pools
            for _ in range(args.repeats):
                seconds, n_val, n_train = time_validation(model)
                times["validation"].append(seconds)
                times["fit"].append(time_fit(model))
        v, f = statistics.median(times["validation"]), statistics.median(times["fit"])
        ok &= f / v <= 1.5
        print(f"| {label} ({n_val} validation cases) | {v:.1f} | {f:.1f} | {f / v:.2f} | <= 1.5 |", flush=True)
    if temp is not None:
        temp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
