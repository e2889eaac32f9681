"""``nnunet_ood_demo``: the whole workflow on the embedded synthetic dataset, in a few minutes on a CPU.

generate data -> nnUNetv2_plan_and_preprocess -> nnUNetv2_train -tr nnUNetTrainerOOD_demo (fits the OOD methods)
-> one nnUNetv2_predict_ood --report run over every test domain and the fold's validation cases (a review page
per folder) -> nnUNetv2_evaluate_ood (tables, plots, report.html). Every step is the real nnU-Net / plugin
command line; its whole output goes to
``<output>/logs`` while the terminal shows live progress bars (:mod:`nnunet_ood.demo.progress`) and, at the end,
the short summary and where the reports are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from nnunet_ood.demo.progress import ProgressRelay, run_logged
from nnunet_ood.errors import one_line_errors
from nnunet_ood.methods.options import Range

#: the demo's sizes: nnU-Net's 5-fold split needs 5 training cases; beyond 1000 the demo is no longer a demo
N_TRAIN = Range(5, 1000, integer=True)
N_TEST = Range(1, 1000, integer=True)
N_SITE = Range(0, 1000, integer=True)
SEED = Range(0, 2**32 - 1, integer=True)

DATASET_ID = 501
TRAINER = "nnUNetTrainerOOD_demo"
FULL_TRAINER = "nnUNetTrainerOOD_demo_full"


def _executable(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class Steps:
    """Runs the demo's command lines one after another, each logged to ``<output>/logs/NN_<command>.log``,
    and records how long each took."""

    def __init__(self, log_dir: Path, env: dict[str, str], progress: bool) -> None:
        self.log_dir, self.env, self.progress = log_dir, env, progress
        self.timings: list[tuple[str, float]] = []

    def run(self, label: str, title: str, cmd: list[str], relay: ProgressRelay | None = None, **env: str) -> None:
        """Run one command line with live progress (``label``: its name in the closing time line); on failure
        show the end of its log and stop."""
        log = self.log_dir / f"{len(self.timings) + 1:02d}_{cmd[0]}.log"
        print(f"==> {title}", flush=True)
        started = time.time()
        relay = relay or ProgressRelay(enabled=self.progress)
        relay.enabled = self.progress
        code = run_logged([_executable(cmd[0]), *cmd[1:]], dict(self.env, **env), log, relay)
        if code != 0:
            tail = log.read_text(errors="replace").splitlines()[-25:]
            print("\n".join(tail), file=sys.stderr)
            sys.exit(f"error: step '{title}' failed (exit {code}); full log: {log}")
        elapsed = time.time() - started
        self.timings.append((label, elapsed))
        print(f"    done in {elapsed:.0f} s (log: {log})", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run the nnunet-ood demo end to end on a synthetic multi-domain "
                                            "2D dataset: train, fit, predict, evaluate, report.")
    p.add_argument("--output", default="demo_output", help="folder for everything the demo writes "
                   "(default: demo_output)")
    p.add_argument("-device", "--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=SEED.parser("--seed"), default=0, help=f"seed of the synthetic data (default: 0; "
                   f"{SEED})")
    p.add_argument("--n_train", type=N_TRAIN.parser("--n_train"), default=60,
                   help=f"training cases (default: 60; {N_TRAIN})")
    p.add_argument("--n_test", type=N_TEST.parser("--n_test"), default=16,
                   help=f"test cases per domain (default: 16; {N_TEST})")
    p.add_argument("--n_site", type=N_SITE.parser("--n_site"), default=40, help="a site's own in-distribution scans "
                   "(new subjects) for nnUNetv2_calibrate_ood (default: 40; 0 skips the calibration and predicts with "
                   f"the fit's thresholds; {N_SITE}); their labels are written too, for trying -l by hand")
    p.add_argument("--full", action="store_true", help=f"the longer schedule ({FULL_TRAINER}: 30 epochs and a "
                   "longer autoencoder training, about 2 minutes more on 2 CPU cores)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars, only each step's name and time")
    return p


def _numerics_env() -> dict[str, str]:
    """The same instruction set for every command, so that the seeded run repeats on other x86 CPUs too
    (see ``nnunet_ood.trainers.nnUNetTrainerOOD.pin_cpu_numerics``)."""
    if platform.machine().lower() in ("x86_64", "amd64") and "ONEDNN_MAX_CPU_ISA" not in os.environ:
        return {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    return {}


def format_summary_table(markdown: str) -> str:
    """``ood_summary.md`` for a terminal: bullets without markdown emphasis, each table with aligned columns,
    section headings (below the title) as plain lines."""
    text: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
            table = ["  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
                     for r in rows]
            table.insert(1, "  ".join("-" * w for w in widths))
            text.extend(["", *table])
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                rows.append(cells)
            continue
        flush()
        if line.startswith("## "):
            text.extend(["", line[3:].strip()])
        elif line.strip() and not line.startswith("#"):
            text.append(line.replace("**", ""))
    flush()
    return "\n".join(text)


def _fresh_folders(out: Path) -> tuple[Path, Path]:
    """``<output>/nnunet`` (removed: a demo always starts from scratch) and an empty ``<output>/logs``."""
    work = out / "nnunet"
    if work.exists():
        shutil.rmtree(work)  # a demo always starts from scratch
    logs = out / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    return work, logs


def _environment(work: Path) -> dict[str, str]:
    """The commands' environment: nnU-Net's folders under ``work``, the demo trainers, pinned numerics."""
    from nnunet_ood.ext_trainer import trainer_dir

    env = dict(os.environ)
    env.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"), nnUNet_compile="0", nnUNet_extTrainer=trainer_dir(),
               **_numerics_env())
    env.setdefault("nnUNet_def_n_proc", "2")
    return env


def _validation_images(work: Path, data: Any) -> Path:
    """The fold's validation cases (ID, never trained on) copied into a folder of their own: they set the
    evaluation's 95% ID threshold."""
    val_images = work / "id_val_images"
    val_images.mkdir()
    split = json.loads((work / "preprocessed" / data.name / "splits_final.json").read_text())[0]
    for case in split["val"]:
        shutil.copy(Path(data.images_tr) / f"{case}_0000.nii.gz", val_images / f"{case}_0000.nii.gz")
    return val_images


