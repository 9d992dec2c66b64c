#!/usr/bin/env bash
# One GPU call on a 2-, 4- or 8-GPU machine: bootstrap offline from wheelhouse/, then measure the
# same variant(s) on 1, 2[, 4[, 8]] GPUs of this node in ONE sweep (torchrun DDP, see
# docs/distributed.md), with the accuracy gate, and pack the records for $OUT.
# Usage (repo root, wheelhouse/ and systems/water/data carried):  bash .ci/gpu-scaling.sh
# Overrides: SYSTEM=water VARIANTS="baseline fused" (several in one sweep, baseline first;
# VARIANT=x still works for one) STEPS=200 GPUS=1,2,4 (default: every power of two up to
# the visible GPU count) OUT=/tmp/dph-out EXTRA="..." (more bench arguments).
set -u
cd "$(dirname "$0")/.."
# NVLink multicast can take shared GPUs out of service: off for everything this script starts
# (the harness sets the same for every training process; this covers anything else).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SYSTEM=${SYSTEM:-water}
VARIANTS=${VARIANTS:-${VARIANT:-baseline}}
VARIANT_ARGS=()
for v in $VARIANTS; do VARIANT_ARGS+=(--variant "$v"); done
STEPS=${STEPS:-200}
EXTRA=${EXTRA:-}
OUT=${OUT:-/tmp/dph-out}
mkdir -p "$OUT"

nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
nvidia-smi topo -m > "$OUT/topology.txt" 2>&1 || true
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
if [ -z "${GPUS:-}" ]; then
  GPUS=1
  for n in 2 4 8; do
    if [ "$n" -le "${NGPU:-0}" ]; then GPUS="$GPUS,$n"; fi
  done
fi
if [ "${NGPU:-0}" -lt 2 ]; then
  echo "gpu-scaling: only ${NGPU:-0} GPU(s) visible; measuring GPUS=$GPUS (no scaling point)" | tee -a "$OUT/bench.log"
fi
echo "gpu-scaling: system=$SYSTEM variants=[$VARIANTS] steps=$STEPS gpus=$GPUS ($NGPU visible)" | tee -a "$OUT/bench.log"

if ! make venv > "$OUT/venv.log" 2>&1; then
  tail -20 "$OUT/venv.log"
  echo "gpu-scaling: make venv failed (is wheelhouse/ carried? see $OUT/venv.log)" >&2
  exit 2
fi
tail -3 "$OUT/venv.log"

# progress-bar lines are only drawn on a tty; keep the log to the table and the notes
# accuracy gate on (no --no-accuracy); `harness bench` puts baseline first when it is not listed
# --gate-jobs only where this harness has it (bench --help says so)
if .venv/bin/python -m harness bench --help 2>/dev/null | grep -q -- '--gate-jobs'; then
  VARIANT_ARGS+=(--gate-jobs "${GATE_JOBS:-1}")
fi
.venv/bin/python -m harness bench --system "$SYSTEM" "${VARIANT_ARGS[@]}" --gpus "$GPUS" --steps "$STEPS" \
  --device cuda $EXTRA 2>&1 | tee -a "$OUT/bench.log"
rc=${PIPESTATUS[0]}

# the records (results/runs, incl. the new *-g2/-g4 ones) and each run's log/steps/lcurve
tar czf "$OUT/results.tgz" results/runs $(ls -d results/work/*/train.log results/work/*/steps.json \
  results/work/*/lcurve.out results/work/*/input.json results/work/*/accuracy/*.log 2>/dev/null) 2>/dev/null
ls -la "$OUT"
exit "$rc"
