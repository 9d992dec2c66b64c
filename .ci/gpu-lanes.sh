#!/usr/bin/env bash
# One call on a several-GPU machine, used as independent single-GPU "lanes": lane i runs on GPU i
# only (CUDA_VISIBLE_DEVICES=i), pinned to its own share of the cores, so several system sweeps
# run side by side without sharing a card. Every ratio stays within one lane (one sweep, one
# card): each bench command is its own sweep with its own baseline.
# Usage (repo root on the GPU machine; carry wheelhouse and systems/water/data):
#   LANE0="bench water baseline,tos,graph,fused" \
#   LANE1="bench copper baseline,tos,graph; profile water baseline,graph" \
#   STEPS=200 GATE_JOBS=3 LANE_BUDGET_S=540 bash .ci/gpu-lanes.sh
#   A bench command may end with more bench arguments: "bench water baseline,fused --replicate 1x1x1,2x2x2"
# FAIR_SHARE=1 splits a lane's budget evenly over its remaining bench commands (several systems
# in sequence on one GPU).
# A lane is a ';'-separated list of "bench SYSTEM V1,V2,..." or "profile SYSTEM V1,V2,... [K]" run
# in order (K: Nsight Compute metrics for the top K kernels of each profiled variant); a lane that
# outlives LANE_BUDGET_S is stopped by SIGTERM: the harness writes every run it timed (those
# whose gate was cut say "not judged"), and later commands of the lane are skipped. Before that,
# bench's --time-budget (what is left of the lane) stops starting runs whose gates would not fit,
# so a tight lane ends with judged runs, not only timed ones.
set -u
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
STEPS=${STEPS:-200}
DEVICE=${DEVICE:-cuda}   # cpu: a dry run of the lanes machinery on a machine without GPUs
GATE_JOBS=${GATE_JOBS:-3}
LANE_BUDGET_S=${LANE_BUDGET_S:-540}
PROFILE_STEPS=${PROFILE_STEPS:-100}
OUT=${OUT:-/tmp/dph-out}
mkdir -p "$OUT"
t0=$(date +%s)
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/card.txt"
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
[ "$DEVICE" = cpu ] && NGPU=8   # the dry run: lanes share the CPU (CUDA_VISIBLE_DEVICES is moot)
if ! make venv > "$OUT/venv.log" 2>&1; then
  tail -20 "$OUT/venv.log"; echo "gpu-lanes: make venv failed (is wheelhouse/ carried?)" >&2; exit 2
fi
py=$PWD/.venv/bin/python
# build every variant once, before the lanes start (the lanes would otherwise race to build)
all=$(for i in 0 1 2 3 4 5 6 7; do v="LANE$i"; echo "${!v:-}"; done | tr ';' '\n' | awk 'NF>=3{print $3}' | tr ',' '\n' | sort -u)
$py -m harness build $all > "$OUT/build.log" 2>&1 || { tail -5 "$OUT/build.log"; exit 2; }
cores=$(nproc)
lanes=0; for i in 0 1 2 3 4 5 6 7; do v="LANE$i"; [ -n "${!v:-}" ] && lanes=$((i + 1)); done
[ "$lanes" -le "${NGPU:-0}" ] || { echo "gpu-lanes: $lanes lanes but $NGPU GPUs" >&2; exit 2; }
per=$((cores / (lanes > 0 ? lanes : 1)))
echo "gpu-lanes: $lanes lanes on $NGPU GPUs, $per cores each, steps $STEPS, gate jobs $GATE_JOBS (setup $(( $(date +%s) - t0 )) s)"

