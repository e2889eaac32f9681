"""Benchmark: 3d_fullres at clinical size: time, peak memory and disk of stock nnU-Net against the OOD predictor.

Builds, once per work folder, a CT-like synthetic dataset (air, a body, bone, one labelled organ; int16 HU
volumes at 0.8 x 0.8 x 2.5 mm), plans it with nnU-Net's own planner (``nnUNetv2_plan_and_preprocess -c
3d_fullres``), makes the planned network smaller (every stage's features divided by ``--feature_divisor``;
same number of stages, same patch size, same kernels and strides), trains it for a few iterations with the
stock ``nnUNetTrainer`` (the weights barely matter for time and memory) and fits the OOD state post hoc with
``nnUNetv2_fit_ood`` (short SD and quality schedules), as a user with an existing model would.

Then it predicts one test volume of ``--size`` (``clinical``: 512 x 512 x 300 voxels; ``small``: 256 x 256 x
100) through the stock ``nnUNetPredictor`` and the ``nnUNetOODPredictor`` in several settings, each run in its
own child process (``predict_from_files_sequential``: reading, preprocessing, sliding window, export, all in
that process), alternating stock and OOD runs. Reported per setting: wall time of the prediction, peak
resident memory of the process (``ru_maxrss``), bytes written for the case, each as a ratio to the stock
runs (the median of the stock runs around them). It also times the fit of every default method against
nnU-Net's validation of the fold (timed before and after the fit, the median taken), as ``bench_fit.py`` does in
2D, with the two parts that have schedules of their own shown apart: the shared models' training (the autoencoder)
and the failure table's corrupted versions (``--corruptions_per_case`` predictions of the validation cases, for
``quality``).

For the settings that run ``sd`` it also prints ``sd``'s floor: one call of the network's decoder on one patch, timed
in a child of its own, times the patches of a stock run, as a share of that run (``sd`` computes U∘r(x) by one more
decoder call per patch, METHODS.md §2, so nothing that computes it can cost less), and each such setting's ratio as
1 + that floor + everything else.

``--settings`` picks the OOD settings to time (default: all four): ``pm`` (Pooled Mahalanobis and the free
output scores), ``pm_map`` (the same, writing the Mahalanobis map), ``default`` (the default methods) and
``default_maps`` (the default methods, writing every map). Stock runs alternate with them: one before the
first setting and one after every second setting (after every setting when at most two are picked).

Usage::

    python benchmarks/bench_3d.py --size small                 # about 25 minutes on 2 CPU cores
    python benchmarks/bench_3d.py --size clinical --mirroring off   # about 30 minutes more
    python benchmarks/bench_3d.py --work /tmp/bench3d --size clinical --mirroring off --skip_fit_timing \
        --settings pm default                                  # stock, pm, stock, default, stock
    python benchmarks/bench_3d.py --work /tmp/bench3d --size small --fit_timing_only   # the fit's timing only

Targets (issue 23): time <= 1.10x stock with Pooled Mahalanobis and the free output scores, <= 1.6x with
the default methods (``sd`` included); peak memory <= 1.2x stock; fit <= 1.5x nnU-Net's validation (without the
autoencoder's training and the failure table's corrupted versions, which are shown apart).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATASET_ID = 530
SPACING = (0.8, 0.8, 2.5)  # x, y, z in mm (SimpleITK order)
SIZES = {"clinical": (300, 512, 512), "small": (100, 256, 256)}  # z, y, x
TRAIN_SHAPE = (80, 224, 224)  # z, y, x of the training volumes: the planner's patch comes from their median
N_TRAIN = 6
#: Pooled Mahalanobis and the scores read off the output (no extra network passes)
PM_AND_FREE = ["mahalanobis", "max_softmax", "entropy", "energy", "kl_uniform", "temperature"]
#: the fit's flags in :func:`build` and in the fit's timing: short autoencoder and quality schedules
FIT_FLAGS = ["--disable_progress_bar", "--sd_iterations", "4", "--sd_max_epochs", "2", "--sd_batch_size", "2",
             "--sd_val_batches", "1", "--corruptions_per_case", "2"]


# ---------------------------------------------------------------------------------------------- data
def ct_volume(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 volume (HU) and its organ label: air, an elliptic body, a bone ring, one organ."""
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32).reshape(s) for n, s in
               zip(shape, ((-1, 1, 1), (1, -1, 1), (1, 1, -1))))
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
    spine = ((x / 0.12) ** 2 + ((y - 0.45) / 0.12) ** 2 <= 1) & ~((x / 0.07) ** 2 + ((y - 0.45) / 0.07) ** 2 <= 1)
    c = rng.uniform(-0.25, 0.25, 3).astype(np.float32)
    r = rng.uniform(0.2, 0.35, 3).astype(np.float32)
    organ = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / (2 * r[2])) ** 2 <= 1
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    hu = np.where(spine & body, 700.0, hu)
    hu = np.where(organ & body, 110.0, hu)
    hu += rng.normal(0, 15, shape).astype(np.float32)
    return np.clip(hu, -1024, 3071).astype(np.int16), (organ & body).astype(np.uint8)


