#!/usr/bin/env bash
# GPU check of the fused variant, runnable in one command on the device machine
# (repo root as cwd; carry wheelhouse and systems/water/data):
#   bash patches/fused/gpu_check.sh [plan]   plan: system:variant:steps,... (variants: see gpu_check.py)
# Writes $OUT/gpu_check.log and $OUT/gpu_check.json (or ./gpu_check_out without $OUT).
set -euo pipefail
# DPH_GPU_BUDGET_S (default 270): the plan stops when this many seconds have passed
OUT=${OUT:-$PWD/gpu_check_out}
TREE=${DPH_UPSTREAM_TREE:-/tmp/site}
echo "python3: $(command -v python3) $(python3 -c 'import sys,torch;print(sys.version.split()[0], torch.__version__)' 2>&1 | tail -1)"
BASEPY=python3
for cand in python3 python3.12 /usr/bin/python3 /usr/local/bin/python3 /opt/conda/bin/python python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" 2>/dev/null; then BASEPY=$cand; break; fi
done
echo "base python with torch: $BASEPY"
# deps go to a --target folder on PYTHONPATH (a venv made from the image's own venv
# python would not see its torch)
DEPS=/tmp/graph_deps
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fused_inductor_cache}
if [ ! -f "$DEPS/.done" ]; then
  "$BASEPY" -m pip install -q --no-index --no-deps --target "$DEPS" $(ls wheelhouse/*.whl | grep -v deepmd_kit)
  if ! "$BASEPY" -c "import e3nn" 2>/dev/null && ls wheelhouse/e3nn*.whl wheelhouse/opt_einsum*.whl >/dev/null 2>&1; then
    # upstream deepmd imports e3nn; install it from local wheels when the image lacks it
    "$BASEPY" -m pip install -q --no-index --no-deps --target "$DEPS" wheelhouse/e3nn*.whl wheelhouse/opt_einsum*.whl
  fi
  touch "$DEPS/.done"
fi
if [ ! -f "$TREE/deepmd/lib/run_config.ini" ] || [ -f "$TREE/deepmd/lib/libdeepmd_op_pt.so" ]; then
  mkdir -p "$TREE"
  "$BASEPY" -c "import zipfile,glob;zipfile.ZipFile(glob.glob('wheelhouse/deepmd_kit*.whl')[0]).extractall('$TREE')"
  rm -f "$TREE/deepmd/lib/libdeepmd_op_pt.so"
  sed -i 's/CIBUILDWHEEL = 1/CIBUILDWHEEL = 0/' "$TREE/deepmd/lib/run_config.ini"
fi
PY=$BASEPY
export PYTHONPATH="$TREE:$PWD:$DEPS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import torch, dargs, e3nn; from deepmd.pt.entrypoints.main import main; print('deepmd import ok, torch', torch.__version__)" 2>&1 | tail -2
"$PY" patches/fused/gpu_check.py "$TREE" "$OUT" "${1:-water:baseline:150,water:graph:600,water:fused:1000,water:fused-fp32:1000,water:fused-mixed:1000,copper:baseline:100,copper:graph:500,copper:fused:1000,alcumg:baseline:100,alcumg:graph:500,alcumg:fused:1000}"
grep -E "card|parity|TIMING" "$OUT/gpu_check.log" || true
