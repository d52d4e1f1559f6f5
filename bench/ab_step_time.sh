#!/usr/bin/env bash
# One-GPU step time of two trees in one device call, alternated (before, after, before, after) so
# drift of the machine falls on both: issue 19's "same step time within noise" check.
#   git archive <before-commit> | (mkdir -p .carry/before && tar -x -C .carry/before)   # on the host
#   BEFORE=.carry/before bash bench/ab_step_time.sh                                     # one device call, carry .carry
# Needs OUT. CONFIG (default configs/tinyllama_1b.yml) and STEPS/WARMUP as bench_train.py takes them.
set -euo pipefail
: "${OUT:?set OUT}" "${BEFORE:?set BEFORE to the unpacked before-tree}"
CONFIG=${CONFIG:-configs/tinyllama_1b.yml}
AFTER=$PWD
for round in 1 2; do
  for side in before after; do
    tree=$([[ $side == before ]] && echo "$BEFORE" || echo "$AFTER")
    (cd "$tree" && timeout 900 python bench/bench_train.py --config "$CONFIG" --steps "${STEPS:-30}" \
        --warmup "${WARMUP:-10}" --log-interval 10 --work "/tmp/neox_ab_$side" --out "$OUT/$side$round" \
        > "$OUT/$side$round.log" 2>&1) || echo "$side$round failed: see $OUT/$side$round.log"
    echo "== $side (round $round)"; grep -A2 '^who' "$OUT/$side$round.log" || tail -3 "$OUT/$side$round.log"
  done
done
