#!/usr/bin/env bash
# GPU check of the graph variant, runnable in one command on the device machine
# (repo root as cwd; carry wheelhouse and systems/water/data):
#   bash tools/gpu_check_graph.sh [plan]      plan default: water:300:2000,copper:200:1000,alcumg:200:1000
# Writes $OUT/gpu_check.log and $OUT/gpu_check.json (or ./gpu_check_out without $OUT).
set -euo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
source tools/gpu_env.sh
"$PY" tools/gpu_check_graph.py "$TREE" "$OUT" "${1:-water:300:2000,copper:200:1000,alcumg:200:1000}"
grep -E "card|parity|SPEEDUP" "$OUT/gpu_check.log" || true