run_lane() {  # $1 = lane index, $2 = lane spec
  local i=$1 spec=$2 first=$(($1 * per)) last=$(($1 * per + per - 1))
  IFS=';' read -ra cmds <<< "$spec"
  local todo=${#cmds[@]}
  for c in "${cmds[@]}"; do
    todo=$((todo - 1))   # commands of this lane still to come after this one
    read -r what sys vs k <<< "$c"
    [ -n "${what:-}" ] || continue
    local args=""; for v in ${vs//,/ }; do args="$args --variant $v"; done
    echo "== lane $i (GPU $i, cores $first-$last): $what $sys $vs"
    # each command gets what is left of the lane's budget as its own time limit: the harness
    # takes the SIGTERM, writes every run it timed (unjudged if its gate was cut) and exits
    local left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -le 5 ]; then echo "== lane $i: budget spent, skipping: $what $sys $vs"; continue; fi
    if [ "$what" = bench ]; then
      # FAIR_SHARE=1: this command gets its share of what is left (a lane of several sweeps on one
      # GPU keeps time for the later systems); otherwise all of it
      if [ "${FAIR_SHARE:-0}" = 1 ]; then left=$(( left / (todo + 1) )); fi
      CUDA_VISIBLE_DEVICES=$i OMP_NUM_THREADS=$per timeout "$left" taskset -c "$first-$last" \
        $py -m harness bench --system "$sys" $args --steps "$STEPS" --device "$DEVICE" --gate-jobs "$GATE_JOBS" \
        --time-budget $(( left > 20 ? left - 10 : left )) ${k:-}
    elif [ "$what" = profile ]; then
      # ncu gets what the profiled runs (~45 s each) leave of this command's fair share of the
      # lane (the lane's later commands keep theirs), shared by the variants
      local nv; nv=$(echo "$vs" | tr ',' '\n' | grep -c .)
      local share=$(( left / (todo + 1) ))
      local nt=$(( (share - 45 * nv - 15) / nv )); [ "$nt" -ge 30 ] || nt=30
      CUDA_VISIBLE_DEVICES=$i OMP_NUM_THREADS=$per timeout "$left" taskset -c "$first-$last" \
        $py -m harness profile --system "$sys" $args --steps "$PROFILE_STEPS" --device "$DEVICE" \
        ${k:+--ncu $k --ncu-timeout $nt}
    else
      echo "gpu-lanes: unknown lane command '$what' (bench|profile)"
    fi
  done
}

DEADLINE=$(( $(date +%s) + LANE_BUDGET_S ))
pids=()
for i in $(seq 0 $((lanes - 1))); do
  v="LANE$i"
  [ -n "${!v:-}" ] || continue
  # the outer timeout is only a safety net: the commands inside stop themselves at DEADLINE
  ( timeout -k 10 $((LANE_BUDGET_S + 60)) bash -c "$(declare -f run_lane); per=$per; py=$py; STEPS=$STEPS; \
      GATE_JOBS=$GATE_JOBS; DEVICE=$DEVICE; PROFILE_STEPS=$PROFILE_STEPS; DEADLINE=$DEADLINE; FAIR_SHARE=${FAIR_SHARE:-0}; run_lane $i \"${!v}\"" \
      > "$OUT/lane$i.log" 2>&1; echo "lane $i exit $?" >> "$OUT/lane$i.log" ) &
  pids+=($!)
done
wait "${pids[@]}"
for i in $(seq 0 $((lanes - 1))); do
  echo "---- lane $i"; grep -vE "^\s*\[.*\] \[|^  \[" "$OUT/lane$i.log" | grep -E "^(system|variant|water|copper|alcumg|==|lane|wrote|-|\S+ +\S+ +[0-9]+ |\S+ +[0-9.]+ +[0-9.]+ |\[\S+\] (ncu|Nsight)|  +[0-9.-]+ +[0-9.-]+ )" | tail -40
done
tar czf "$OUT/results.tgz" results/runs results/calibration $(ls -d results/work/*/train.log results/work/*/lcurve.out \
  results/work/*/profile.json results/work/*/steps.json results/work/*/ncu.json 2>/dev/null) 2>/dev/null
echo "gpu-lanes: done in $(( $(date +%s) - t0 )) s"
