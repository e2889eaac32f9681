"""Benchmark: MahalanobisDetector against scikit-learn's EmpiricalCovariance.

Side by side on the same synthetic, well-conditioned float32 features (covariance eigenvalues
in [1, 10], rotated by random Householder reflections, non-zero mean):

* fit time: sklearn ``EmpiricalCovariance().fit`` (what the paper's reference code uses) vs
  our detector with ``shrinkage=0`` streamed in batches of ``--fit-batch`` rows, including
  the Cholesky factorisation;
* score time for one batch of ``--batch`` rows, and the largest relative difference between
  the two sets of squared distances;
* memory added by our fit (peak RSS during the fit minus RSS before it, Linux) for N and
  ``--mem-factor`` x N rows, each in a fresh subprocess that generates every batch on the fly
  (no N x D array ever exists);
* the floor: the same rows as one float64 N x D array (built before the clock starts), one
  ``X^T X`` and one Cholesky factorisation, timed in the same process right after our fit. Our fit
  (streamed, centred, plus the Ledoit-Wolf trace terms) is printed as a multiple of it; target at
  most 1.5x, so that a regression of the D x D statistics shows.

sklearn is given a float64 copy of the float32 features so that it is an exact reference for
the accuracy check (copy not timed). sklearn runs in a subprocess so that its fit can be
stopped after ``--sklearn-timeout`` seconds; then the fit ratio is reported as a lower bound
and the scoring comparison uses sklearn's own scoring path (``pairwise_distances`` with
``metric="mahalanobis"``, which ``EmpiricalCovariance.mahalanobis`` calls) with the precision
matrix from ``numpy.linalg.inv`` of ``numpy.cov``.

Usage::

    python benchmarks/bench_mahalanobis.py                 # D = 4608 and 10000, N = 10000
    python benchmarks/bench_mahalanobis.py --quick         # small smoke run (about a minute)
    python benchmarks/bench_mahalanobis.py --floor-only    # our fit against the floor only (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from machine import machine_description

FIT_TARGET = 8.0  # sklearn fit time / our fit time
SCORE_TARGET = 20.0  # sklearn score time / our score time
ACCURACY_TARGET = 1e-6  # max relative difference of distances
MEMORY_TARGET = 1.10  # peak memory at mem_factor * N / peak memory at N ("~1.0")
FLOOR_TARGET = 1.5  # our fit time / (float64 X^T X + one Cholesky) time
N_REFLECTIONS = 8
SCORE_INDEX = 1_000_000  # batch index reserved for the scoring batch


# ---------------------------------------------------------------------------- synthetic data
@dataclass
class Synthetic:
    """Gaussian features with covariance Q diag(eigenvalues) Q^T and a non-zero mean.

    Q is a product of random Householder reflections: orthogonal, dense, and applied to a batch
    in O(rows * D) without ever forming a D x D matrix, so data generation stays cheap.
    """

    dim: int
    seed: int

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.dim)
        self.scale = torch.sqrt(1.0 + 9.0 * torch.rand(self.dim, generator=gen))  # eigenvalues in [1, 10]
        self.mean = 4.0 * torch.rand(self.dim, generator=gen) - 2.0
        v = torch.randn(N_REFLECTIONS, self.dim, generator=gen)
        self.reflections = v / v.norm(dim=1, keepdim=True)

    def batch(self, index: int, rows: int) -> torch.Tensor:
        """Rows of batch ``index`` (deterministic in any process), float32 (rows, D)."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.dim) * 7_919 + index)
        z = torch.randn(rows, self.dim, generator=gen) * self.scale
        for v in self.reflections:
            z -= 2.0 * (z @ v).unsqueeze(1) * v
        return (z + self.mean).to(torch.float32)

    def batches(self, n: int, rows: int):
        """Yield the training set of n rows as batches of at most ``rows`` rows."""
        for index, start in enumerate(range(0, n, rows)):
            yield self.batch(index, min(rows, n - start))


