"""The `quality` method against every single method, on the demo's shifts, the corruption family and held-out shifts.

Needs a finished demo (``nnunet_ood_demo -o WORK`` or ``make demo``, which leaves ``demo_output/``). Then::

    python benchmarks/bench_quality.py --demo demo_output [--work FOLDER]

1. Reads the demo's own evaluation (its shifted domains against the ID test cases).
2. Makes two new test sets from the demo's ID test images (and labels): the corruption family (every image with
   every family member, seeded severity) and the held-out shifts (every image with each shift not in the family,
   every severity); spatial corruptions move the label with the image.
3. Predicts both with ``nnUNetv2_predict_ood`` (the demo's model and fit, no change) and evaluates them with
   ``nnUNetv2_evaluate_ood`` against the same ID test cases.
4. Prints, per method: AURC and Spearman on the demo's pooled shifted domains and the realised silent-failure
   rate (accepted and failed, among all cases) on the ID test cases, the corruption family and the held-out
   shifts, next to the stated level; then the issue's ranking targets (quality's AURC at most, its Spearman at
   least, the best single method's) on the demo's shifts, on the held-out shifts and on the new sets pooled;
   then the fit's cost of the failure table as a multiple of its validation pass.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from demo_runs import DATASET, add_demo_arguments, demo_env, demo_paths, demo_trainer, read_rows, run, value

ENDING = ".nii.gz"


def corrupt_folder(images: Path, labels: Path, out_images: Path, out_labels: Path,
                   versions: list[tuple[str, int]], seed: int) -> int:
    """Write every image of ``images`` with every (corruption, severity) of ``versions``; returns the count."""
    from nnunet_ood.quality.corruptions import corrupt

    out_images.mkdir(parents=True, exist_ok=True)
    out_labels.mkdir(parents=True, exist_ok=True)
    n = 0
    for image_file in sorted(images.glob(f"*_0000{ENDING}")):
        case = image_file.name[:-len(f"_0000{ENDING}")]
        image, label = sitk.ReadImage(str(image_file)), sitk.ReadImage(str(labels / f"{case}{ENDING}"))
        array, seg = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
        for name, severity in versions:
            new_case = f"{case}_{name}{severity}"
            case_seed = zlib.crc32(f"{seed}/{new_case}".encode())
            # the demo's 2D images as one channel in nnU-Net's 2D layout (C, 1, H, W)
            layout = (1, 1, *array.shape[-2:]) if array.ndim == 2 or array.shape[0] == 1 else (1, *array.shape)
            x, y = corrupt(array.reshape(layout).astype(np.float32), seg.reshape(layout), name, severity, case_seed)
            outputs = ((x.numpy().reshape(array.shape), image, out_images, f"{new_case}_0000{ENDING}"),
                       (y.numpy().reshape(seg.shape).astype(seg.dtype), label, out_labels, f"{new_case}{ENDING}"))
            for values, reference, folder, file_name in outputs:
                written = sitk.GetImageFromArray(values)
                written.CopyInformation(reference)
                sitk.WriteImage(written, str(folder / file_name))
            n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_demo_arguments(p, "bench_quality")
    args = p.parse_args(argv)
    from nnunet_ood.quality.corruptions import CORRUPTIONS, HELD_OUT_SHIFTS, SEVERITIES

    demo, work = demo_paths(args, "bench_quality")
    raw = demo / "nnunet" / "raw" / DATASET
    env = demo_env(demo)
    trainer = demo_trainer(demo)
    rng = np.random.default_rng(args.seed)
    family = [(c.name, int(rng.choice(SEVERITIES))) for c in CORRUPTIONS]
    held_out = [(c.name, s) for c in HELD_OUT_SHIFTS for s in SEVERITIES]
    sets = {"family": family, "held_out": held_out}
    for name, versions in sets.items():
        if not (work / f"images_{name}").is_dir():
            n = corrupt_folder(raw / "imagesTs_id", raw / "labelsTs_id", work / f"images_{name}",
                               work / f"labels_{name}", versions, args.seed)
            print(f"{name}: {n} cases written")
    run([sys.executable, "-m", "nnunet_ood.cli.predict", "-i", *(str(work / f"images_{s}") for s in sets),
         "-o", *(str(work / f"pred_{s}") for s in sets), "-d", "501", "-c", "2d", "-f", "0", "-tr", trainer,
         "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"], env)
    evaluation = work / "evaluation"
    run([sys.executable, "-m", "nnunet_ood.cli.evaluate", "--id_test", str(demo / "predictions" / "id"),
         str(raw / "labelsTs_id"), *(a for s in sets for a in ("--domain", s, str(work / f"pred_{s}"),
                                                                 str(work / f"labels_{s}"))),
         "-o", str(evaluation), "--no_report"], env)
    demo_rows = read_rows(demo / "evaluation" / "ood_evaluation.csv")
    new_rows = read_rows(evaluation / "ood_evaluation.csv")
    fold = demo / "nnunet" / "results" / DATASET / f"{trainer}__nnUNetPlans__2d" / "fold_0" / "ood"
    manifest = json.loads((fold / "ood_state.json").read_text())
    config = manifest["methods"]["quality"]["config"]
    methods = list(dict.fromkeys(r["method"] for r in demo_rows))
    print(f"\nquality: fail_below {config['fail_below']}, max_silent_failures {config['max_silent_failures']} "
          f"(the stated level); chosen model {config['cross_validation']['chosen']}\n")
    header = ("method", "AURC shifted", "Spearman shifted", "silent ID", "silent family", "silent held-out",
              "accepted ID")
    print("  ".join(f"{h:>16}" for h in header))
    for m in methods:
        cells = [value(demo_rows, m, "all shifted", "aurc"), value(demo_rows, m, "all shifted", "spearman"),
                 value(demo_rows, m, "id_test", "silent_rate"), value(new_rows, m, "family", "silent_rate"),
                 value(new_rows, m, "held_out", "silent_rate"), value(demo_rows, m, "id_test", "coverage")]
        print(f"{m:>16}  " + "  ".join(f"{c:16.3f}" for c in cells))
    for label, rows, domain in (("the demo's shifted domains, pooled", demo_rows, "all shifted"),
                                ("the held-out shifts", new_rows, "held_out"),
                                ("corruption family and held-out shifts, pooled", new_rows, "all shifted")):
        print(f"\non {label} (with the ID test cases):")
        for column, better in (("aurc", min), ("spearman", max)):
            singles = {m: value(rows, m, domain, column) for m in methods if m != "quality"}
            singles = {m: v for m, v in singles.items() if not math.isnan(v)}
            best = better(singles, key=singles.get)
            q = value(rows, "quality", domain, column)
            met = q <= singles[best] if better is min else q >= singles[best]
            print(f"  {column}: quality {q:.3f} vs best single {best} {singles[best]:.3f} -> "
                  f"{'PASS' if met else 'FAIL'}")
    level = config["max_silent_failures"]
    for label, rows, domain in (("ID test", demo_rows, "id_test"), ("corruption family", new_rows, "family"),
                                ("held-out shifts (not covered)", new_rows, "held_out")):
        rate = value(rows, "quality", domain, "silent_rate")
        print(f"realised silent-failure rate, {label}: {rate:.3f} (stated level {level:g})")
    seconds = manifest["provenance"].get("pass_seconds", {})
    if seconds.get("validation"):
        ratio = seconds["failure_table"] / seconds["validation"]
        print(f"fit: failure table {seconds['failure_table']:.1f} s = {ratio:.2f}x the validation pass "
              f"({seconds['validation']:.1f} s; {config['corruptions_per_case']} corrupted versions per validation "
              "case)")


if __name__ == "__main__":
    main()
