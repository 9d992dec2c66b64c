#!/usr/bin/env bash
# One GPU call (issues 39 and 40): is a reduced-precision or kernel variant of fused faster where
# the cell grows? Sweeps of fused, fused-mixed, fused-tf32-nets and fused-kernels at REPLICATE sizes
# (one sweep per entry of SIZES: ratios are read within a sweep), no baseline, no gate (speed
# only: their gates and parity are the precision budget's and the equivalence test's), then
# the per-stage precision budget of PRECISION_SYSTEMS (.ci/gpu-precision.sh) in what is left.
# Records, logs and budgets come back in $OUT/results.tgz and $OUT/precision.tgz.
# Usage (repo root, wheelhouse/ carried; DPH_GIT_SHA set):
#   bash .ci/gpu-speed.sh
# Overrides: SIZES="2x2x2:fused-3xtf32,fused-3xtf32-kernel,fused,fp32-tos:300 4x4x4:fused,fused-3xtf32,fused-3xtf32-kernel:200"
#   (size:variants:steps per sweep) SWEEP_S=100 (each sweep's limit per variant: start-ups are
#   22-76 s each on an H100; 170 s for a whole four-variant sweep cut its third, 41f8efd) PRECISION_SYSTEMS=""
#   PRECISION_S=200 OUT=/tmp/dph-out MICRO=1 (first tools/bench_tf32x3.py: one net GEMM as fp64, fp32, tf32,
#   3xTF32 by torch ops and by the Triton kernel, us per call at 192 and 1,536 atoms)
# One call for a new variant's speed and its card parity at a gate_steps checkpoint (~6-7 min):
#   SIZES="2x2x2:fused,fused-3xtf32:300" PRECISION_SYSTEMS=copper PRECISION_STEPS=4000 PRECISION_S=330 \
#   STAGES=fused-tf32-nets,fused-3xtf32 JOBS=2 bash .ci/gpu-speed.sh   (STAGES / JOBS reach gpu-precision.sh)
# (DEVICE=cpu SYSTEM=<a tiny system dir> SIZES="1x1x1:fused,fused-fp32:4" PRECISION_SYSTEMS=<it>
# PRECISION_STEPS=4: the plumbing on a CPU machine)
set -u
cd "$(dirname "$0")/.."
# fused-fp32 (1.10x / 1.13x) and fused-mixed (1.54x / 1.76x) were timed at these sizes by 41f8efd,
# fused-tf32-nets (1.36x / 1.47x) and fused-kernels (0.61x at 1,536 atoms) by 201627c (sweeps
# 20261208T000433Z-d61ba3, T000958Z-1dfcdf, T002411Z-9d894f); fused-3xtf32 (three TF32 products per
# GEMM by torch ops, float32's error on the emulated budgets) and fused-3xtf32-kernel (the same
# products split on chip by a Triton kernel) are the ones not yet timed; fp32-tos (upstream's best legal
# setting) in the 1,536-atom sweep is its anchor, so the ratios vs upstream are of one sweep too
SIZES=${SIZES:-2x2x2:fused-3xtf32,fused-3xtf32-kernel,fused,fp32-tos:300 4x4x4:fused,fused-3xtf32,fused-3xtf32-kernel:200}
# fused-kernels' start-up alone took 76 s on an H100 (Triton builds), past 75 s
SWEEP_S=${SWEEP_S:-100}
# default none: the eight-row budget got only its baseline trained in the 200 s left after the
# sweeps (41f8efd); it has its own call, .ci/gpu-precision.sh
PRECISION_SYSTEMS=${PRECISION_SYSTEMS-}
PRECISION_S=${PRECISION_S:-200}
PRECISION_STEPS=${PRECISION_STEPS:-200}
DEVICE=${DEVICE:-cuda}
SYSTEM=${SYSTEM:-water}
OUT=${OUT:-/tmp/dph-out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no GPU"; } | tee "$OUT/card.txt"
if ! make venv > "$OUT/venv.log" 2>&1; then
  tail -20 "$OUT/venv.log"; echo "gpu-speed: make venv failed (is wheelhouse/ carried?)" >&2; exit 2
fi
touch /tmp/gpu-speed.start
py=.venv/bin/python
if [ "${MICRO:-1}" = 1 ] && [ "$DEVICE" = cuda ]; then  # the nets' GEMMs five ways (fp64 .. 3xTF32 kernel), ~30 s
  timeout -k 5 150 $py tools/bench_tf32x3.py --atoms 192,1536 --json "$OUT/tf32x3-micro.json" > "$OUT/tf32x3-micro.log" 2>&1
  tail -32 "$OUT/tf32x3-micro.log"
fi
for entry in $SIZES; do
  IFS=: read -r size vars steps <<< "$entry"
  args=(); IFS=, read -ra vs <<< "$vars"; for v in "${vs[@]}"; do args+=(--variant "$v"); done
  echo "== $size: ${vs[*]} ($steps steps)" | tee -a "$OUT/bench.log"
  timeout -k 10 $(( SWEEP_S * ${#vs[@]} + 30 )) $py -m harness bench --device "$DEVICE" --system "$SYSTEM" --replicate "$size" --steps "$steps" \
    --no-baseline --no-accuracy "${args[@]}" 2>&1 | grep -v "^\s*\[.*\] \[" | grep -v "^  \[" | tail -12 | tee -a "$OUT/bench.log"
done
find results/runs -name '*.json' -newer /tmp/gpu-speed.start > /tmp/gpu-speed.list
tar czf "$OUT/results.tgz" -T /tmp/gpu-speed.list results/work/*/train.log results/work/*/steps.json 2>/dev/null
if [ -n "$PRECISION_SYSTEMS" ]; then
  SYSTEMS="$PRECISION_SYSTEMS" DEADLINE="$PRECISION_S" STEPS="$PRECISION_STEPS" DEVICE="$DEVICE" OUT="$OUT" \
    bash .ci/gpu-precision.sh 2>&1 | tail -30
fi
ls -la "$OUT"
