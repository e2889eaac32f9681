"""``nnunet_ood_demo``: the whole workflow on the embedded synthetic dataset, in a few minutes on a CPU.

generate data -> nnUNetv2_plan_and_preprocess -> nnUNetv2_train -tr nnUNetTrainerOOD_demo (fits OOD state)
-> nnUNetv2_predict_ood on every test domain -> nnUNetv2_evaluate_ood (tables, plots, summary).
Every step is the real nnU-Net / plugin command line; their output goes to ``<output>/logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID = 501
TRAINER = "nnUNetTrainerOOD_demo"


def _executable(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _step(title: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> None:
    """Run one command line, logging its output; on failure show the end of the log and stop."""
    log = log_dir / f"{len(list(log_dir.iterdir())) + 1:02d}_{cmd[0]}.log"
    print(f"==> {title}", flush=True)
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([_executable(cmd[0]), *cmd[1:]], env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        sys.exit(f"error: step '{title}' failed (exit {proc.returncode}); full log: {log}")
    print(f"    done in {time.time() - started:.0f} s (log: {log})", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run the nnunet-ood demo end to end on a synthetic multi-domain "
                                            "2D dataset: train, fit, predict, evaluate.")
    p.add_argument("--output", default="demo_output", help="folder for everything the demo writes "
                   "(default: demo_output)")
    p.add_argument("-device", "--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default: 0)")
    p.add_argument("--n_train", type=int, default=60, help="training cases (default: 60)")
    p.add_argument("--n_test", type=int, default=16, help="test cases per domain (default: 16)")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``nnunet_ood_demo``."""
    args = build_parser().parse_args(argv)
    from nnunet_ood.cli.trainer_dir import trainer_dir
    from nnunet_ood.demo.synthetic import generate_demo_dataset

    started = time.time()
    out = Path(args.output).resolve()
    work = out / "nnunet"
    if work.exists():
        shutil.rmtree(work)  # a demo always starts from scratch
    logs = out / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    env = dict(os.environ)
    env.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"), nnUNet_compile="0", nnUNet_extTrainer=trainer_dir())
    env.setdefault("nnUNet_def_n_proc", "2")

    print(f"==> generating the synthetic dataset (seed {args.seed})", flush=True)
    data = generate_demo_dataset(work / "raw", DATASET_ID, seed=args.seed, n_train=args.n_train,
                                 n_test_per_domain=args.n_test, size=64)

    _step("planning and preprocessing (nnUNetv2_plan_and_preprocess)",
          ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "2"], env, logs)
    train_env = dict(env, nnUNet_n_proc_DA="0")  # data augmentation in-process: fastest on 2 cores
    _step(f"training fold 0 with {TRAINER} (fits the OOD detector at the end)",
          ["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", args.device], train_env, logs)
    predictions = out / "predictions"
    shutil.rmtree(predictions, ignore_errors=True)
    # the fold's validation cases (ID, never trained on) set the evaluation's 95% ID threshold
    val_images = work / "id_val_images"
    val_images.mkdir()
    split = json.loads((work / "preprocessed" / data.name / "splits_final.json").read_text())[0]
    for case in split["val"]:
        shutil.copy(Path(data.images_tr) / f"{case}_0000.nii.gz", val_images / f"{case}_0000.nii.gz")
    groups = {domain: Path(data.images_ts[domain]) for domain in data.domains}
    groups["id_val"] = val_images
    for name, images in groups.items():
        _step(f"predicting {name} with OOD scores and maps (nnUNetv2_predict_ood)",
              ["nnUNetv2_predict_ood", "-i", str(images), "-o", str(predictions / name), "-d", str(DATASET_ID),
               "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", args.device, "-npp", "1", "-nps", "1",
               "--save_ood_maps", "--disable_progress_bar"], env, logs)
    shifted = [arg for d in data.domains if d != "id"
               for arg in ("--domain", d, str(predictions / d), str(data.labels_ts[d]))]
    _step("evaluating all methods (nnUNetv2_evaluate_ood)",
          ["nnUNetv2_evaluate_ood", "--id_test", str(predictions / "id"), str(data.labels_ts["id"]),
           "--id_val", str(predictions / "id_val"), str(data.labels_tr), *shifted, "-o", str(out / "evaluation")],
          env, logs)
    print()
    print((out / "evaluation" / "ood_evaluation.md").read_text())
    print((out / "evaluation" / "ood_summary.md").read_text())
    print(f"\nfinished in {time.time() - started:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
