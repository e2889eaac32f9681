"""benchmarks/device_check.sh, the one-call GPU check: syntax and argument handling (it runs only on a GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_lists_the_steps_with_cuda_everywhere() -> None:
    proc = run("--dry-run", "--python", "py3")
    assert proc.returncode == 0, proc.stderr
    steps = [line.split(" ")[0] for line in proc.stdout.splitlines()]
    assert steps == ["environment", "cuda_tests", "bench_2d", "bench_3d"]
    lines = dict(zip(steps, proc.stdout.splitlines()))
    assert "-m cuda" in lines["cuda_tests"] and "py3 -m pytest" in lines["cuda_tests"]
    assert "-device cuda" in lines["bench_2d"] and "-device cuda" in lines["bench_3d"]
    assert "--mirroring off" not in lines["bench_3d"]
    assert "--mirroring off" in run("--dry-run", "--quick").stdout
    # the limits add up to at most 8 minutes, inside one device call
    assert sum(int(line.split("(at most ")[1].split(" s)")[0]) for line in lines.values()) <= 8 * 60


@pytest.mark.parametrize("args, needle", [(["--bogus"], "unknown argument '--bogus'"), (["--out"], "--out needs"),
                                          (["--python"], "--python needs")])
def test_bad_arguments_exit_2_with_one_line(args, needle) -> None:
    proc = run(*args)
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_help_and_a_machine_without_cuda(tmp_path) -> None:
    proc = run("--help")
    assert proc.returncode == 0 and "bench_3d" in proc.stdout and "--dry-run" in proc.stdout
    # no CUDA here (or a broken interpreter): the environment step stops everything with status 3
    proc = run("--out", str(tmp_path / "out"), "--python", "false")
    assert proc.returncode == 3 and "environment: FAILED" in proc.stdout
    assert not (tmp_path / "out" / "cuda_tests.log").exists()


def test_bench_3d_arguments() -> None:
    bench = SCRIPT.parent / "bench_3d.py"
    proc = subprocess.run([sys.executable, str(bench), "bench", "--size", "huge"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'huge'" in proc.stderr
    proc = subprocess.run([sys.executable, str(bench), "bench", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "-device" in proc.stdout and "--mirroring" in proc.stdout


def test_bench_3d_runs_the_benchmark_when_given_flags_only(monkeypatch) -> None:
    """The commands docs/benchmarks.md shows (`bench_3d.py --size clinical ...`, no subcommand) were refused by
    argparse; flags alone now mean the benchmark, and the subcommands still dispatch."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_3d

    seen = []
    monkeypatch.setattr(bench_3d, "benchmark", lambda args: seen.append(args) or 0)
    assert bench_3d.main(["--work", "/tmp/x", "--size", "clinical", "--mirroring", "off"]) == 0
    args = seen[-1]
    assert (args.command, args.size, args.work, args.mirroring) == ("bench", "clinical", "/tmp/x", "off")
    assert bench_3d.main(["bench", "--size", "small"]) == 0 and seen[-1].size == "small"
    called = []
    monkeypatch.setattr(bench_3d, "predict_child", called.append)
    assert bench_3d.main(["predict", "--model", "m", "--input", "i", "--output", "o"]) == 0 and called


def test_bench_3d_fit_timing_parts(monkeypatch, capsys) -> None:
    """The fit's flags parse as nnUNetv2_fit_ood parses them (short autoencoder and quality schedules), and the
    table's ratio leaves out exactly the two parts with schedules of their own."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_3d

    from nnunet_ood.cli.fit import build_parser
    from nnunet_ood.fitting import FitOptions
    from nnunet_ood.methods import DEFAULT_FIT_METHODS
    from nnunet_ood.methods.quality import QualityConfig
    from nnunet_ood.methods.sd import SDTrainingConfig

    options = FitOptions.from_args(build_parser().parse_args(["-d", "1", "-c", "3d_fullres", *bench_3d.FIT_FLAGS]))
    assert options.methods == DEFAULT_FIT_METHODS and not options.progress
    sd, quality = options.config(SDTrainingConfig), options.config(QualityConfig)
    assert (sd.iterations_per_epoch, sd.max_epochs, sd.batch_size, sd.val_batches) == (4, 2, 2, 1)
    assert quality.corruptions_per_case == 2
    timing = {"validation": 100.0, "validations": [90.0, 110.0], "fit": 400.0, "shared_training": 70.0,
              "failure_table": 200.0, "versions": 2, "features": 12.0, "validation_pass": 105.0}
    assert bench_3d.print_fit_timing(timing)  # (400 - 70 - 200) / 100 = 1.30
    out = capsys.readouterr().out
    assert "| **1.30** | <= 1.5 |" in out and "| 200.0 | 2.00 (1.00 per version) |" in out
    assert "median of 90.0 and 110.0 s" in out and "| 12.0 | 0.12 |" in out and "| 105.0 | 1.05 |" in out
    assert not bench_3d.print_fit_timing(dict(timing, fit=430.0))  # 1.60


def test_bench_3d_sd_floor(monkeypatch, capsys) -> None:
    """The stock child counts patches (not mirrored passes), the decoder subcommand dispatches, and sd's floor is the
    decoder time per patch times the patches over a stock run; each setting with sd splits into 1 + floor + rest."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_3d

    class Predictor:
        def _internal_maybe_mirror_and_predict(self, x):
            return x.shape[0]

    predictor = Predictor()
    seen = bench_3d.count_patches(predictor)
    for batch in (2, 1, 3):
        predictor._internal_maybe_mirror_and_predict(type("X", (), {"shape": (batch, 1, 8, 8)})())
    assert seen == [6]
    called = []
    monkeypatch.setattr(bench_3d, "decoder_child", called.append)
    assert bench_3d.main(["decoder", "--model", "m", "-device", "cpu"]) == 0 and called[0].model == "m"
    monkeypatch.setattr(bench_3d, "child_result", lambda cmd, env: {"decoder_seconds": 0.48, "forward_seconds": 0.8})
    bench_3d.print_sd_floor(Path("m"), {}, "cpu", 240, 200.0, [("default methods", {"seconds": 340.0})])
    out = capsys.readouterr().out
    floor = 240 * 0.48 / 200.0  # 0.576
    assert f"= {floor:.2f} of a stock run" in out and "60% of it" in out
    assert f"1.70 = 1 + {floor:.2f} (sd's decoder call) + {1.70 - 1 - floor:.2f} (everything else)" in out


@pytest.mark.parametrize("command", ["predict", "decoder"])
def test_bench_3d_children_refuse_a_folder_without_a_model(command, tmp_path) -> None:
    bench = SCRIPT.parent / "bench_3d.py"
    extra = ["--input", str(tmp_path), "--output", str(tmp_path / "o")] if command == "predict" else []
    proc = subprocess.run([sys.executable, str(bench), command, "--model", str(tmp_path / "none"), *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no trained fold 0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
