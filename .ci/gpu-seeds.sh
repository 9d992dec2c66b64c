#!/usr/bin/env bash
# One GPU call (issue 40): enough seeds for the training-equivalence test at a system's gate_steps.
# calibrate prints what the baseline's spread asks (water-cuda-2000: ~21 seeds per side for the
# forces, ~24 for the energy); a few seeds can only be inconclusive. (1) more baseline seeds:
# `calibrate --extend` with BASE_SEEDS, BASE_JOBS at once, under its own deadline; if it is cut
# short the seeds that finished are kept (`calibrate --from-runs` rebuilds the file from their
# records); (2) `dpharness equivalence` of VARIANT over VAR_SEEDS, VAR_JOBS side by side, judged
# against that calibration; its record says pass / fail and, when inconclusive, how many seeds would
# resolve it. Nothing here is timed (the seeds share the GPU): speed is the bench's.
# The calibration, the equivalence record and their per-seed runs come back in $OUT/seeds.tgz.
# Usage (repo root, wheelhouse/ carried; DPH_GIT_SHA set):
#   SYSTEM=water VARIANT=fused-fp32 bash .ci/gpu-seeds.sh
# Overrides: BASE_SEEDS=5,...,16 BASE_JOBS=8 VAR_SEEDS=1,...,20 VAR_JOBS=8 BASE_SHARE=60 (percent of
# BUDGET_S for step 1) BUDGET_S=540 OUT=/tmp/dph-out. Either step may be left out (BASE_SEEDS= or
# VAR_SEEDS=): upstream's water seeds run ~4x slower side by side, so twelve of them may fill a
# call (BASE_SHARE=100 VAR_SEEDS=), and the variant's seeds the next (BASE_SEEDS=).
# (DEVICE=cpu SYSTEM=<a tiny system dir> STEPS=4 BASE_SEEDS=4 VAR_SEEDS=1,2,3: the plumbing on a CPU
# machine; the calibration of (system, cpu, STEPS) must exist or BASE_SEEDS must hold >= 3 seeds)
set -u
cd "$(dirname "$0")/.."
SYSTEM=${SYSTEM:-water}
VARIANT=${VARIANT:-fused-fp32}
BASE_SEEDS=${BASE_SEEDS-5,6,7,8,9,10,11,12,13,14,15,16}
BASE_JOBS=${BASE_JOBS:-8}
VAR_SEEDS=${VAR_SEEDS-1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20}
VAR_JOBS=${VAR_JOBS:-8}
BASE_SHARE=${BASE_SHARE:-60}
BUDGET_S=${BUDGET_S:-540}
OUT=${OUT:-/tmp/dph-out}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-}
mkdir -p "$OUT"
t0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no GPU"; } | tee "$OUT/card.txt"
if ! make venv > "$OUT/venv.log" 2>&1; then
  tail -20 "$OUT/venv.log"; echo "gpu-seeds: make venv failed (is wheelhouse/ carried?)" >&2; exit 2
fi
py=.venv/bin/python
steps=${STEPS:-$($py -c "import sys; from harness.prepare import systems; from harness.judge.seeds import gate_steps
print(gate_steps(systems.load_system(sys.argv[1]).spec) or '')" "$SYSTEM")}
[ -n "$steps" ] || { echo "gpu-seeds: system $SYSTEM has no gate_steps (give STEPS=N)" >&2; exit 2; }
touch /tmp/gpu-seeds.start
rc=0
if [ -n "$BASE_SEEDS" ]; then
  deadline=$(( $(left) * BASE_SHARE / 100 ))
  echo "== baseline seeds $BASE_SEEDS ($BASE_JOBS at once, deadline ${deadline} s)"
  timeout -k 10 "$deadline" $py -m harness calibrate --system "$SYSTEM" --device "$DEVICE" --steps "$steps" \
    --classes float64 --seeds "$BASE_SEEDS" --jobs "$BASE_JOBS" --extend > "$OUT/calibrate.log" 2>&1
  c=$?
  if [ "$c" != 0 ]; then  # cut short or a seed failed: keep what finished
    echo "gpu-seeds: calibrate exit $c; rebuilding from the finished seeds' records"
    $py -m harness calibrate --system "$SYSTEM" --device "$DEVICE" --steps "$steps" --from-runs \
      >> "$OUT/calibrate.log" 2>&1 || rc=1
  fi
  grep -v '^\s*\[' "$OUT/calibrate.log" | tail -6
fi
if [ -n "$VAR_SEEDS" ]; then
  echo "== $VARIANT seeds $VAR_SEEDS ($VAR_JOBS at once, $(( $(left) - 20 )) s left)"
  timeout -k 10 $(( $(left) - 20 )) $py -m harness equivalence --system "$SYSTEM" --device "$DEVICE" --steps "$steps" \
    --variant "$VARIANT" --seeds "$VAR_SEEDS" --jobs "$VAR_JOBS" > "$OUT/equivalence.log" 2>&1 || rc=1
  grep -v '^\s*\[' "$OUT/equivalence.log" | tail -6
fi
find results/calibration results/equivalence -newer /tmp/gpu-seeds.start -type f > /tmp/gpu-seeds.list 2>/dev/null
tar czf "$OUT/seeds.tgz" -T /tmp/gpu-seeds.list
echo "gpu-seeds: $(( $(date +%s) - t0 )) s, exit $rc"
exit "$rc"
