#!/usr/bin/env bash
# One GPU call: this checkout's engine against an earlier commit's engine on the same card, in
# alternating sweeps (A B A), plus this checkout's gated sweep with the baseline and the CUDA
# engine tests. The earlier engine comes as a folder (engines/dpfast of that commit, made on the
# dev machine: `git archive REV engines/dpfast | tar -x -C .prev-engine`, carried to the node);
# while it is in place the records say DPH_GIT_SHA=$PREV_SHA, so no record claims code it did
# not run.
# Usage: PREV_SHA=ea122b3 SYSTEM=water STEPS=300 ROUNDS=1 bash .ci/gpu-ab.sh
set -u
SYSTEM=${SYSTEM:-water}
STEPS=${STEPS:-300}
PREV_SHA=${PREV_SHA:?the commit .prev-engine/ holds}
OUT=${OUT:-/tmp/dph-out}
NEW_SHA=${DPH_GIT_SHA:?set DPH_GIT_SHA to the commit of this checkout}
mkdir -p "$OUT"
touch /tmp/gpu-ab.start
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
make venv 2>&1 | tail -3
py=.venv/bin/python
test -d .prev-engine/engines/dpfast || { echo "no .prev-engine/engines/dpfast" >&2; exit 2; }
rm -rf /tmp/new-engine && cp -r engines/dpfast /tmp/new-engine
bench() { $py -m harness bench --system "$SYSTEM" --steps "$STEPS" --device cuda "$@" 2>&1 | grep -v "^\s*\[.*\] \["; }
# gated sweep of this checkout: baseline + fused (the comparison the README quotes)
bench --variant fused --gate-jobs 2 | tee -a "$OUT/bench.log"
for round in $(seq 1 "${ROUNDS:-1}"); do
  rm -rf engines/dpfast && cp -r .prev-engine/engines/dpfast engines/dpfast
  echo "== previous engine ($PREV_SHA), round $round" | tee -a "$OUT/bench.log"
  DPH_GIT_SHA=$PREV_SHA bench --variant fused --no-baseline --no-accuracy | tee -a "$OUT/bench.log"
  rm -rf engines/dpfast && cp -r /tmp/new-engine engines/dpfast
  echo "== this engine ($NEW_SHA), round $round" | tee -a "$OUT/bench.log"
  bench --variant fused --no-baseline --no-accuracy | tee -a "$OUT/bench.log"
done
timeout 120 $py -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/test-gpu.log"
# this call's records only (the checkout's committed ones are already here)
find results/runs -name '*.json' -newer /tmp/gpu-ab.start > /tmp/gpu-ab.list
tar czf "$OUT/results.tgz" -T /tmp/gpu-ab.list results/work/*/train.log results/work/*/steps.json 2>/dev/null
ls -la "$OUT"