# ---------------------------------------------------------------------------- workers
def _worker_sklearn(args: argparse.Namespace) -> None:
    from sklearn.covariance import EmpiricalCovariance

    data = Synthetic(args.dim, args.seed)
    x = torch.cat(list(data.batches(args.n, args.fit_batch))).numpy().astype(np.float64)
    y = data.batch(SCORE_INDEX, args.batch).numpy().astype(np.float64)
    t0 = time.perf_counter()
    model = EmpiricalCovariance().fit(x)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    dist = model.mahalanobis(y)
    t_score = time.perf_counter() - t0
    np.save(os.path.join(args.out, "distances.npy"), dist, allow_pickle=False)
    with open(os.path.join(args.out, "result.json"), "w") as fh:
        json.dump({"fit_s": t_fit, "score_s": t_score}, fh)


def _worker_sklearn_score(args: argparse.Namespace) -> None:
    """Fallback when the sklearn fit timed out: sklearn's scoring path with an inv() precision."""
    from sklearn.metrics import pairwise_distances

    data = Synthetic(args.dim, args.seed)
    x = torch.cat(list(data.batches(args.n, args.fit_batch))).numpy().astype(np.float64)
    y = data.batch(SCORE_INDEX, args.batch).numpy().astype(np.float64)
    location = x.mean(axis=0)
    precision = np.linalg.inv(np.cov(x.T, bias=True))
    del x
    t0 = time.perf_counter()
    dist = pairwise_distances(y, location[np.newaxis, :], metric="mahalanobis", VI=precision)
    dist = np.reshape(dist, (len(y),)) ** 2
    t_score = time.perf_counter() - t0
    np.save(os.path.join(args.out, "distances.npy"), dist, allow_pickle=False)
    with open(os.path.join(args.out, "result.json"), "w") as fh:
        json.dump({"fit_s": None, "score_s": t_score}, fh)


