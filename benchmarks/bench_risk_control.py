"""The accept/review rules' guarantees by simulation: Learn then Test and conformal risk control.

Each trial draws a calibration set of ``n`` cases from a population of exchangeable cases (a predicted risk and a
failure, i.e. Dice below ``fail_below``), chooses the threshold with the rule as the plugin does
(:func:`nnunet_ood.quality.risk_control.choose_threshold`), and measures on the whole population what the
threshold then does:

* ``ltt``: the share of trials whose failure rate **among accepted** cases exceeds alpha (target: at most delta =
  1 - confidence), the mean coverage (share of all cases accepted) and the oracle coverage (the largest share any
  threshold could accept at rate alpha, known from the population);
* ``crc``: the mean **joint** rate (accepted and failed, among all cases; target: at most alpha), and how often
  its rate among accepted exceeds alpha (what CRC does not bound).

Populations: ``good`` (the risk ranks failures well), ``weak`` (failures rise slowly with the risk), ``flat``
(the risk says nothing), ``failure_table`` (the rows of a CSV with ``oof_risk`` and ``dice`` columns, e.g. a fold's
``quality_calibration.csv``, with ``--table``). Pure numpy/scipy, about a minute on 2 cores for the defaults::

    python benchmarks/bench_risk_control.py [--trials 2000] [--alpha 0.1] [--confidence 0.9] [--table CSV]
"""

from __future__ import annotations

import argparse
import csv
import math

import numpy as np

from nnunet_ood.quality.risk_control import choose_threshold

FAIL_BELOW = 0.6


def synthetic_population(kind: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(risk, failed)`` of ``size`` cases; about 20% fail."""
    risk = rng.beta(2, 6, size)
    if kind == "good":
        p_fail = 1 / (1 + np.exp(-(risk - 0.42) * 14))
    elif kind == "weak":
        p_fail = 0.08 + 0.45 * risk
    else:
        p_fail = np.full(size, 0.2)
    return risk, rng.random(size) < p_fail


def table_population(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(risk, failed)`` of the rows of a failure table (rows with a NaN risk left out)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("oof_risk")]
    return (np.array([float(r["oof_risk"]) for r in rows]),
            np.array([not float(r["dice"]) >= FAIL_BELOW if r["dice"] else True for r in rows]))


class Population:
    """Rates of any threshold on the whole population, by one sort."""

    def __init__(self, risk: np.ndarray, failed: np.ndarray) -> None:
        order = np.argsort(risk, kind="stable")
        self.risk, self.failed = risk[order], failed[order]
        self.cum_failed = np.cumsum(self.failed)

    def rates(self, threshold: float) -> tuple[float, float, float]:
        """``(coverage, rate among accepted, joint rate)``."""
        k = int(np.searchsorted(self.risk, threshold, side="right"))
        if k == 0:
            return 0.0, 0.0, 0.0
        failed = float(self.cum_failed[k - 1])
        return k / len(self.risk), failed / k, failed / len(self.risk)

    def oracle_coverage(self, alpha: float) -> float:
        """The largest share of cases any threshold accepts with at most alpha failing among them."""
        n = np.arange(1, len(self.risk) + 1)
        ends = np.append(np.diff(self.risk) > 0, True)  # only thresholds between distinct risks
        ok = (self.cum_failed / n <= alpha) & ends
        return float(n[ok].max() / len(self.risk)) if ok.any() else 0.0


def run(population: Population, sizes: list[int], trials: int, alpha: float, confidence: float,
        rng: np.random.Generator) -> list[dict]:
    rows = []
    for n in sizes:
        if n >= len(population.risk):
            continue
        ltt_over = crc_over = 0
        ltt_coverage, crc_joint = [], []
        for _ in range(trials):
            pick = rng.choice(len(population.risk), size=n, replace=False)
            risk = population.risk[pick]
            dice = np.where(population.failed[pick], 0.0, 1.0)
            ltt = choose_threshold("ltt", risk, dice, FAIL_BELOW, alpha, confidence).threshold
            coverage, among, _ = population.rates(ltt)
            ltt_over += among > alpha
            ltt_coverage.append(coverage)
            crc = choose_threshold("crc", risk, dice, FAIL_BELOW, alpha).threshold
            _, among, joint = population.rates(crc)
            crc_over += among > alpha
            crc_joint.append(joint)
        rows.append({"n": n, "ltt_exceeds": ltt_over / trials, "ltt_coverage": float(np.mean(ltt_coverage)),
                     "oracle_coverage": population.oracle_coverage(alpha), "crc_joint": float(np.mean(crc_joint)),
                     "crc_exceeds": crc_over / trials})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=2000, help="calibration sets per size (default: 2000)")
    p.add_argument("--alpha", type=float, default=0.1, help="tolerated failure rate (default: 0.1)")
    p.add_argument("--confidence", type=float, default=0.9, help="1 - delta of ltt (default: 0.9)")
    p.add_argument("--sizes", type=int, nargs="+", default=[20, 40, 60, 100, 300], help="calibration set sizes")
    p.add_argument("--table", default=None, help="a failure table CSV (oof_risk, dice) as one more population")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    populations = {kind: Population(*synthetic_population(kind, 200_000, rng)) for kind in ("good", "weak", "flat")}
    if args.table:
        populations["failure_table"] = Population(*table_population(args.table))
    delta = 1 - args.confidence
    tolerance = 3 * math.sqrt(delta * (1 - delta) / args.trials)
    print(f"alpha {args.alpha}, confidence {args.confidence}, {args.trials} calibration sets per size; "
          f"targets: ltt exceeds alpha among accepted in at most {delta:.2f} of them (+{tolerance:.3f} Monte Carlo); "
          f"crc's mean joint rate at most {args.alpha}")
    print(f"{'population':<14}{'n':>5}{'ltt>alpha':>11}{'ltt cover':>11}{'oracle':>8}{'crc joint':>11}"
          f"{'crc>alpha':>11}  met")
    all_met = True
    for name, population in populations.items():
        for row in run(population, args.sizes, args.trials, args.alpha, args.confidence, rng):
            met = row["ltt_exceeds"] <= delta + tolerance and row["crc_joint"] <= args.alpha + tolerance
            all_met &= met
            print(f"{name:<14}{row['n']:>5}{row['ltt_exceeds']:>11.3f}{row['ltt_coverage']:>11.3f}"
                  f"{row['oracle_coverage']:>8.3f}{row['crc_joint']:>11.3f}{row['crc_exceeds']:>11.3f}  "
                  f"{'yes' if met else 'NO'}")
    print("all targets met" if all_met else "some targets NOT met")


if __name__ == "__main__":
    main()
