"""What the benchmarks that build on a finished demo share: its folders and environment, running a command line,
reading the evaluation's CSV."""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
from pathlib import Path

DATASET = "Dataset501_OODDemo"
TRAINERS = ("nnUNetTrainerOOD_demo_full", "nnUNetTrainerOOD_demo")


def demo_paths(args: argparse.Namespace, default_work: str) -> tuple[Path, Path]:
    """``(demo, work)`` folders from :func:`add_demo_arguments`' flags."""
    demo = Path(args.demo).resolve()
    return demo, Path(args.work).resolve() if args.work else demo / default_work


def add_demo_arguments(p: argparse.ArgumentParser, default_work: str) -> None:
    """``--demo`` (the finished demo's folder), ``--work`` (default: DEMO/``default_work``), ``--seed``."""
    p.add_argument("--demo", required=True, help="the demo's output folder (nnunet_ood_demo --output)")
    p.add_argument("--work", default=None, help=f"where the new test sets and their predictions go (default: "
                                                f"DEMO/{default_work})")
    p.add_argument("--seed", type=int, default=0)


def demo_env(demo: Path) -> dict[str, str]:
    """nnU-Net's folders of the demo and the CPU settings of the tests."""
    return {**os.environ, "nnUNet_raw": str(demo / "nnunet" / "raw"),
            "nnUNet_preprocessed": str(demo / "nnunet" / "preprocessed"),
            "nnUNet_results": str(demo / "nnunet" / "results"),
            "nnUNet_n_proc_DA": "0", "nnUNet_compile": "0", "nnUNet_def_n_proc": "1"}


def demo_trainer(demo: Path) -> str:
    """The trainer the demo ran (``--full`` or not)."""
    return next(t for t in TRAINERS if (demo / "nnunet" / "results" / DATASET / f"{t}__nnUNetPlans__2d").is_dir())


def run(cmd: list[str], env: dict[str, str], quiet: bool = False) -> None:
    """Run a command line, shown first; its output to the terminal unless ``quiet``."""
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL if quiet else None)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def value(rows: list[dict[str, str]], method: str, domain: str, column: str) -> float:
    """One cell of ``ood_evaluation.csv`` (NaN when absent or empty)."""
    for r in rows:
        if r["method"] == method and r["domain"] == domain and r.get(column, "") != "":
            return float(r[column])
    return math.nan
