#!/usr/bin/env bash
# GPU check of the graph variant, runnable in one command on the device machine
# (repo root as cwd; carry wheelhouse and systems/water/data):
#   bash patches/graph/gpu_check.sh [plan]      plan default: water:300:2000,copper:200:1000,alcumg:200:1000
# Writes $OUT/gpu_check.log and $OUT/gpu_check.json (or ./gpu_check_out without $OUT).
set -euo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
TREE=${DPH_UPSTREAM_TREE:-/tmp/site}
if [ ! -d "$TREE/deepmd" ]; then
  python3 -m venv --system-site-packages /tmp/v
  /tmp/v/bin/pip install -q --no-index --no-deps $(ls wheelhouse/*.whl | grep -v deepmd_kit)
  mkdir -p "$TREE"
  python3 -c "import zipfile,glob;zipfile.ZipFile(glob.glob('wheelhouse/deepmd_kit*.whl')[0]).extractall('$TREE')"
  rm -f "$TREE/deepmd/lib/libdeepmd_op_pt.so"
  sed -i 's/CIBUILDWHEEL = 1/CIBUILDWHEEL = 0/' "$TREE/deepmd/lib/run_config.ini"
fi
PY=${PY:-/tmp/v/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$TREE:$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if ! "$PY" -c "import e3nn" 2>/dev/null; then
  # upstream deepmd imports e3nn; install it from local wheels when the image lacks it
  ls patches/graph/_wheels/*.whl >/dev/null 2>&1 && "$PY" -m pip install -q --no-index --no-deps patches/graph/_wheels/*.whl || echo "WARNING: e3nn missing"
fi
"$PY" patches/graph/gpu_check.py "$TREE" "$OUT" "${1:-water:300:2000,copper:200:1000,alcumg:200:1000}"
grep -E "card|parity|SPEEDUP" "$OUT/gpu_check.log" || true
