#!/usr/bin/env bash
# One GPU call: bootstrap offline from wheelhouse/, bench SYSTEMS x VARIANTS, pack results for $OUT.
# Usage (on the GPU machine, repo root): SYSTEMS="water copper" VARIANTS="tos fp32" STEPS=300 bash .ci/gpu-sweep.sh
set -u
SYSTEMS=${SYSTEMS:-water}
VARIANTS=${VARIANTS:-tos fp32 fp32-tos}
STEPS=${STEPS:-300}
EXTRA=${EXTRA:-}
OUT=${OUT:-/tmp/dph-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
make venv 2>&1 | tail -5
for s in $SYSTEMS; do
  args=""; for v in $VARIANTS; do args="$args --variant $v"; done
  .venv/bin/python -m harness bench --system "$s" $args --steps "$STEPS" --device cuda $EXTRA 2>&1 | grep -v "^\s*\[.*\] \[" | tee -a "$OUT/bench.log"
done
tar czf "$OUT/results.tgz" results/runs results/calibration results/work/*/train.log results/work/*/lcurve.out results/work/*/profile.json results/work/*/steps.json 2>/dev/null
ls -la "$OUT"
