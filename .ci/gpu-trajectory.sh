#!/usr/bin/env bash
# One GPU call: `dpharness trajectory` (upstream twice with one seed, each variant on upstream's
# sampler order; docs/accuracy.md "Same frames, same trajectory"), bootstrapped offline from
# wheelhouse/, and the record, lcurves and logs packed into $OUT. EXTRA, when set, is a second
# dpharness command run beside it on the same card (e.g. a convergence run whose step times are
# not bench timings anyway); its output goes to $OUT/extra.log.
# Usage: SYSTEM=water STEPS=2000 VARIANTS="fused-follow graph-follow" bash .ci/gpu-trajectory.sh
set -u
SYSTEM=${SYSTEM:-water}
STEPS=${STEPS:-2000}
VARIANTS=${VARIANTS:-fused graph}
OUT=${OUT:-/tmp/dph-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/card.txt" 2>&1
cat "$OUT/card.txt"
make venv 2>&1 | tail -3
py=.venv/bin/python
if [ -n "${EXTRA:-}" ]; then
  # shellcheck disable=SC2086
  $py -m harness $EXTRA > "$OUT/extra.log" 2>&1 &
  extra=$!
fi
args=""; for v in $VARIANTS; do args="$args --variant $v"; done
# shellcheck disable=SC2086
$py -m harness trajectory --system "$SYSTEM" $args --steps "$STEPS" --device cuda 2>&1 \
  | grep -v "^\s*\[.*\] \[" | tee "$OUT/trajectory.log"
rc=${PIPESTATUS[0]}
[ -n "${EXTRA:-}" ] && { wait "$extra"; echo "extra exit $?" >> "$OUT/extra.log"; grep -v "^\s*\[.*\] \[" "$OUT/extra.log" | tail -25; }
tar czf "$OUT/records.tgz" results/trajectory results/convergence results/work/*/lcurve_full.jsonl \
  results/work/*/train.log results/work/*/steps.json 2>/dev/null
ls -la "$OUT"
exit "$rc"
