#!/usr/bin/env bash
# GPU check of kps-bench on one GPU, with no internet, in at most 8 minutes: only the shipped shapes world.
#   1. the demo on cuda (one evaluation subject, every method: train, run, leaderboard);
#   2. generation and encoding throughput at batch sizes 8, 32, 128 in float16 and float32;
#   3. float16 against float32: the same seeds pixel by pixel and through CLIP, and `kps-bench run` of the base
#      model in both dtypes (overall metrics within 0.02; tolerances in benchmarks/gpu_check.py).
# Usage: benchmarks/gpu_check.sh [OUT]   (default gpu-check/; PYTHON=... to use another interpreter)
# Every step has its own time limit; the script stops at the first failure and prints the summary written so far.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export KPS_BENCH_CACHE="$OUT/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$SECONDS

step() {  # step SECONDS NAME COMMAND...: run COMMAND with a time limit, log it, and say how long it took
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  if ! timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "FAILED: $name (see $OUT/$name.log)" >&2
    exit 1
  fi
  echo "-- $name: $((SECONDS - t0)) s"
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
step 240 demo "$PY" -m kps_bench demo --device cuda --subject purple-circle --out "$OUT/demo"
step 75 throughput "$PY" benchmarks/gpu_check.py --out "$OUT/throughput.json" throughput --device cuda
step 40 agreement "$PY" benchmarks/gpu_check.py --out "$OUT/agreement.json" agreement --device cuda
for dtype in float16 float32; do
  step 45 "run-$dtype" "$PY" -m kps_bench run --adapter-kind none --device cuda --dtype "$dtype" \
    --out "$OUT/run-$dtype"
done
step 10 compare-runs "$PY" benchmarks/gpu_check.py --out "$OUT/compare-runs.json" compare-runs \
  "$OUT/run-float16" "$OUT/run-float32"
echo "gpu_check: all steps passed in $((SECONDS - START)) s; results in $OUT/"