def _calibrate(steps: Steps, args: argparse.Namespace, data: Any, trainer: str) -> list[str]:
    """``nnUNetv2_calibrate_ood`` on the site's scans (with ``--n_site`` > 0); the prediction's arguments that
    use it."""
    if args.n_site <= 0:
        return []
    # the site's own ID scans (no labels needed) set every method's threshold and switch on quality's gate
    # for unusual scans (it needs 19 or more calibration cases; the fold has 12 validation cases)
    steps.run("calibration", f"calibrating on {args.n_site} in-distribution scans of the site "
              "(nnUNetv2_calibrate_ood)",
              ["nnUNetv2_calibrate_ood", "-i", str(data.images_site), "-d", str(DATASET_ID), "-c", "2d", "-f", "0",
               "-tr", trainer, "-device", args.device,
               "-npp", "0", "-nps", "0", "--name", "site", "--overwrite", "--disable_progress_bar"],
              ProgressRelay(cases=args.n_site))
    return ["--calibration", "site"]


def _predict(steps: Steps, args: argparse.Namespace, trainer: str, groups: dict[str, Path], predictions: Path,
             calibration: list[str]) -> None:
    """One ``nnUNetv2_predict_ood`` run over every folder of ``groups``, with maps and review pages."""
    n_cases = sum(len(list(folder.glob("*_0000.nii.gz"))) for folder in groups.values())
    # one process for every folder: the model, the OOD state and nnU-Net are loaded once; sequential mode
    # (-npp 0 -nps 0) because on 2 cores starting worker processes costs more than it saves
    steps.run("prediction", f"predicting {', '.join(groups)} with OOD scores and maps (one nnUNetv2_predict_ood run)",
              ["nnUNetv2_predict_ood", "-i", *map(str, groups.values()), "-o", *(str(predictions / g) for g in groups),
               "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", trainer, "-device", args.device,
               "-npp", "0", "-nps", "0", "--save_ood_maps", "--report", "--disable_progress_bar", *calibration],
              ProgressRelay(cases=n_cases))


