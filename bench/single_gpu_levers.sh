#!/usr/bin/env bash
# Issue 8's micro-batch and activation-recompute levers (~13 min on a cold H100, so two calls:
# ONLY="base mbs8 mbs8_budget", then ONLY="base mbs16_budget mbs8_full_ac"; no peers: every
# case is compared with the committed config, run first in the same call):
#   bash bench/single_gpu_levers.sh $OUT        (ONLY="base mbs8" runs just those cases)
#   base          configs/tinyllama_1b.yml as committed (micro-batch 4)
#   mbs8          micro-batch 8, no activation checkpointing
#   mbs8_budget   micro-batch 8, torch_compile_memory_budget 0.5 (compiler-chosen selective recompute)
#   mbs16_budget  micro-batch 16, torch_compile_memory_budget 0.5 (does halving the activations fit 2x?)
#   mbs8_full_ac  micro-batch 8, checkpoint_activations (every block recomputed)
# Results: OUT/<case>/bench_results.jsonl (tokens/s, TFLOP/s, ms/step, peak GiB) and OUT/<case>.log.
set -u
OUT=${1:-${OUT:-runs/levers}}
TINY=(--config configs/tinyllama_1b.yml --steps 30 --warmup 10 --log-interval 10)
PEERS=
source bench/cases.sh
mkdir -p "$OUT"
bench_case base 170 "${TINY[@]}"
bench_case mbs8 170 "${TINY[@]}" --set train_micro_batch_size_per_gpu=8
bench_case mbs8_budget 200 "${TINY[@]}" --set train_micro_batch_size_per_gpu=8 --set torch_compile_memory_budget=0.5
bench_case mbs16_budget 220 "${TINY[@]}" --set train_micro_batch_size_per_gpu=16 --set torch_compile_memory_budget=0.5
bench_case mbs8_full_ac 170 "${TINY[@]}" --set train_micro_batch_size_per_gpu=8 --set checkpoint_activations=true
