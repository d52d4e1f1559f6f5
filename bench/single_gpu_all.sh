#!/usr/bin/env bash
# Issue 8's three single-GPU comparisons in one device call, most important first, each with its
# peers in the same call:  bash bench/single_gpu_all.sh $OUT   (needs .carry/peers.py; ~13 min on an H100: run it as two calls with ONLY)
#   1. TinyLlama-1.1B shape, seq 4096, micro-batch 4 (configs/tinyllama_1b.yml as committed)
#   2. the same at seq 2048
#   3. the 125M class (configs/125M.yml: seq 2048, micro-batch 8) with TinyLlama's one-GPU settings
# A part that hits its time limit is cut; the parts before it are already written under OUT.
# ONLY="tinyllama_2048 125M" runs just those parts.
set -u
OUT=${1:-${OUT:-runs/bench}}
PEERS=${PEERS:-.carry/peers.py}
ONE_GPU=(--set torch_compile=true --set torch_compile_tuning=true --set precision=fp32
         --set 'bf16={enabled: false}' --set 'data_types={}' --set 'torch_autocast={enabled: true, dtype: bfloat16}'
         --set 'zero_optimization={stage: 0}' --set optimizer_master_weights=true)
run() {  # name, seconds, bench_train.py arguments...
  local name=$1 limit=$2; shift 2
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
  echo "== $name"
  timeout "$limit" python bench/bench_train.py --peers "$PEERS" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  pkill -f "$PWD/train.py" 2>/dev/null && sleep 3  # a cut run leaves its rank behind, holding the port
  grep -A8 '^who' "$OUT/$name.log" || tail -5 "$OUT/$name.log"
}
mkdir -p "$OUT"
run tinyllama_4096 340 --config configs/tinyllama_1b.yml --steps 30 --warmup 10 --log-interval 10
run tinyllama_2048 260 --config configs/tinyllama_1b.yml --steps 30 --warmup 10 --log-interval 10 --set seq_length=2048
run 125M 200 --config configs/125M.yml --steps 30 --warmup 10 --log-interval 10 "${ONE_GPU[@]}"
