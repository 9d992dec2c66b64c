#!/usr/bin/env bash
# One GPU call: bootstrap offline from wheelhouse/, optionally calibrate the accuracy gate, bench
# SYSTEMS x VARIANTS (baseline first), optionally profile, and pack everything into $OUT.
# Usage (repo root on the GPU machine):
#   SYSTEMS="water copper" VARIANTS="tos graph" STEPS=200 CALIBRATE=1 PROFILE="baseline graph" bash .ci/gpu-sweep.sh
set -u
SYSTEMS=${SYSTEMS:-water}
VARIANTS=${VARIANTS:-tos fp32 fp32-tos}
STEPS=${STEPS:-200}
EXTRA=${EXTRA:-}
CALIBRATE=${CALIBRATE:-0}
PROFILE=${PROFILE:-}
BUDGET_S=${BUDGET_S:-170}   # per system; a slow piece is cut, not the whole call
OUT=${OUT:-/tmp/dph-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
make venv 2>&1 | tail -3
py=.venv/bin/python
for s in $SYSTEMS; do
  if [ "$CALIBRATE" = 1 ]; then
    timeout 150 $py -m harness calibrate --system "$s" --steps "$STEPS" --device cuda --classes float64 --jobs 3 \
      2>>"$OUT/calibrate.log" | tee -a "$OUT/bench.log"
  fi
done
for s in $SYSTEMS; do
  args=""; for v in $VARIANTS; do args="$args --variant $v"; done
  timeout "$BUDGET_S" $py -m harness bench --system "$s" $args --steps "$STEPS" --device cuda $EXTRA 2>&1 \
    | grep -v "^\s*\[.*\] \[" | tee -a "$OUT/bench.log"
done
if [ -n "$PROFILE" ]; then
  args=""; for v in $PROFILE; do args="$args --variant $v"; done
  timeout 150 $py -m harness profile --system water $args --steps 100 --device cuda 2>&1 | tail -60 | tee "$OUT/profile.log"
fi
tar czf "$OUT/results.tgz" results/runs results/calibration results/work/*/train.log results/work/*/lcurve.out \
  results/work/*/profile.json results/work/*/steps.json 2>/dev/null
ls -la "$OUT"
