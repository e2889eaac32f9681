"""The accept/review decision on held-out shifts outside the corruption family, with the gate calibrated on a
site's unlabelled new-subject in-distribution scans.

Needs a finished demo (``make demo`` leaves ``demo_output/``, with the calibration ``site`` made from 40 new ID
scans without labels). Then::

    python benchmarks/bench_decision.py --demo demo_output [--work FOLDER] [--n 16]

Makes four kinds of shift none of the plugin's code has seen (new subjects of the demo's anatomy, two
severities each; labels follow the image):

* ``unseen_pathology``: a bright round structure outside the organs (radius 3 / 6 pixels), labelled background;
* ``contrast_swap``: organs darker than the background and lesions much brighter (a contrast under which the
  model is confidently wrong);
* ``cropped_fov``: the central 70% / 50% of the field of view;
* ``low_resolution``: acquired at 2x / 3x coarser pixels (block means; the spacing says so).

Predicts them with ``nnUNetv2_predict_ood --calibration site`` (the demo's model, fit and site calibration),
evaluates them with ``nnUNetv2_evaluate_ood`` against the demo's ID test cases (predicted with the same
calibration), and prints, for ``quality`` and every single method's flag: per shift the share of cases accepted
and failed, pooled over the shifts the failures among accepted, and the ID test coverage; then the issue's
targets at the fit's alpha (at most 2 alpha of each shift's cases accepted and failed; pooled failures among
accepted at most alpha; at least 85% of ID test cases accepted; coverage at risk alpha at least max_softmax's and
within 0.05 of the best single method's, on the shifts pooled).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from demo_runs import DATASET, add_demo_arguments, demo_env, demo_paths, demo_trainer, read_rows, run, value

from nnunet_ood.io.score_reader import read_score_document

ENDING = ".nii.gz"
SHIFTS = ("unseen_pathology", "contrast_swap", "cropped_fov", "low_resolution")
SEVERITIES = (1, 2)


def shifted_case(kind: str, severity: int, rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray,
                                                                                            float]:
    """``(image, label, pixel scale)``: a new subject of the demo's anatomy under one shift."""
    from nnunet_ood.demo.synthetic import _SCANNERS, _acquire, _anatomy, _ellipse, _grid

    label = _anatomy(rng, size)
    scanner = _SCANNERS["id"]
    if kind == "contrast_swap":
        scanner = type(scanner)(**{**scanner.__dict__, "organ_contrast": -0.3 * severity, "lesion_contrast": 1.5})
    image = _acquire(rng, label, scanner)
    if kind == "unseen_pathology":
        yy, xx = _grid(size)
        outside = np.argwhere(label == 0)
        cy, cx = outside[rng.integers(len(outside))]
        blob = _ellipse(yy, xx, cy, cx, 3.0 * severity, 3.0 * severity, 0.0) & (label == 0)
        image = np.where(blob, image.max() * 1.2, image).astype(np.float32)
    elif kind == "cropped_fov":
        keep = int(round(size * (0.7 if severity == 1 else 0.5)))
        start = (size - keep) // 2
        return image[start:start + keep, start:start + keep], label[start:start + keep, start:start + keep], 1.0
    elif kind == "low_resolution":
        k = severity + 1
        n = size // k
        blocks = image[:n * k, :n * k].reshape(n, k, n, k).mean(axis=(1, 3)).astype(np.float32)
        return blocks, label[k // 2::k, k // 2::k][:n, :n], float(k)
    return image, label, 1.0


def write_sets(work: Path, n: int, seed: int) -> None:
    from nnunet_ood.demo.synthetic import DEMO_ORIGIN, DEMO_SPACING

    for s_idx, kind in enumerate(SHIFTS):
        images, labels = work / f"images_{kind}", work / f"labels_{kind}"
        if images.is_dir():
            continue
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for severity in SEVERITIES:
            for i in range(n):
                rng = np.random.default_rng(np.random.SeedSequence([seed, 100 + s_idx, severity, i]))
                image, label, scale = shifted_case(kind, severity, rng)
                case = f"{kind}{severity}_{i:03d}"
                for array, path in ((image, images / f"{case}_0000{ENDING}"), (label.astype(np.uint8),
                                                                               labels / f"{case}{ENDING}")):
                    itk = sitk.GetImageFromArray(array)
                    itk.SetSpacing(tuple(s * scale for s in DEMO_SPACING))
                    itk.SetOrigin(DEMO_ORIGIN)
                    sitk.WriteImage(itk, str(path))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_demo_arguments(p, "bench_decision")
    p.add_argument("--n", type=int, default=16, help="new subjects per shift and severity (default: 16)")
    p.add_argument("--calibration", default="site", help="the site calibration to predict with (default: site)")
    args = p.parse_args(argv)
    demo, work = demo_paths(args, "bench_decision")
    results = demo / "nnunet" / "results" / DATASET
    env = demo_env(demo)
    trainer = demo_trainer(demo)
    model = results / f"{trainer}__nnUNetPlans__2d"
    if not (model / "ood_calibrations" / f"{args.calibration}.json").is_file():
        sys.exit(f"error: {model} has no calibration {args.calibration}; run a current `make demo` (it makes one) "
                 "or nnUNetv2_calibrate_ood on new in-distribution scans")
    write_sets(work, args.n, args.seed)
    raw = demo / "nnunet" / "raw" / DATASET
    folders = {"id_test": (raw / "imagesTs_id", raw / "labelsTs_id")}
    folders.update({k: (work / f"images_{k}", work / f"labels_{k}") for k in SHIFTS})
    run([sys.executable, "-m", "nnunet_ood.cli.predict", "-i", *(str(i) for i, _ in folders.values()),
         "-o", *(str(work / f"pred_{k}") for k in folders), "-d", "501", "-c", "2d", "-f", "0", "-tr", trainer,
         "-device", "cpu", "-npp", "0", "-nps", "0", "--calibration", args.calibration,
         "--disable_progress_bar"], env, quiet=True)
    evaluation = work / "evaluation"
    run([sys.executable, "-m", "nnunet_ood.cli.evaluate", "--id_test", str(work / "pred_id_test"),
         str(folders["id_test"][1]), *(a for k in SHIFTS for a in ("--domain", k, str(work / f"pred_{k}"),
                                                                   str(folders[k][1]))),
         "-o", str(evaluation), "--no_report"], env, quiet=True)
    rows = read_rows(evaluation / "ood_evaluation.csv")
    rules = read_score_document(str(work / "pred_id_test"))["decision_rules"]
    deciding = next(iter(rules))
    alpha = rules[deciding]["max_silent_failures"]
    print(f"\n{deciding}: {rules[deciding]['statement']}\n")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    header = ["method", "ID accepted", *(f"{k} acc+fail" for k in SHIFTS), "pooled fail|acc", "pooled accepted"]
    print("  ".join(f"{h:>20}" for h in header))
    for m in methods:
        cells = [value(rows, m, "id_test", "coverage"), *(value(rows, m, k, "silent_rate") for k in SHIFTS),
                 value(rows, m, "all shifted", "silent_rate_accepted"), value(rows, m, "all shifted", "coverage")]
        print(f"{m:>20}  " + "  ".join(f"{c:20.3f}" for c in cells))
    print(f"\ncoverage at risk {alpha:g} (the largest share any threshold of the score could accept with at most "
          f"{alpha:g} of the accepted failing), on the shifted cases pooled:")
    coverage = {m: value(rows, m, "all shifted", "coverage_at_risk") for m in methods}
    for m, c in sorted(coverage.items(), key=lambda kv: -kv[1] if not math.isnan(kv[1]) else 1):
        print(f"  {m:>20}: {c:.3f}")
    mean_dice = {k: value(rows, deciding, k, "mean_dice") for k in SHIFTS}
    print("\nmean Dice per shift: " + ", ".join(f"{k} {v:.2f}" for k, v in mean_dice.items()))
    print(f"\ntargets for {deciding} at alpha {alpha:g}:")
    checks = [(f"{k}: accepted and failed <= {2 * alpha:g}", value(rows, deciding, k, "silent_rate"), 2 * alpha, max)
              for k in SHIFTS]
    checks += [(f"pooled over the shifts: failures among accepted <= {alpha:g}",
                value(rows, deciding, "all shifted", "silent_rate_accepted"), alpha, max),
               ("ID test cases accepted >= 0.85", value(rows, deciding, "id_test", "coverage"), 0.85, min)]
    singles = {m: c for m, c in coverage.items() if m != deciding and not math.isnan(c)}
    best = max(singles, key=singles.get) if singles else None
    if "max_softmax" in singles:
        checks.append((f"coverage at risk >= max_softmax's ({singles['max_softmax']:.3f})", coverage[deciding],
                       singles["max_softmax"], min))
    if best is not None:
        checks.append((f"coverage at risk within 0.05 of the best single method's ({best} {singles[best]:.3f})",
                       coverage[deciding], singles[best] - 0.05, min))
    for label, got, bound, kind in checks:
        met = (got <= bound) if kind is max else (got >= bound)
        met = met or (math.isnan(got) and kind is max)  # nothing accepted: no failure among accepted
        print(f"  {label}: {got:.3f} -> {'PASS' if met else 'FAIL'}")


if __name__ == "__main__":
    main()
