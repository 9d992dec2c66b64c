#!/usr/bin/env bash
# One GPU call per system (issue 40, slice 3): the reduced-precision variants through the
# training-equivalence test at the system's gate_steps. Upstream trains once (--upstream-once:
# the baseline, its best legal and best native settings on the first seed: the speed anchors and
# every seed's same-weights parity reference); ours on every seed (n >= 3), judged by parity and,
# for the reduced-precision classes, by TOST against the calibration's baseline seeds at
# gate_steps (results/calibration/<system>-cuda-<gate_steps>.json). Sized for one call: water's
# baseline alone is ~2 min at 2000 steps, each of our runs ~35 s with its gate, so the defaults are
# the two reduced-precision variants; add fused (the float64 speed reference), ANCHORS (fp32-tos
# ptx-tf32: upstream's best legal / native settings, first seed only) or fused-bf16 (the probe that
# must fail) where the call has room. No --time-budget: its per-seed shares would cut the first
# seed, which also trains upstream; the call's timeout is the backstop (finished benches' records
# are written as they finish). The records and the log come back in $OUT/equivalence.tgz.
# Usage (repo root, wheelhouse/ carried; DPH_GIT_SHA set):
#   SYSTEM=water bash .ci/gpu-equivalence.sh
# Overrides: SEEDS=1,2,3 VARIANTS="fused-fp32 fused-mixed" ANCHORS="" BUDGET_S=540 OUT=/tmp/dph-out
# (DEVICE=cpu SYSTEM=<a tiny system dir> STEPS=3 VARIANTS=broken-force ANCHORS=fp32: the plumbing on a CPU machine)
set -u
cd "$(dirname "$0")/.."
SYSTEM=${SYSTEM:-water}
SEEDS=${SEEDS:-1,2,3}
VARIANTS=${VARIANTS:-fused-fp32 fused-mixed}
ANCHORS=${ANCHORS:-}
BUDGET_S=${BUDGET_S:-540}
OUT=${OUT:-/tmp/dph-out}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-}
mkdir -p "$OUT"
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no GPU"; } | tee "$OUT/card.txt"
if ! make venv > "$OUT/venv.log" 2>&1; then
  tail -20 "$OUT/venv.log"; echo "gpu-equivalence: make venv failed (is wheelhouse/ carried?)" >&2; exit 2
fi
steps=${STEPS:-$(.venv/bin/python -c "import sys; from harness.prepare import systems; from harness.judge.seeds import gate_steps
print(gate_steps(systems.load_system(sys.argv[1]).spec) or '')" "$SYSTEM")}
[ -n "$steps" ] || { echo "gpu-equivalence: system $SYSTEM has no gate_steps (calibrate it first)" >&2; exit 2; }
log="$OUT/equivalence-$(basename "$SYSTEM").log"
touch /tmp/gpu-equivalence.start
args=(); for v in $VARIANTS $ANCHORS; do args+=(--variant "$v"); done
left=$(( BUDGET_S - ($(date +%s) - t0) - 15 ))
timeout -k 10 "$left" .venv/bin/python -m harness bench --system "$SYSTEM" --device "$DEVICE" --steps "$steps" \
  --seeds "$SEEDS" --upstream-once "${args[@]}" --gate-jobs 2 > "$log" 2>&1
rc=$?
grep -v '^\s*\[' "$log" | tail -40
find results/runs -name '*.json' -newer /tmp/gpu-equivalence.start > /tmp/gpu-equivalence.list
mkdir -p results/equivalence-logs && mv "$log" results/equivalence-logs/
tar czf "$OUT/equivalence.tgz" -T /tmp/gpu-equivalence.list results/equivalence-logs
rm -rf results/equivalence-logs
exit "$rc"
