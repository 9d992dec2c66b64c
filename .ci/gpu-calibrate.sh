#!/usr/bin/env bash
# One GPU call: bootstrap offline from wheelhouse/, then add seeds to the accuracy gate's
# seed-spread calibration of several systems at once (`dpharness calibrate --extend`), and pack
# results/calibration for $OUT. The systems run concurrently (accuracy only, not timed).
# Usage (repo root, wheelhouse/ and systems/water/data carried):  bash .ci/gpu-calibrate.sh
# Overrides: SYSTEMS="water copper alcumg" SEEDS=4,5,6,7,8 JOBS=5 STEPS=200 OUT=/tmp/dph-out
set -u
cd "$(dirname "$0")/.."
SYSTEMS=${SYSTEMS:-water copper alcumg}
SEEDS=${SEEDS:-4,5,6,7,8}
JOBS=${JOBS:-5}
STEPS=${STEPS:-200}
OUT=${OUT:-/tmp/dph-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
if ! make venv > "$OUT/venv.log" 2>&1; then
  tail -20 "$OUT/venv.log"; echo "gpu-calibrate: make venv failed (is wheelhouse/ carried?)" >&2; exit 2
fi
rc=0
pids=()
for s in $SYSTEMS; do
  .venv/bin/python -m harness calibrate --system "$s" --steps "$STEPS" --device cuda --seeds "$SEEDS" \
    --jobs "$JOBS" --extend > "$OUT/calibrate-$s.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for s in $SYSTEMS; do echo "== $s"; grep -v '^\[' "$OUT/calibrate-$s.log" | tail -8; done
tar czf "$OUT/calibration.tgz" results/calibration
exit "$rc"
