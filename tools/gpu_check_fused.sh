#!/usr/bin/env bash
# GPU check of the fused variant, runnable in one command on the device machine
# (repo root as cwd; carry wheelhouse and systems/water/data):
#   bash tools/gpu_check_fused.sh [plan]   plan: system:variant:steps,... (variants: see gpu_check_fused.py)
# Writes $OUT/gpu_check.log and $OUT/gpu_check.json (or ./gpu_check_out without $OUT).
set -euo pipefail
# DPH_GPU_BUDGET_S (default 270): the plan stops when this many seconds have passed
OUT=${OUT:-$PWD/gpu_check_out}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fused_inductor_cache}
source tools/gpu_env.sh
"$PY" tools/gpu_check_fused.py "$TREE" "$OUT" "${1:-water:baseline:150,water:graph:600,water:fused:1000,water:fused-fp32:1000,water:fused-mixed:1000,copper:baseline:100,copper:graph:500,copper:fused:1000,alcumg:baseline:100,alcumg:graph:500,alcumg:fused:1000}"
grep -E "card|parity|TIMING" "$OUT/gpu_check.log" || true
