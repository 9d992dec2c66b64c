#!/usr/bin/env bash
# One GPU call: calibrate a system's gate_steps (docs/accuracy.md, "Training length"): the float64
# baseline with every seed at each step count, all lengths side by side (upstream's steps are
# host-bound, so a 16-core machine holds a dozen trainings), each under a deadline so the
# calibration files of the lengths that finished always come back packed in $OUT.
# Usage (repo root, wheelhouse/ carried):  bash .ci/gpu-gate-steps.sh
# Overrides: SYSTEMS="copper" LENGTHS="2 1000 2000 4000" SEEDS=1,2,3,4 DEADLINE=520 OUT=/tmp/dph-out
# EXTEND=1 adds SEEDS to the existing calibration of each length (a slow system's seeds over two calls)
# REFERENCE=fused-follow: that float64 variant trains the seeds instead of upstream's baseline (a
# stand-in for lengths upstream cannot train in one call; its files say so and judge no gate)
set -u
cd "$(dirname "$0")/.."
SYSTEMS=${SYSTEMS:-copper}
LENGTHS=${LENGTHS:-2 1000 2000 4000}
SEEDS=${SEEDS:-1,2,3,4}
DEADLINE=${DEADLINE:-520}
OUT=${OUT:-/tmp/dph-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
if ! make venv > "$OUT/venv.log" 2>&1; then
  tail -20 "$OUT/venv.log"; echo "gpu-gate-steps: make venv failed (is wheelhouse/ carried?)" >&2; exit 2
fi
jobs=$(( $(echo "$SEEDS" | tr ',' '\n' | wc -l) ))
start=$(date +%s)
rc=0
pids=()
for s in $SYSTEMS; do
  for n in $LENGTHS; do
    # -k: a calibrate that ignores the deadline's SIGTERM (it waits for its trainings) is killed
    timeout -k 10 "$DEADLINE" .venv/bin/python -m harness calibrate --system "$s" --steps "$n" --device cuda \
      --classes float64 --seeds "$SEEDS" --jobs "$jobs" ${EXTEND:+--extend} ${REFERENCE:+--reference "$REFERENCE"} \
      > "$OUT/calibrate-$s-$n.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p" || rc=1; done
echo "gpu-gate-steps: $(( $(date +%s) - start )) s"
for s in $SYSTEMS; do for n in $LENGTHS; do
  echo "== $s $n"; grep -v '^\[' "$OUT/calibrate-$s-$n.log" | tail -4
done; done
# the logs travel inside the tar ($OUT holds at most 8 files)
mkdir -p results/calibration/logs && cp "$OUT"/calibrate-*.log results/calibration/logs/ 2>/dev/null
rm -f "$OUT"/calibrate-*.log
tar czf "$OUT/calibration.tgz" results/calibration
rm -rf results/calibration/logs
exit "$rc"
