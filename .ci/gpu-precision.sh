#!/usr/bin/env bash
# One GPU call (issue 40, slice 2): the per-stage precision budget on the card for each system --
# a float64 baseline trained STEPS steps, then `dpharness precision-budget --device cuda` on its
# checkpoint (descriptor float32, fitting float32, both, TF32 GEMMs in each and both, the bfloat16
# descriptor probe: the gate's own
# same-weights parity per stage). The systems run side by side (the parity children are light),
# each under its own deadline, so the budgets that finished always come back in
# $OUT/precision.tgz (results/precision/<system>-cuda.json, the baselines' records, the logs).
# Usage (repo root, wheelhouse/ carried; DPH_GIT_SHA set):
#   bash .ci/gpu-precision.sh
# Overrides: SYSTEMS="water copper alcumg" STEPS=200 DEADLINE=500 OUT=/tmp/dph-out
#   STAGES="" (every row; e.g. fused-fit-tf32,fused-mixed,fused-tf32-nets,fused-3xtf32: TF32 rows alone)
#   JOBS=4 (rows measured at once: one by one, copper's eight rows did not finish in the ~6 min
#   left after its 4000-step baseline, 201627c; each row prints as it finishes, "[budget] ...")
# (DEVICE=cpu SYSTEMS=<a tiny system dir> STEPS=4: the plumbing on a CPU machine)
set -u
cd "$(dirname "$0")/.."
SYSTEMS=${SYSTEMS:-water copper alcumg}
STEPS=${STEPS:-200}
DEADLINE=${DEADLINE:-500}
OUT=${OUT:-/tmp/dph-out}
DEVICE=${DEVICE:-cuda}
STAGES=${STAGES:-}
JOBS=${JOBS:-4}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no GPU"; } | tee "$OUT/card.txt"
if ! make venv > "$OUT/venv.log" 2>&1; then
  tail -20 "$OUT/venv.log"; echo "gpu-precision: make venv failed (is wheelhouse/ carried?)" >&2; exit 2
fi
touch /tmp/gpu-precision.start
mkdir -p results/precision/logs
one() {  # a system's float64 baseline, then the budget on it (precision-budget's default checkpoint:
         # the newest baseline run of the system under results/runs, i.e. the one just trained)
  .venv/bin/python -m harness bench --system "$1" --device "$DEVICE" --variant baseline --steps "$STEPS" \
    --no-accuracy || return 1
  .venv/bin/python -m harness precision-budget --system "$1" --device "$DEVICE" --jobs "$JOBS" \
    ${STAGES:+--stages "$STAGES"}
}
pids=()
for s in $SYSTEMS; do
  ( export -f one; timeout -k 10 "$DEADLINE" bash -c "STEPS=$STEPS DEVICE=$DEVICE JOBS=$JOBS STAGES=$STAGES; one $s" ) \
    > "results/precision/logs/$(basename "$s").log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for s in $SYSTEMS; do echo "== $s"; grep -v '^\s*\[' "results/precision/logs/$(basename "$s").log" | tail -12; done
find results/runs -name '*.json' -newer /tmp/gpu-precision.start > /tmp/gpu-precision.list
tar czf "$OUT/precision.tgz" results/precision -T /tmp/gpu-precision.list
rm -rf results/precision/logs  # they travel in the tar
exit "$rc"
