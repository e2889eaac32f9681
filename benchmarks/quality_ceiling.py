"""Can any one model of the method scores meet the ranking targets on both test pools? A ceiling, with test labels.

The issue's ranking targets ask that ``quality`` rank cases by risk (1 - Dice) at least as well as the best single
method, on the demo's shifted domains and on held-out shifts, where the best single method is picked in hindsight
on each pool. This script asks whether that is possible at all with the scores the plugin computes: it fits models
**on the test pools' own labels** (which no real quality model has) and checks each against the targets on both
pools. If even these fail, no quality model learnt from the failure table can pass.

Needs the CSVs that ``benchmarks/bench_quality.py --demo demo_output`` leaves::

    python benchmarks/quality_ceiling.py --demo demo_output

Pools (each with the 16 ID test cases, as in bench_quality.py): ``demo`` (the demo's shifted domains) and
``held_out`` (the shifts not in the corruption family). Models, all of the methods' case scores:

1. one ridge regression fitted on both pools together, in sample, on the scores scaled as the quality model's ridge
   scales them, or on their empirical CDFs, per alpha;
2. one random forest fitted on both pools together, out of sample (5-fold CV grouped by source image);
3. many random monotone combinations: Dirichlet weights on the scores' empirical CDFs (the count that passes);
4. for contrast, a ridge fitted on each pool alone, in sample (a different model per pool).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

import numpy as np
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold

from nnunet_ood.evaluation.metrics import aurc, average_ranks, spearman
from nnunet_ood.quality.model import robust_scaling, standardise

DEMO_SHIFTS = ("shift_mild", "shift_strong", "far_ood")


def read_cases(path: Path, groups: set[str]) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["group"] in groups]


def source_image(row: dict[str, str]) -> str:
    """A held-out version shares its ID test image's group (``id_003_posterize2`` -> ``id_003``); the demo's
    cases are images of their own."""
    return "_".join(row["case"].split("_")[:2]) if row["group"] == "held_out" else row["case"]


def empirical_cdf(x: np.ndarray) -> np.ndarray:
    """Each score's rank among all cases, on (0, 1] (ties share their mean rank)."""
    return np.stack([average_ranks(column) for column in x.T], axis=1) / len(x)


def targets_met(pred: np.ndarray, risk: np.ndarray, best: tuple[float, float]) -> tuple[float, float, bool]:
    a, s = aurc(pred, risk), spearman(pred, risk)
    return a, s, bool(a <= best[0] and s >= best[1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", required=True, help="the demo's output folder, after bench_quality.py")
    p.add_argument("--work", default=None, help="bench_quality.py's --work (default: DEMO/bench_quality)")
    p.add_argument("--combinations", type=int, default=20000, help="random monotone combinations to try")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    demo = Path(args.demo)
    work = Path(args.work) if args.work else demo / "bench_quality"
    for needed in (demo / "evaluation" / "ood_cases.csv", work / "evaluation" / "ood_cases.csv"):
        if not needed.is_file():
            sys.exit(f"error: {needed} is missing; run the demo (make demo) and then "
                     f"python benchmarks/bench_quality.py --demo {demo} first")
    rows = (read_cases(demo / "evaluation" / "ood_cases.csv", {"id_test", *DEMO_SHIFTS})
            + read_cases(work / "evaluation" / "ood_cases.csv", {"held_out"}))
    methods = [c[: -len("_score")] for c in rows[0] if c.endswith("_score") and c != "quality_score"]
    x = np.array([[float(r[f"{m}_score"]) for m in methods] for r in rows])
    risk = 1 - np.array([float(r["dice"]) for r in rows])
    quality = np.array([float(r["quality_score"]) for r in rows])
    group = np.array([r["group"] for r in rows])
    pools = {"demo": group != "held_out", "held_out": np.isin(group, ["id_test", "held_out"])}
    keep = np.isfinite(x).all(axis=1)
    if not keep.all():
        print(f"({(~keep).sum()} cases with a missing score left out)")
        x, risk, quality, group = x[keep], risk[keep], quality[keep], group[keep]
        pools = {k: v[keep] for k, v in pools.items()}

    best = {}
    print("pool       n  best single AURC      best single Spearman  quality AURC / Spearman")
    for name, m in pools.items():
        singles = [(aurc(x[m, j], risk[m]), spearman(x[m, j], risk[m]), methods[j]) for j in range(len(methods))]
        a, s = min(singles), max(singles, key=lambda t: t[1])
        best[name] = (a[0], s[1])
        print(f"{name:9} {m.sum():3d}  {a[0]:.3f} ({a[2]:12})  {s[1]:.3f} ({s[2]:12})  "
              f"{aurc(quality[m], risk[m]):.3f} / {spearman(quality[m], risk[m]):.3f}")

    def report(label: str, pred_by_pool: dict[str, np.ndarray]) -> None:
        cells = [targets_met(pred_by_pool[k], risk[m], best[k]) for k, m in pools.items()]
        text = "  ".join(f"{k} {a:.3f}/{s:.3f} {'PASS' if ok else 'fail'}" for k, (a, s, ok) in zip(pools, cells))
        print(f"  {label:52} {text}  -> {'BOTH' if all(c[2] for c in cells) else 'not both'}")

    print("\nceilings (AURC/Spearman on each pool, against that pool's best single method):")
    # "scaled": the quality model's own robust scaling and clip for its ridge candidates
    features = {"scaled": standardise(x, *robust_scaling(x)), "ranks": empirical_cdf(x)}
    for (kind, z), alpha in itertools.product(features.items(), (0.1, 1.0, 10.0, 100.0)):
        pred = Ridge(alpha=alpha).fit(z, risk).predict(z)
        report(f"1. one ridge, both pools, in sample, {kind}, a={alpha:g}", {k: pred[m] for k, m in pools.items()})
    source = np.array([source_image(r) for r, k in zip(rows, keep) if k])
    pred = np.zeros_like(risk)
    for train, test in GroupKFold(5).split(x, risk, source):
        forest = RandomForestRegressor(300, min_samples_leaf=3, random_state=args.seed)
        pred[test] = forest.fit(x[train], risk[train]).predict(x[test])
    report("2. one random forest, both pools, grouped CV", {k: pred[m] for k, m in pools.items()})
    cdf = features["ranks"]
    weights = np.random.default_rng(args.seed).dirichlet(np.full(len(methods), 0.3), size=args.combinations)
    passed = 0
    for w in weights:
        combined = cdf @ w
        passed += all(targets_met(combined[m], risk[m], best[k])[2] for k, m in pools.items())
    print(f"  3. random monotone combinations passing on both pools: {passed} of {args.combinations}")
    z = features["scaled"]
    fitted = {k: Ridge(alpha=0.1).fit(z[m], risk[m]).predict(z[m]) for k, m in pools.items()}
    report("4. a ridge per pool, in sample, a=0.1", fitted)


if __name__ == "__main__":
    main()
