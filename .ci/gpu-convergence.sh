#!/usr/bin/env bash
# One GPU call: the proof over a full training (docs/accuracy.md, "Proof over a full training"):
# bootstrap offline, then `dpharness convergence` with whatever of the call's time is left as its
# --time-budget, and the record, lcurves, logs and the report packed into $OUT.
# Usage (repo root on the GPU machine):
#   STEPS=10000 VARIANTS="baseline:2 fused:3" PARALLEL=3 CALL_S=570 bash .ci/gpu-convergence.sh
# A proof longer than one call goes in two: VARIANTS="baseline:2" PARALLEL=2 first, its record
# committed, then VARIANTS="fused:3" BASELINE_FROM=results/convergence/<that record>.json; when
# one upstream seed fills a call, one call per seed (VARIANTS=baseline:1 SEED=11) and BASELINE_FROM
# lists their records (upstream seeds side by side time-slice the GPU: 57 ms/step vs ~40 alone).
set -u
STEPS=${STEPS:-10000}
VARIANTS=${VARIANTS:-baseline:2 fused:3}
PARALLEL=${PARALLEL:-3}
SYSTEM=${SYSTEM:-water}
DEVICE=${DEVICE:-cuda}   # cpu: the same call, tiny, on a machine without a GPU (a dry run)
CALL_S=${CALL_S:-570}   # the whole call, bootstrap included; the convergence run gets the rest
OUT=${OUT:-/tmp/dph-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/card.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/card.txt"
cat "$OUT/card.txt"
make venv 2>&1 | tail -3
py=.venv/bin/python
left=$((CALL_S - SECONDS - 15))   # 15 s kept for packing the evidence
echo "bootstrap took ${SECONDS} s; convergence gets ${left} s" | tee "$OUT/convergence.log"
args=""; for v in $VARIANTS; do args="$args --variant $v"; done
for r in ${BASELINE_FROM:-}; do args="$args --baseline-from $r"; done
[ -n "${SEED:-}" ] && args="$args --seed $SEED"
timeout $((left + 10)) $py -m harness convergence --system "$SYSTEM" $args --steps "$STEPS" --device "$DEVICE" \
  --parallel "$PARALLEL" --time-budget "$left" 2>&1 | grep -v "^\s*\[.*\] \[" | tee -a "$OUT/convergence.log"
# the evidence first (the call may be cut while the report renders), the report only if time is left
# only this call's records: a call returns at most 8 files (the device's limit), so the committed
# ones stay behind and whatever else must come back goes into the tarball
find results/convergence -name "*.json" -newer "$OUT/card.txt" -exec cp {} "$OUT/" \;
tar czf "$OUT/convergence.tgz" results/convergence results/work/*/lcurve.out results/work/*/train.log \
  results/work/*/steps.json results/work/*/input.json results/work/*/dp_test/dp_test.log 2>/dev/null
[ $((CALL_S - SECONDS)) -gt 20 ] && timeout $((CALL_S - SECONDS - 5)) $py -m harness report >/dev/null 2>&1 \
  && cp results/report/index.html "$OUT/report.html"
ls -la "$OUT"
