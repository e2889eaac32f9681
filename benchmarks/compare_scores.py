"""Compare the score tables of two prediction runs, case by case and method by method.

    python benchmarks/compare_scores.py BEFORE AFTER [--rtol 1e-6]

BEFORE and AFTER are prediction folders of ``nnUNetv2_predict_ood`` (each with ``ood_scores.csv``) or
folders holding one such folder per group (e.g. the demo's ``predictions/``). Every (group, case,
method) must be in both; ``score`` and ``normalized`` must agree to ``rtol`` relative (``atol`` for
values near zero) and the ``ood`` flags must be equal. Prints the largest differences per method and
exits with 1 when anything disagrees. Used to show that a refactoring preserves behaviour
(docs/benchmarks.md, "Behaviour preserved").
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from nnunet_ood.errors import OODInputError
from nnunet_ood.io.score_reader import ScoreRow, read_score_rows

CSV_NAME = "ood_scores.csv"


def read_tables(folder: Path) -> dict[tuple[str, str, str], ScoreRow]:
    """``(group, case, method) -> row`` from ``folder/ood_scores.csv`` or ``folder/*/ood_scores.csv``."""
    tables = [folder / CSV_NAME] if (folder / CSV_NAME).is_file() else sorted(folder.glob(f"*/{CSV_NAME}"))
    if not tables:
        raise SystemExit(f"error: no {CSV_NAME} in {folder} or its subfolders")
    rows = {}
    for table in tables:
        group = table.parent.name if table.parent != folder else "."
        try:  # the plugin's own reader: a damaged table is named, never compared as something else
            read = read_score_rows(str(table.parent))
        except OODInputError as e:
            raise SystemExit(f"error: {e}") from None
        for row in read:
            rows[(group, row["case"], row["method"])] = row
    return rows


def relative_difference(a: float, b: float, atol: float) -> float:
    """|a - b| / max(|a|, |b|), 0 for equal values (NaN = NaN) and for differences below ``atol``."""
    if math.isnan(a) and math.isnan(b) or a == b:
        return 0.0
    if math.isnan(a) or math.isnan(b):
        return math.inf
    diff = abs(a - b)
    return 0.0 if diff <= atol else diff / max(abs(a), abs(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance (default: 1e-6)")
    parser.add_argument("--atol", type=float, default=1e-12, help="absolute tolerance near zero (default: 1e-12)")
    args = parser.parse_args(argv)
    before, after = read_tables(args.before), read_tables(args.after)
    ok = True
    if set(before) != set(after):
        only = sorted(set(before) ^ set(after))
        print(f"{len(only)} (group, case, method) rows are in one table only, e.g. {only[:3]}")
        ok = False
    worst: dict[str, dict[str, float]] = {}
    flips = 0
    for key in sorted(set(before) & set(after)):
        b, a = before[key], after[key]
        entry = worst.setdefault(key[2], {"score": 0.0, "normalized": 0.0, "n": 0})
        entry["n"] += 1
        for column in ("score", "normalized"):
            entry[column] = max(entry[column], relative_difference(float(b[column]), float(a[column]), args.atol))
        flips += b["ood"] != a["ood"]
    print(f"{len(set(before) & set(after))} rows compared, rtol {args.rtol:g}")
    print("| method | rows | max rel. diff. score | max rel. diff. normalized |")
    print("|---|---:|---:|---:|")
    for method, entry in worst.items():
        print(f"| {method} | {entry['n']} | {entry['score']:.2e} | {entry['normalized']:.2e} |")
        ok &= entry["score"] <= args.rtol and entry["normalized"] <= args.rtol
    print(f"ood flags that differ: {flips}")
    ok &= flips == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
