#!/usr/bin/env bash
# One GPU call (issue 39): the Triton embedding kernels on the card, then fused-kernels against
# fused in one sweep. (1) tools/bench_embed_kernels.py: us/call, FP64 GFLOP/s and minimum bytes of
# embed_contract / env_cotangent / forward+all gradients (the VJP kernels at 8, 2 and 1 atoms per
# program, and 1 atom with its slots in chunks of 32 or 16: embed_autograd.vjp_split) vs eager and
# Inductor at 192 and 1,536 water atoms; (2) the kernels' float64 tests, compiled (not interpreted);
# (3) water, 300 steps: fused and fused-kernels timed in one sweep; (4) per VJP launch in SPLITS
# ("atoms,slots[,rows,warps[,halves]]": DPH_FUSED_VJP_ATOMS / _SLOTS, the weight VJP's tile
# DPH_FUSED_VJP_ROWS / _WARPS, its last layer by halves DPH_FUSED_VJP_HALVES) a sweep of fused and
# fused-kernels with that launch, while the budget allows; (5) fused-kernels gated (baseline +
# gate) if GATE=1 and the budget allows; (6) if PROFILE=1 and the budget allows, `dpharness
# profile` of fused and fused-kernels with ncu metrics of the top NCU kernels (kernels per step,
# where the time goes).
# The records and logs come back in $OUT/results.tgz.
# Usage (repo root, wheelhouse/ carried; DPH_GIT_SHA set):
#   BUDGET_S=540 bash .ci/gpu-kernels.sh        (SPLITS="" GATE=0 PROFILE=1 NCU=8 MICRO=1 REPLICATE=""
#   by default: the engine's default is 1,16 at a 16-row x 8-warp tile; 8,0 and 1,32 were measured
#   in sweeps 20261207T101821Z-129bb9 / T101943Z-93ecb5, 32 x 8 (the weight VJP's wider tile) and
#   1,16,16,4,1 (halves) in 20261207T210557Z-3c5609 / T210744Z-d633d7: none beat the default at 192
#   atoms. REPLICATE=2x2x2 runs the sweeps (not the profile) on the replicated cell (the microbenchmark
#   has 2 atoms x all slots best at 1,536 atoms: SPLITS="2,0 1,0"); MICRO=0 skips step (1))
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dph-out}
BUDGET_S=${BUDGET_S:-540}
SPLITS=${SPLITS-}
MICRO=${MICRO:-1}
REPLICATE=${REPLICATE:-}
rep=(); [ -n "$REPLICATE" ] && rep=(--replicate "$REPLICATE")
GATE=${GATE:-0}
PROFILE=${PROFILE:-1}
NCU=${NCU:-8}
mkdir -p "$OUT"
touch /tmp/gpu-kernels.start
end=$(( $(date +%s) + BUDGET_S ))
left() { echo $(( end - $(date +%s) )); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/card.txt"
make venv > "$OUT/venv-kernels.log" 2>&1 || { tail -20 "$OUT/venv-kernels.log"; exit 2; }
py=.venv/bin/python
bench() { $py -m harness bench --device cuda "$@" 2>&1 | grep -v "^\s*\[.*\] \[" | grep -v "^  \["; }
[ "$MICRO" = 1 ] && timeout 240 $py tools/bench_embed_kernels.py --out "$OUT/embed_kernels.json" > "$OUT/kernels.log" 2>&1
timeout 120 $py -m pytest -q -x tests/engines/test_embed_kernels.py tests/engines/test_embed_autograd.py \
  tests/engines/test_cotangent_autograd.py \
  -p no:cacheprovider 2>&1 | tail -4 | tee -a "$OUT/kernels.log"
: > "$OUT/bench.log"
for split in default $SPLITS; do  # default: the engine's own split, step (3)'s sweep
  [ "$(left)" -gt 150 ] || { echo "gpu-kernels: no time left for split $split" | tee -a "$OUT/bench.log"; break; }
  echo "== VJP launch $split (atoms,slots[,rows,warps[,halves]])" | tee -a "$OUT/bench.log"
  vars=()
  if [ "$split" != default ]; then
    IFS=, read -r atoms slots rows warps halves <<< "$split"
    vars=(DPH_FUSED_VJP_ATOMS="$atoms" DPH_FUSED_VJP_SLOTS="$slots" DPH_FUSED_VJP_ROWS="${rows:-0}"
          DPH_FUSED_VJP_WARPS="${warps:-0}" DPH_FUSED_VJP_HALVES="${halves:-0}")
  fi
  env "${vars[@]}" timeout $(( $(left) - 20 )) bash -c \
    "$(declare -f bench); py=$py; bench --system water ${rep[*]} --steps 300 --no-baseline --no-accuracy --variant fused --variant fused-kernels" \
    | tail -10 | tee -a "$OUT/bench.log"
done
if [ "$GATE" = 1 ] && [ "$(left)" -gt 200 ]; then
  timeout $(( $(left) - 20 )) bash -c "$(declare -f bench); py=$py; bench --system water ${rep[*]} --steps 300 --variant fused-kernels --gate-jobs 2" | tail -10 | tee -a "$OUT/bench.log"
fi
if [ "$PROFILE" = 1 ] && [ "$(left)" -gt 120 ]; then
  echo "== profile: fused, fused-kernels (ncu top $NCU)" | tee -a "$OUT/bench.log"
  timeout $(( $(left) - 20 )) $py -m harness profile --device cuda --system water --variant fused \
    --variant fused-kernels --steps 100 --ncu "$NCU" --ncu-timeout $(( ($(left) - 40) / 2 )) 2>&1 \
    | grep -v "^\s*\[.*\] \[" | tail -60 > "$OUT/profile.log"
  tail -25 "$OUT/profile.log"
fi
find results/runs -name '*.json' -newer /tmp/gpu-kernels.start > /tmp/gpu-kernels.list
tar czf "$OUT/results.tgz" -T /tmp/gpu-kernels.list results/work/*/train.log results/work/*/profile*.json 2>/dev/null
ls -la "$OUT"