def write_image(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    sitk.WriteImage(image, str(path), True)


def write_dataset(raw: Path) -> str:
    """The training set (``N_TRAIN`` volumes of ``TRAIN_SHAPE``); returns the dataset's name."""
    name = f"Dataset{DATASET_ID}_BenchCT"
    folder = raw / name
    if (folder / "dataset.json").is_file():
        return name
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(N_TRAIN):
        image, label = ct_volume(TRAIN_SHAPE, rng)
        write_image(image, folder / "imagesTr" / f"ct_{i:03d}_0000.nii.gz")
        write_image(label, folder / "labelsTr" / f"ct_{i:03d}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": N_TRAIN,
        "file_ending": ".nii.gz"}))
    return name


def write_test_case(folder: Path, size: str) -> Path:
    """One test volume of ``size`` in its own folder (written once)."""
    case = folder / f"ct_{size}_0000.nii.gz"
    if not case.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        image, _ = ct_volume(SIZES[size], np.random.default_rng(1))
        write_image(image, case)
    return folder


# ---------------------------------------------------------------------------------------------- model
def environment(work: Path) -> dict[str, str]:
    """nnU-Net's folders under ``work`` (also set in this process); returns the environment for children."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_fit import use_work_folder

    return use_work_folder(work)


def run(cmd: list[str], env: dict[str, str]) -> None:
    exe = Path(sys.executable).parent / cmd[0]
    proc = subprocess.run([str(exe) if exe.exists() else cmd[0], *cmd[1:]], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def shrink_network(plans_file: Path, divisor: int) -> dict:
    """Divide every stage's features by ``divisor`` (at least 2); stages, patch, kernels and strides are kept."""
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["3d_fullres"]
    kwargs = config["architecture"]["arch_kwargs"]
    if not config.get("bench_3d_shrunk"):
        kwargs["features_per_stage"] = [max(2, f // divisor) for f in kwargs["features_per_stage"]]
        config["bench_3d_shrunk"] = divisor
        plans_file.write_text(json.dumps(plans, indent=2))
    return config


def train(preprocessed: Path, name: str, iterations: int, device: str) -> None:
    """A few iterations of the stock nnUNetTrainer on fold 0 (in a child process: ``train`` sub-command)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans = load_json(str(preprocessed / name / "nnUNetPlans.json"))
    plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args adds
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, load_json(str(preprocessed / name / "dataset.json")),
                            device=torch.device(device))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, iterations, 1
    trainer.batch_size = 1
    trainer.run_training()


def build(work: Path, divisor: int, iterations: int, device: str = "cpu") -> tuple[Path, dict]:
    """Dataset, plan, small network, training and OOD fit (each once per work folder)."""
    env = environment(work)
    name = write_dataset(work / "raw")
    plans_file = work / "preprocessed" / name / "nnUNetPlans.json"
    if not plans_file.is_file():
        print("planning and preprocessing ...", flush=True)
        run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"], env)
    config = shrink_network(plans_file, divisor)
    model = work / "results" / name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        print(f"training {iterations} iterations ...", flush=True)
        # no augmentation workers (the planner, however, needs nnUNet_n_proc_DA unset or positive)
        run([sys.executable, __file__, "train", "--work", str(work), "--iterations", str(iterations), "-device",
             device],
            dict(env, nnUNet_n_proc_DA="0"))
    if not (model / "fold_0" / "ood" / "ood_state.json").is_file():
        print("fitting the OOD state (default methods, short schedules) ...", flush=True)
        start = time.perf_counter()
        run(["nnUNetv2_fit_ood", "-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", "nnUNetTrainer", "-f", "0",
             "-device", device, *FIT_FLAGS], env)
        print(f"  fit took {time.perf_counter() - start:.0f} s", flush=True)
    return model, config


# ---------------------------------------------------------------------------------------------- one run
def require_model(args: argparse.Namespace) -> None:
    """A child's ``--model`` must hold a trained fold 0 (one-line exit otherwise)."""
    if not (Path(args.model) / "fold_0" / "checkpoint_final.pth").is_file():
        raise SystemExit(f"bench_3d.py {args.command}: no trained fold 0 in {args.model} (fold_0/checkpoint_final.pth);"
                         " pass the model folder the benchmark built, <work>/results/Dataset530_BenchCT/"
                         "nnUNetTrainer__nnUNetPlans__3d_fullres")


def predict_child(args: argparse.Namespace) -> None:
    """Predict the input folder with one predictor in this process; print seconds, peak RSS and bytes as JSON."""
    require_model(args)
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_ood.inference.predictor import nnUNetOODPredictor

    torch.set_num_threads(os.cpu_count() or 1)
    cuda = args.device == "cuda"
    common = dict(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.mirroring, device=torch.device(args.device),
                  perform_everything_on_device=cuda, allow_tqdm=False)
    if args.methods is None:
        predictor = nnUNetPredictor(**common)
    else:
        maps = True if args.maps == ["all"] else (args.maps or False)
        predictor = nnUNetOODPredictor(**common, ood_methods=args.methods, save_ood_maps=maps)
    predictor.initialize_from_trained_model_folder(args.model, (0,), "checkpoint_final.pth")
    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if args.memory_trace:
        trace_memory_phases(predictor)
    patches = count_patches(predictor)
    start = time.perf_counter()
    predictor.predict_from_files_sequential(args.input, str(out), False, True, None)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    print("RESULT " + json.dumps({"seconds": seconds, "peak_mib": peak_kib / 1024, "bytes": written,
                                  "gpu_mib": gpu_mib, "patches": patches[0]}), flush=True)


def count_patches(predictor) -> list[int]:
    """A counter of the patches nnU-Net's sliding window predicts (one call per batch of patches, whatever the
    mirroring), filled while the predictor runs."""
    seen, own = [0], predictor._internal_maybe_mirror_and_predict

    def counted(x):
        seen[0] += x.shape[0]
        return own(x)

    predictor._internal_maybe_mirror_and_predict = counted
    return seen


def decoder_child(args: argparse.Namespace) -> None:
    """Time one call of the network's decoder on one patch (what ``sd`` adds per patch: U∘r(x), METHODS.md §2) and
    one whole forward pass, the median of five calls each after a warm-up; print them as JSON."""
    require_model(args)
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_ood.sliding_window import autocast

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(args.device)
    predictor = nnUNetPredictor(use_mirroring=False, device=device, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(args.model, (0,), "checkpoint_final.pth")
    network = predictor.network.eval()
    channels = len(predictor.dataset_json["channel_names"])
    x = torch.randn(1, channels, *predictor.configuration_manager.patch_size, device=device)

    def median_seconds(call) -> float:
        times = []
        for _ in range(6):
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    with torch.inference_mode(), autocast(device):  # as nnU-Net predicts: mixed precision on CUDA
        skips = network.encoder(x)
        decoder = median_seconds(lambda: network.decoder(skips))
        forward = median_seconds(lambda: network(x))
    print("RESULT " + json.dumps({"decoder_seconds": decoder, "forward_seconds": forward}), flush=True)


def trace_memory_phases(predictor) -> None:
    """Print, at exit, the peak resident memory of each phase of a case (sampled every 10 ms): before the
    sliding window (reading, preprocessing), the sliding window, the OOD scoring after it, and nnU-Net's export."""
    import atexit
    import threading

    phase, peaks = ["reading and preprocessing"], {}
    page = os.sysconf("SC_PAGE_SIZE") / 2**20

    def sample() -> None:
        while True:
            with open("/proc/self/statm") as fh:
                rss = int(fh.read().split()[1]) * page
            peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss)
            time.sleep(0.01)

    def wrap(owner, name: str, label: str, after: str) -> None:
        original = getattr(owner, name)

        def wrapped(*a, **k):
            phase[0] = label
            try:
                return original(*a, **k)
            finally:
                phase[0] = after
        setattr(owner, name, wrapped)

    wrap(predictor, "predict_logits_from_preprocessed_data", "sliding window and OOD scoring", "export")
    scorer = getattr(predictor, "_scorer", None)
    if scorer is not None:
        wrap(scorer, "finish_case", "OOD scoring after the window", "export")
    threading.Thread(target=sample, daemon=True).start()
    atexit.register(lambda: print("MEMORY " + json.dumps({k: round(v) for k, v in peaks.items()}), flush=True))


def run_child(model: Path, inputs: Path, output: Path, env: dict[str, str], methods: list[str] | None,
              maps: list[str] | None, mirroring: bool, device: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "predict", "--model", str(model), "--input", str(inputs),
           "--output", str(output), "-device", device] + (["--mirroring"] if mirroring else [])
    if methods is not None:
        cmd += ["--methods", *methods]
    if maps:
        cmd += ["--maps", *maps]
    return child_result(cmd, env)


def child_result(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run a child of this script; its last ``RESULT`` line as a dict (a clear exit if it failed)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(results[-1][len("RESULT "):])


#: ``--settings`` key -> the setting's label in the tables
SETTING_KEYS = {"pm": "PM + free scores", "pm_map": "PM + free scores, PM map", "default": "default methods",
                "default_maps": "default methods, all maps"}


def settings(mirroring: bool) -> dict[str, tuple[list[str] | None, list[str] | None]]:
    """Setting label -> (OOD methods, maps) for one mirroring mode; ``None`` methods: the default ones."""
    from nnunet_ood.methods import DEFAULT_FIT_METHODS

    default = list(DEFAULT_FIT_METHODS)
    if not mirroring:  # tta measures the mirrored passes' disagreement, and quality reads tta
        default = [m for m in default if m not in ("tta", "quality")]
    return {"PM + free scores": (PM_AND_FREE, None),
            "PM + free scores, PM map": (PM_AND_FREE, ["mahalanobis"]),
            "default methods": (default, None),
            "default methods, all maps": (default, ["all"])}


def time_fit_against_validation(model: Path) -> dict[str, float]:
    """nnU-Net's validation of fold 0, before and after ``fit_fold`` of every default method, in seconds, with the parts
    of the fit that have schedules of their own (the shared models' training, the autoencoder, and the failure table's
    corrupted versions: ``--corruptions_per_case`` predictions of the validation cases, for ``quality``) and the fit's
    own passes as its provenance records them.

    The validation is timed on both sides of the fit and its median taken, as the stock runs around the OOD runs of
    the prediction benchmark: on these cores one validation of the same cases varies by a third from run to run.
    Returns ``validation`` (the median), ``validations`` (both), ``fit`` (all of it), ``shared_training``,
    ``failure_table``, ``versions`` (corrupted versions per case), ``features`` and ``validation_pass`` (the fit's
    encoder pass over the training patches and its validation pass). The fit writes fold 0's OOD state; the state
    fitted by :func:`build` is put back afterwards (the prediction runs of later benchmarks use it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from contextlib import redirect_stdout

    from bench_fit import time_validation

    from nnunet_ood.cli.fit import build_parser
    from nnunet_ood.fitting import FitOptions, fit_fold
    from nnunet_ood.methods import REGISTRY
    from nnunet_ood.methods.shared import required_shared_models

    options = FitOptions.from_args(build_parser().parse_args(["-d", str(DATASET_ID), "-c", "3d_fullres",
                                                              *FIT_FLAGS]))
    state = model / "fold_0" / "ood"
    with tempfile.TemporaryDirectory() as keep:
        saved = Path(keep) / "ood"
        if state.is_dir():
            shutil.copytree(state, saved)
        try:
            with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
                before = time_validation(model)[0]
                start = time.perf_counter()
                provenance = fit_fold(str(model), 0, options).provenance
                fit = time.perf_counter() - start
                after = time_validation(model)[0]
        finally:
            if saved.is_dir():
                shutil.rmtree(state, ignore_errors=True)
                shutil.copytree(saved, state)
    shared = required_shared_models(REGISTRY.in_order(options.methods))
    quality = [REGISTRY[m].failure_table_versions(options) for m in options.methods if REGISTRY[m].needs_failure_table]
    passes = provenance["pass_seconds"]
    return {"validation": statistics.median([before, after]), "validations": [before, after], "fit": fit,
            "shared_training": sum(provenance[s.provenance_key]["seconds"] for s in shared),
            "failure_table": passes.get("failure_table", 0.0), "versions": max((q[0] for q in quality), default=0),
            "features": passes.get("features", 0.0), "validation_pass": passes.get("validation", 0.0)}


def print_fit_timing(t: dict[str, float]) -> bool:
    """The fit's timing as a table; True if the fit without its own schedules is at most 1.5x the validation."""
    v = t["validation"]
    rest = t["fit"] - t["shared_training"] - t["failure_table"]
    per_version = t["failure_table"] / (t["versions"] * v) if t["versions"] else float("nan")
    runs = " and ".join(f"{x:.1f}" for x in t["validations"])
    rows = [(f"nnU-Net's validation (mirroring, no export; median of {runs} s, before and after the fit)", v, "1", ""),
            ("fit_fold, all of it", t["fit"], f"{t['fit'] / v:.2f}", ""),
            ("of that: the autoencoder's training (own schedule)", t["shared_training"],
             f"{t['shared_training'] / v:.2f}", ""),
            (f"of that: the failure table's {t['versions']} corrupted versions per case (own schedule)",
             t["failure_table"], f"{t['failure_table'] / v:.2f} ({per_version:.2f} per version)", ""),
            ("**the rest: every default method's fit**", rest, f"**{rest / v:.2f}**", "<= 1.5"),
            ("of the rest: the encoder pass over the training patches", t["features"], f"{t['features'] / v:.2f}", ""),
            ("of the rest: the validation pass, every method scored", t["validation_pass"],
             f"{t['validation_pass'] / v:.2f}", "")]
    print("\n| fit of fold 0, every default method | seconds | ratio to nnU-Net's validation | target |\n"
          "|---|---:|---:|---|", flush=True)
    for name, seconds, ratio, target in rows:
        print(f"| {name} | {seconds:.1f} | {ratio} | {target} |", flush=True)
    return rest / v <= 1.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="the benchmark (default)")
    bench.add_argument("--work", default=None, help="folder for the dataset and model (kept; default: temporary)")
    bench.add_argument("--size", choices=list(SIZES), default="small", help="test volume size (default: small)")
    bench.add_argument("--mirroring", choices=["off", "on", "both"], default="both",
                       help="test-time mirroring in the timed runs (default: both, off first)")
    bench.add_argument("--feature_divisor", type=int, default=8, help="divide the planned features by this (8)")
    bench.add_argument("--iterations", type=int, default=10, help="training iterations (default: 10)")
    bench.add_argument("--skip_fit_timing", action="store_true", help="leave out fit against validation")
    bench.add_argument("--fit_timing_only", action="store_true",
                       help="time only the fit against validation (no prediction runs)")
    bench.add_argument("-device", choices=["cpu", "cuda"], default="cpu", help="cpu (default) or cuda")
    bench.add_argument("--settings", nargs="+", choices=list(SETTING_KEYS), default=list(SETTING_KEYS),
                       help="OOD settings to time, in this order (default: all)")
    tr = sub.add_parser("train")
    tr.add_argument("--work", required=True)
    tr.add_argument("--iterations", type=int, required=True)
    tr.add_argument("-device", choices=["cpu", "cuda"], default="cpu")
    pr = sub.add_parser("predict")
    pr.add_argument("--model", required=True)
    pr.add_argument("--input", required=True)
    pr.add_argument("--output", required=True)
    pr.add_argument("--methods", nargs="+", default=None)
    pr.add_argument("--maps", nargs="+", default=None)
    pr.add_argument("--mirroring", action="store_true")
    pr.add_argument("-device", choices=["cpu", "cuda"], default="cpu")
    pr.add_argument("--memory_trace", action="store_true", help="print the peak memory of each phase")
    dec = sub.add_parser("decoder", help="time one decoder call and one forward pass on one patch")
    dec.add_argument("--model", required=True)
    dec.add_argument("-device", choices=["cpu", "cuda"], default="cpu")
    given = list(argv if argv else sys.argv[1:])
    if not given or given[0] not in (*sub.choices, "-h", "--help"):  # flags alone: the benchmark, as documented
        given = ["bench", *given]
    args = parser.parse_args(given)
    if args.command == "train":
        environment(Path(args.work))
        train(Path(args.work) / "preprocessed", write_dataset(Path(args.work) / "raw"), args.iterations, args.device)
        return 0
    if args.command == "predict":
        predict_child(args)
        return 0
    if args.command == "decoder":
        decoder_child(args)
        return 0
    return benchmark(args)


def benchmark(args: argparse.Namespace) -> int:
    """Build once, then the alternating child runs; prints the tables and returns 0 if the targets are met."""
    from machine import machine_description

    temp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or temp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, config = build(work, args.feature_divisor, args.iterations, args.device)
    env = environment(work)
    inputs = write_test_case(work / f"test_{args.size}", args.size)
    kwargs = config["architecture"]["arch_kwargs"]
    print(f"Machine: {machine_description()}")
    print(f"3d_fullres plan by nnU-Net's planner: patch {config['patch_size']}, spacing {config['spacing']}, "
          f"{kwargs['n_stages']} stages, features {kwargs['features_per_stage']} (planned features divided by "
          f"{args.feature_divisor}); test volume {SIZES[args.size][::-1]} voxels (x y z) at {SPACING} mm", flush=True)
    ok = True
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.mirroring]
    for mirroring in [] if args.fit_timing_only else modes:
        ok &= compare(model, inputs, work, env, mirroring, args.device, [SETTING_KEYS[k] for k in args.settings])
    if not args.skip_fit_timing:
        ok &= print_fit_timing(time_fit_against_validation(model))
    if temp is not None:
        temp.cleanup()
    return 0 if ok else 1


def compare(model: Path, inputs: Path, work: Path, env: dict[str, str], mirroring: bool, device: str,
            labels: list[str] | None = None) -> bool:
    """Stock and OOD child runs alternating (stock, two settings, stock, two settings, stock; with at most two
    settings, stock after each); prints a table. ``labels``: the settings to run (default: all)."""
    runs: dict[str, list[dict[str, float]]] = {"stock": []}
    every = settings(mirroring)
    order = [(label, every[label]) for label in (labels or list(every))]
    runs["stock"].append(run_child(model, inputs, work / "out_stock", env, None, None, mirroring, device))
    for k, (label, (methods, maps)) in enumerate(order):
        runs[label] = [run_child(model, inputs, work / f"out_{k}", env, methods, maps, mirroring, device)]
        if k % 2 == 1 or len(order) <= 2 or k == len(order) - 1:
            runs["stock"].append(run_child(model, inputs, work / "out_stock", env, None, None, mirroring, device))
    stock = {key: statistics.median(r[key] for r in runs["stock"]) for key in ("seconds", "peak_mib", "bytes")}
    print(f"\nmirroring {'on' if mirroring else 'off'}; stock nnUNetPredictor: {stock['seconds']:.0f} s, peak "
          f"{stock['peak_mib']:.0f} MiB, {stock['bytes'] / 2**20:.1f} MiB written (median of "
          f"{len(runs['stock'])} runs)")
    print("| OOD setting | time (s) | time ratio | target | peak RSS (MiB) | memory ratio | target | MiB written "
          "| disk ratio |\n|---|---:|---:|---|---:|---:|---|---:|---:|")
    ok = True
    for label, (methods, _) in order:
        r = runs[label][0]
        target = 1.10 if methods == PM_AND_FREE else 1.60
        t_ratio, m_ratio = r["seconds"] / stock["seconds"], r["peak_mib"] / stock["peak_mib"]
        ok &= t_ratio <= target and m_ratio <= 1.2
        print(f"| {label} | {r['seconds']:.0f} | {t_ratio:.2f} | <= {target:.2f} | {r['peak_mib']:.0f} | "
              f"{m_ratio:.2f} | <= 1.20 | {r['bytes'] / 2**20:.1f} | {r['bytes'] / stock['bytes']:.1f} |", flush=True)
    with_sd = [(label, runs[label][0]) for label, (methods, _) in order if methods is None or "sd" in methods]
    if with_sd:
        print_sd_floor(model, env, device, runs["stock"][0]["patches"], stock["seconds"], with_sd)
    return ok


def print_sd_floor(model: Path, env: dict[str, str], device: str, patches: int, stock_seconds: float,
                   with_sd: list[tuple[str, dict[str, float]]]) -> None:
    """``sd``'s floor: one more decoder call per patch (timed apart, in a child of its own), as a share of a stock
    run; each setting with ``sd`` as that floor plus the rest. Whatever computes U∘r(x) by the network's own decoder
    cannot cost less."""
    t = child_result([sys.executable, __file__, "decoder", "--model", str(model), "-device", device], env)
    floor = patches * t["decoder_seconds"] / stock_seconds
    print(f"sd's floor: one more decoder call per patch, {patches} patches x {t['decoder_seconds']:.3f} s (a whole "
          f"forward pass {t['forward_seconds']:.3f} s, the decoder {t['decoder_seconds'] / t['forward_seconds']:.0%} "
          f"of it) = {floor:.2f} of a stock run", flush=True)
    for label, r in with_sd:
        print(f"  {label}: {r['seconds'] / stock_seconds:.2f} = 1 + {floor:.2f} (sd's decoder call) + "
              f"{r['seconds'] / stock_seconds - 1 - floor:.2f} (everything else)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