def _evaluate(steps: Steps, data: Any, predictions: Path, evaluation: Path) -> None:
    """``nnUNetv2_evaluate_ood`` of the ID test cases, the validation cases and every shifted domain."""
    shifted = [arg for d in data.domains if d != "id"
               for arg in ("--domain", d, str(predictions / d), str(data.labels_ts[d]))]
    steps.run("evaluation", "evaluating all methods (nnUNetv2_evaluate_ood)",
              ["nnUNetv2_evaluate_ood", "--id_test", str(predictions / "id"), str(data.labels_ts["id"]),
               "--id_val", str(predictions / "id_val"), str(data.labels_tr), *shifted, "-o", str(evaluation)])


def _print_closing(steps: Steps, started: float, out: Path, evaluation: Path, predictions: Path,
                   groups: dict[str, Path]) -> None:
    """The summary table, the time per step and where the tables and pages are."""
    print()
    print(format_summary_table((evaluation / "ood_summary.md").read_text()))
    print()
    print("time per step: " + ", ".join(f"{label} {seconds:.0f} s" for label, seconds in steps.timings))
    print(f"finished in {time.time() - started:.0f} s; everything is in {out}")
    print(f"full tables: {evaluation / 'ood_evaluation.md'}")
    report = evaluation / "report.html"
    reviews = [predictions / g / "review.html" for g in groups if (predictions / g / "review.html").exists()]
    if report.exists():
        print(f"HTML report: {report}")
    if reviews:
        print(f"review worklists (no labels needed): {', '.join(str(r) for r in reviews)}")
    if report.exists() or reviews:
        print("open them in any web browser (they work offline), e.g. xdg-open " + str(report if report.exists()
                                                                                     else reviews[0]))


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``nnunet_ood_demo``."""
    args = build_parser().parse_args(argv)
    from nnunet_ood.demo.synthetic import generate_demo_dataset
    from nnunet_ood.trainers import nnUNetTrainerOOD_demo, nnUNetTrainerOOD_demo_full

    started = time.time()
    trainer = nnUNetTrainerOOD_demo_full if args.full else nnUNetTrainerOOD_demo
    out = Path(args.output).resolve()
    work, logs = _fresh_folders(out)
    steps = Steps(logs, _environment(work), progress=not args.no_progress)

    print(f"==> generating the synthetic dataset (seed {args.seed})", flush=True)
    data = generate_demo_dataset(work / "raw", DATASET_ID, seed=args.seed, n_train=args.n_train,
                                 n_test_per_domain=args.n_test, size=64, n_site=args.n_site)

    steps.run("planning", "planning and preprocessing (nnUNetv2_plan_and_preprocess)",
              ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "2"])
    # data augmentation in-process: fastest on 2 cores, and the seeded batches do not depend on worker timing
    steps.run("training and fit", f"training fold 0 with {trainer.__name__}, then fitting the OOD methods",
              ["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer.__name__, "-device", args.device],
              ProgressRelay(epochs=trainer.num_demo_epochs), nnUNet_n_proc_DA="0")

    predictions = out / "predictions"
    shutil.rmtree(predictions, ignore_errors=True)
    val_images = _validation_images(work, data)
    calibration = _calibrate(steps, args, data, trainer.__name__)
    groups = {domain: Path(data.images_ts[domain]) for domain in data.domains}
    groups["id_val"] = val_images
    _predict(steps, args, trainer.__name__, groups, predictions, calibration)
    evaluation = out / "evaluation"
    _evaluate(steps, data, predictions, evaluation)
    _print_closing(steps, started, out, evaluation, predictions, groups)


if __name__ == "__main__":
    main()
