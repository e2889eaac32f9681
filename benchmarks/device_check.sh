#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests, then the 2D and 3D overhead benchmarks with their ratios.
#
#   bash benchmarks/device_check.sh [--out DIR] [--python PY] [--quick] [--dry-run]
#
# Steps (each with its own time limit, log in DIR/<step>.log, a one-line verdict on stdout):
#   environment  python, torch, CUDA device, nnU-Net and this package importable
#   cuda_tests   pytest -m cuda: every test marked as needing CUDA (skipped elsewhere)
#   bench_2d     benchmarks/bench_inference.py -device cuda: logits path and files path against stock
#   bench_3d     benchmarks/bench_3d.py --size small -device cuda: time, memory and disk against stock in 3D
# About 6-8 minutes on one H100 (--quick: bench_3d without mirroring, about 5). Nothing here runs on the CPU
# machines or in CI; without a CUDA device the environment step stops the script with exit status 3.
# Needs nnU-Net v2 and this package's requirements importable by PY (carry wheels where the machine has none).
set -uo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

OUT_DIR=device_check_out
PY=${PYTHON:-python3}
QUICK=0
DRY=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 && -n "$2" ]] || { echo "device_check.sh: --out needs a folder" >&2; exit 2; }
               OUT_DIR=$2; shift 2 ;;
        --python) [[ $# -ge 2 && -n "$2" ]] || { echo "device_check.sh: --python needs an interpreter" >&2; exit 2; }
                  PY=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "device_check.sh: unknown argument '$1'; see --help" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK="$OUT_DIR/work"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 nnUNet_compile=0

MIRROR_FLAG=""
[[ $QUICK -eq 1 ]] && MIRROR_FLAG="--mirroring off"
declare -a NAMES LIMITS COMMANDS
add() { NAMES+=("$1"); LIMITS+=("$2"); COMMANDS+=("$3"); }
add environment 30 "$PY -c 'import torch, nnunetv2, nnunet_ood; assert torch.cuda.is_available(), \"no CUDA device\"; print(torch.__version__, torch.cuda.get_device_name(0))'"
add cuda_tests 120 "$PY -m pytest -q -m cuda -p no:cacheprovider $ROOT/tests"
add bench_2d 120 "$PY $ROOT/benchmarks/bench_inference.py -device cuda --repeats 3 --work $WORK/bench_2d"
add bench_3d 210 "$PY $ROOT/benchmarks/bench_3d.py bench --size small -device cuda --work $WORK/bench_3d $MIRROR_FLAG"

if [[ $DRY -eq 1 ]]; then
    for i in "${!NAMES[@]}"; do
        echo "${NAMES[$i]} (at most ${LIMITS[$i]} s): ${COMMANDS[$i]}"
    done
    exit 0
fi

mkdir -p "$OUT_DIR" "$WORK" || { echo "device_check.sh: cannot create $OUT_DIR" >&2; exit 2; }
status=0
for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]}
    start=$(date +%s)
    timeout "${LIMITS[$i]}" bash -c "${COMMANDS[$i]}" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    if [[ $rc -eq 0 ]]; then
        echo "$name: ok (${took} s)"
    else
        [[ $rc -eq 124 ]] && why="over its ${LIMITS[$i]} s limit" || why="exit status $rc"
        echo "$name: FAILED, $why (${took} s); last lines of $OUT_DIR/$name.log:"
        tail -n 15 "$OUT_DIR/$name.log"
        status=1
        [[ $name == environment ]] && exit 3
    fi
    # the tables the benchmarks print, for the reader of this call's output
    grep -E '^\||^Machine|^model|^3d_fullres|^mirroring|^segmentations' "$OUT_DIR/$name.log" || true
done
exit $status
