#!/usr/bin/env bash
# One GPU call (or the tail of one): the Triton embedding kernels (engines/dpfast/embed_kernels.py)
# compiled on the card -- their float64 tests (tests/engines/test_embed_kernels.py, compiled, not
# interpreted) and the microbenchmark against the eager and Inductor paths (tools/bench_embed_kernels.py).
# Usage (repo root, wheelhouse/ carried):  bash .ci/gpu-kernels.sh      Overrides: OUT, BUDGET_S=240
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dph-out}
BUDGET_S=${BUDGET_S:-240}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/card.txt"
make venv > "$OUT/venv-kernels.log" 2>&1 || { tail -20 "$OUT/venv-kernels.log"; exit 2; }
py=.venv/bin/python
$py -c "import triton; print('triton', triton.__version__)"
timeout $(( BUDGET_S / 2 )) $py tools/bench_embed_kernels.py --out "$OUT/embed_kernels.json" 2>&1 | tail -40 | tee "$OUT/kernels.log"
timeout $(( BUDGET_S / 2 )) $py -m pytest -q tests/engines/test_embed_kernels.py tests/engines/test_embed_autograd.py -p no:cacheprovider 2>&1 | tail -8 | tee -a "$OUT/kernels.log"
