"""Benchmark: inference time of stock ``nnUNetPredictor`` against ``nnUNetOODPredictor`` (mahalanobis; sd).

Builds a small real nnU-Net model once (synthetic data at ``--size`` pixels, nnU-Net's own planning,
``nnUNetTrainerOOD_smoke``, which fits the OOD state at the end), then predicts the same preprocessed
test cases, larger than the patch so that the sliding window has several patches, through three
predictors in one process: stock, OOD with ``mahalanobis`` only (target ratio 1.10) and OOD with
``sd`` only (Segmentation Distortion: AE plus a second decoder call per patch; target 1.6). Runs
alternate between them (stock, OOD, OOD, stock, ...) so that drifting machine load hits all alike;
the ratio of the medians is reported. Two paths are timed:

* ``logits``: ``predict_logits_from_preprocessed_data`` (sliding window, mirroring, and for the OOD
  predictor feature pooling, scoring, Gaussian aggregation into maps and case scores);
* ``files``: ``predict_from_files_sequential`` end to end (reading, preprocessing, export; the OOD
  predictor also writes its score tables).

Usage::

    python benchmarks/bench_inference.py                 # CPU, about 5 minutes on 2 cores
    python benchmarks/bench_inference.py -device cuda    # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import SimpleITK as sitk
import torch
from machine import machine_description

#: predictor name -> (OOD methods, target time ratio against stock)
CONFIGURATIONS = {"mahalanobis": (["mahalanobis"], 1.10), "sd": (["sd"], 1.60)}
DATASET_ID = 502
TRAINER = "nnUNetTrainerOOD_smoke"


def _run(cmd: list[str], env: dict[str, str]) -> None:
    exe = Path(sys.executable).parent / cmd[0]
    proc = subprocess.run([str(exe) if exe.exists() else cmd[0], *cmd[1:]], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def build_model(work: Path, size: int, test_size: int, n_test: int, device: str) -> tuple[Path, Path]:
    """Train the benchmark model (once per work folder); return its folder and a folder of test images."""
    from nnunet_ood.demo.synthetic import generate_demo_dataset
    from nnunet_ood.trainers import EXT_TRAINER_DIR

    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"), nnUNet_compile="0", nnUNet_extTrainer=EXT_TRAINER_DIR,
               nnUNet_def_n_proc="2")
    os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet")})
    data = generate_demo_dataset(work / "raw", DATASET_ID, seed=0, n_train=20, n_test_per_domain=0, size=size)
    model = work / "results" / data.name / f"{TRAINER}__nnUNetPlans__2d"
    if not (model / "fold_0" / "ood" / "ood_state.json").is_file():
        print(f"training the benchmark model ({size}x{size}, {TRAINER}) ...", flush=True)
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "2"], env)
        _run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", device],
             dict(env, nnUNet_n_proc_DA="0"))
    # test cases from the same generator at a larger size: several sliding-window patches per case
    test_raw = work / "test_raw"
    shutil.rmtree(test_raw, ignore_errors=True)
    test = generate_demo_dataset(test_raw, DATASET_ID + 1, seed=1, n_train=1, n_test_per_domain=n_test,
                                 size=test_size)
    return model, Path(test.images_ts["id"])


def timed(fn, sync: bool) -> float:
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 if the target is met."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--work", help="folder for the benchmark model (kept; default: a temporary folder)")
    parser.add_argument("--size", type=int, default=128, help="training image size (= patch size), default 128")
    parser.add_argument("--test_size", type=int, default=320, help="test image size, default 320")
    parser.add_argument("--cases", type=int, default=4, help="test cases, default 4")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats per predictor, default 3")
    args = parser.parse_args(argv)

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_ood.inference.predictor import nnUNetOODPredictor

    temp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or temp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, test_images = build_model(work, args.size, args.test_size, args.cases, args.device)
    device = torch.device(args.device)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    sync = args.device == "cuda"

    def make(cls, **kwargs):
        p = cls(device=device, allow_tqdm=False, perform_everything_on_device=args.device == "cuda", **kwargs)
        p.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
        return p

    predictors = {"stock": make(nnUNetPredictor)}
    for name, (methods, _) in CONFIGURATIONS.items():
        predictors[name] = make(nnUNetOODPredictor, ood_methods=methods)
    stock, ood = predictors["stock"], predictors["mahalanobis"]
    files = [[str(f)] for f in sorted(test_images.iterdir())]
    pre = stock.configuration_manager.preprocessor_class(verbose=False)
    cases = [torch.from_numpy(pre.run_case(f, None, stock.plans_manager, stock.configuration_manager,
                                           load_json(str(model / "dataset.json")))[0]) for f in files]
    n_patches = len(stock._internal_get_sliding_window_slicers(cases[0].shape[1:]))
    print(f"Machine: {machine_description()}")
    print(f"model: patch {stock.configuration_manager.patch_size}, {len(cases)} cases of "
          f"{tuple(cases[0].shape[1:])} ({n_patches} patches each), mirroring on, device {args.device}, "
          f"OOD feature dimension {ood.ood_states[0].detectors['mahalanobis'].n_features_in_}", flush=True)

    def logits(predictor):
        for data in cases:
            predictor.predict_logits_from_preprocessed_data(data)

    def from_files(predictor, out: Path):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()  # nnU-Net's sequential mode expects the folder to exist
        predictor.predict_from_files_sequential(files, str(out), False, True, None)

    for predictor in predictors.values():  # warm-up: allocator, thread pools, lazy imports
        logits(predictor)
    times = {path: {name: [] for name in predictors} for path in ("logits", "files")}
    for _ in range(args.repeats):
        for name, predictor in predictors.items():
            times["logits"][name].append(timed(lambda p=predictor: logits(p), sync))
            with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
                times["files"][name].append(timed(lambda p=predictor, n=name: from_files(p, work / f"out_{n}"),
                                                  sync))
    # the OOD predictor must not change nnU-Net's output
    ending = stock.dataset_json["file_ending"]
    for f in files:
        case = os.path.basename(f[0])[: -len(ending) - 5]
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "out_stock" / f"{case}{ending}")))
        for n in CONFIGURATIONS:
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"out_{n}" / f"{case}{ending}")))
            if not (a == b).all():
                raise SystemExit(f"segmentation of {case} differs between stock and the {n} predictor")
    print(f"segmentations of all {len(files)} cases identical between the predictors")
    print("\n| path | OOD methods | stock nnUNetPredictor (s) | nnUNetOODPredictor (s) | ratio | target |")
    print("|---|---|---|---|---|---|")
    ok = True
    for path, t in times.items():
        s = statistics.median(t["stock"])
        for name, (_, target) in CONFIGURATIONS.items():
            o = statistics.median(t[name])
            ok &= o / s <= target
            print(f"| {path} ({len(cases)} cases, median of {args.repeats}) | {name} | {s:.2f} | {o:.2f} | "
                  f"{o / s:.3f} | <= {target:.2f} |")
    if temp is not None:
        temp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