def _proc_status_kib(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _worker_memory(args: argparse.Namespace) -> None:
    from nnunet_ood.detectors.mahalanobis import MahalanobisDetector

    data = Synthetic(args.dim, args.seed)
    detector = MahalanobisDetector(shrinkage=0.0)
    # reset the peak-RSS mark (Linux clear_refs "5") so that imports do not hide the fit's own peak
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base_kib = _proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    for batch in data.batches(args.n, args.fit_batch):  # generated on the fly
        detector.partial_fit(batch)
    detector.factorize()
    elapsed = time.perf_counter() - t0
    peak_kib = _proc_status_kib("VmHWM")
    with open(os.path.join(args.out, "result.json"), "w") as fh:
        json.dump({"peak_mib": peak_kib / 1024, "base_mib": base_kib / 1024, "fit_s": elapsed}, fh)


def _run_worker(kind: str, args: argparse.Namespace, dim: int, n: int, out: str,
                timeout: float | None = None) -> dict | None:
    """Run a worker in a fresh interpreter; returns its JSON result or None on timeout."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--dim", str(dim), "--n", str(n),
           "--batch", str(args.batch), "--fit-batch", str(args.fit_batch), "--seed", str(args.seed),
           "--out", out]
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "result.json")) as fh:
        return json.load(fh)


# ---------------------------------------------------------------------------- benchmark
def _timed_fit(data: Synthetic, n: int, fit_batch: int):
    from nnunet_ood.detectors.mahalanobis import MahalanobisDetector

    batches = list(data.batches(n, fit_batch))  # generated up front: not part of the timing
    detector = MahalanobisDetector(shrinkage=0.0)
    t0 = time.perf_counter()
    for batch in batches:
        detector.partial_fit(batch)
    detector.factorize()
    return detector, time.perf_counter() - t0


def _timed_floor(data: Synthetic, n: int, fit_batch: int) -> float:
    """Seconds for the least any fit must do: float64 X^T X of the N rows and one Cholesky factorisation."""
    x = torch.cat(list(data.batches(n, fit_batch))).double()  # built before the clock starts
    t0 = time.perf_counter()
    scatter = x.T @ x
    scatter.diagonal().add_(1e-6 * float(scatter.diagonal().mean()))  # N may be <= D: keep it definite
    torch.linalg.cholesky(scatter)
    return time.perf_counter() - t0


def bench_floor(dim: int, args: argparse.Namespace) -> dict:
    """Our fit and the floor, alternating (median of three each)."""
    data = Synthetic(dim, args.seed)
    fits, floors = [], []
    for _ in range(3):
        fits.append(_timed_fit(data, args.n, args.fit_batch)[1])
        floors.append(_timed_floor(data, args.n, args.fit_batch))
    return {"dim": dim, "n": args.n, "ours_fit_s": sorted(fits)[1], "floor_s": sorted(floors)[1]}


def floor_line(r: dict) -> str:
    ratio = r["ours_fit_s"] / r["floor_s"]
    return (f"| {r['dim']} | fit as a multiple of float64 X^T X + one Cholesky (s) | floor {r['floor_s']:.2f} | "
            f"{r['ours_fit_s']:.2f} | {ratio:.2f}x | <= {FLOOR_TARGET:g}x | {_verdict(ratio <= FLOOR_TARGET)} |")


def bench_dim(dim: int, args: argparse.Namespace) -> dict:
    """All measurements for one feature dimension."""
    log = print if args.verbose else (lambda *a, **k: None)
    data = Synthetic(dim, args.seed)
    result: dict = {"dim": dim, "n": args.n}

    log(f"[D={dim}] our fit ...", flush=True)
    detector, result["ours_fit_s"] = _timed_fit(data, args.n, args.fit_batch)
    result["floor_s"] = _timed_floor(data, args.n, args.fit_batch)
    y = data.batch(SCORE_INDEX, args.batch)
    detector.score(y)  # warm-up (thread pools, allocator)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        ours = detector.score(y)
        times.append(time.perf_counter() - t0)
    result["ours_score_s"] = sorted(times)[1]
    ours = ours.cpu().numpy()
    del detector

    with tempfile.TemporaryDirectory() as tmp:
        log(f"[D={dim}] sklearn fit + score (timeout {args.sklearn_timeout:.0f} s) ...", flush=True)
        sk = _run_worker("sklearn", args, dim, args.n, tmp, timeout=args.sklearn_timeout)
        result["sklearn_fit_timed_out"] = sk is None
        if sk is None:
            log(f"[D={dim}] sklearn fit timed out; scoring with sklearn's path and an inv() precision",
                flush=True)
            sk = _run_worker("sklearn-score", args, dim, args.n, tmp)
        assert sk is not None
        reference = np.load(os.path.join(tmp, "distances.npy"), allow_pickle=False)
    result["sklearn_fit_s"] = sk["fit_s"]
    result["sklearn_score_s"] = sk["score_s"]
    result["max_rel_diff"] = float(np.max(np.abs(ours - reference) / np.abs(reference)))

    for factor in (1, args.mem_factor):
        log(f"[D={dim}] peak memory of our fit, N={factor * args.n} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            mem = _run_worker("memory", args, dim, factor * args.n, tmp)
        assert mem is not None
        result[f"mem_{factor}_mib"] = mem["peak_mib"]
        result[f"mem_{factor}_base_mib"] = mem["base_mib"]
        result[f"mem_{factor}_fit_s"] = mem["fit_s"]
    for factor in (1, args.mem_factor):  # what the fit itself added on top of the process at its start
        result[f"mem_{factor}_growth_mib"] = result[f"mem_{factor}_mib"] - result[f"mem_{factor}_base_mib"]
    result["mem_ratio"] = result[f"mem_{args.mem_factor}_growth_mib"] / result["mem_1_growth_mib"]
    result["dd_float64_mib"] = dim * dim * 8 / 2**20
    return result


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def format_table(results: list[dict], args: argparse.Namespace) -> str:
    """Markdown table of times, ratios and verdicts."""
    lines = [
        "| D | measure | sklearn | ours | ratio | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d = r["dim"]
        if r["sklearn_fit_timed_out"]:
            lower = args.sklearn_timeout / r["ours_fit_s"]
            lines.append(f"| {d} | fit, N={r['n']} (s) | > {args.sklearn_timeout:.0f} (stopped) | "
                         f"{r['ours_fit_s']:.2f} | >= {lower:.1f}x | >= {FIT_TARGET:g}x | "
                         f"{'PASS (lower bound)' if lower >= FIT_TARGET else 'unknown (stopped early)'} |")
        else:
            ratio = r["sklearn_fit_s"] / r["ours_fit_s"]
            lines.append(f"| {d} | fit, N={r['n']} (s) | {r['sklearn_fit_s']:.2f} | {r['ours_fit_s']:.2f} | "
                         f"{ratio:.1f}x | >= {FIT_TARGET:g}x | {_verdict(ratio >= FIT_TARGET)} |")
        lines.append(floor_line(r))
        ratio = r["sklearn_score_s"] / r["ours_score_s"]
        lines.append(f"| {d} | score {args.batch} rows (s) | {r['sklearn_score_s']:.3f} | "
                     f"{r['ours_score_s']:.4f} | {ratio:.1f}x | >= {SCORE_TARGET:g}x | "
                     f"{_verdict(ratio >= SCORE_TARGET)} |")
        if r["n"] > d:
            lines.append(f"| {d} | max rel. diff of distances | | {r['max_rel_diff']:.1e} | | "
                         f"<= {ACCURACY_TARGET:g} | {_verdict(r['max_rel_diff'] <= ACCURACY_TARGET)} |")
        else:  # rank(S) <= N - 1 < D: no well-conditioned reference exists
            lines.append(f"| {d} | max rel. diff of distances | | {r['max_rel_diff']:.1e} | | "
                         f"n/a: N <= D, covariance singular | sklearn pseudo-inverse vs our jittered Cholesky |")
        m = args.mem_factor
        lines.append(f"| {d} | memory added by our fit, N={r['n']} vs {m}N (MiB; D x D float64 = "
                     f"{r['dd_float64_mib']:.0f}) | | {r['mem_1_growth_mib']:.0f} / "
                     f"{r[f'mem_{m}_growth_mib']:.0f} | {r['mem_ratio']:.3f} | ~1.0 (<= {MEMORY_TARGET:g}) | "
                     f"{_verdict(r['mem_ratio'] <= MEMORY_TARGET)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 if every target passed, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", help="feature dimensions D (default 4608 10000)")
    parser.add_argument("--n", type=int, help="training rows N (default 10000)")
    parser.add_argument("--batch", type=int, default=256, help="rows in the scored batch")
    parser.add_argument("--fit-batch", type=int, default=1024, help="rows per streamed training batch")
    parser.add_argument("--mem-factor", type=int, default=4, help="memory is compared for N and this x N")
    parser.add_argument("--sklearn-timeout", type=float, default=600.0,
                        help="seconds after which the sklearn fit is stopped (ratio becomes a lower bound)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="small smoke run: default D = 128 256, N = 2000, sklearn timeout <= 120 s")
    parser.add_argument("--floor-only", action="store_true",
                        help="only our fit against its floor (float64 X^T X + one Cholesky), no sklearn, no memory")
    parser.add_argument("--json", help="also write the raw results to this JSON file")
    parser.add_argument("--quiet", dest="verbose", action="store_false", help="only print the table")
    parser.add_argument("--worker", choices=["sklearn", "sklearn-score", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        {"sklearn": _worker_sklearn, "sklearn-score": _worker_sklearn_score,
         "memory": _worker_memory}[args.worker](args)
        return 0
    if args.quick:
        args.dims, args.n = args.dims or [128, 256], args.n or 2000
        args.sklearn_timeout = min(args.sklearn_timeout, 120.0)
    else:
        args.dims, args.n = args.dims or [4608, 10000], args.n or 10000

    print(f"Machine: {machine_description()}")
    print(f"Command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}", flush=True)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    if args.floor_only:
        results = [bench_floor(dim, args) for dim in args.dims]
        header = ["| D | measure | reference | ours | ratio | target | verdict |", "|---|---|---|---|---|---|---|"]
        table = "\n".join([*header, *(floor_line(r) for r in results)])
    else:
        results = [bench_dim(dim, args) for dim in args.dims]
        table = format_table(results, args)
    print()
    print(table)
    load = os.getloadavg()
    print(f"\n(total wall time {time.perf_counter() - t0:.0f} s; load average at start {load0[0]:.1f}, "
          f"at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min))")
    if args.quick:
        print("--quick is a smoke run: the targets are meant for D in the thousands, where the O(D^3) "
              "and O(N D^2) work dominates fixed overheads; verdicts above are informational.")
    if args.json:
        with open(args.json, "w") as fh:
            payload = {"machine": machine_description(), "args": vars(args), "results": results}
            json.dump(payload, fh, indent=2)
    return 0 if args.quick or "FAIL" not in table else 1


if __name__ == "__main__":
    sys.exit(main())
