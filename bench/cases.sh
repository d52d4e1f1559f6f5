# Sourced by the device-call scripts (single_gpu_all.sh, single_gpu_levers.sh): one bench_train.py
# run per case, under a time limit, skipped unless named in ONLY (when set). Needs OUT; PEERS, when
# set, runs the peers after neox on the same shape.
bench_case() {  # name, seconds, bench_train.py arguments...
  local name=$1 limit=$2; shift 2
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
  echo "== $name"
  timeout "$limit" python bench/bench_train.py ${PEERS:+--peers "$PEERS"} --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  # A cut run leaves the launcher and its rank behind, holding the rendezvous port; SIGTERM only asks
  # the rank to stop at its next step boundary (preemption handling), which a compiling rank never reaches.
  pkill -9 -f "$PWD/(deepy|train)\.py" 2>/dev/null && sleep 3
  grep -A8 '^who' "$OUT/$name.log" || tail -5 "$OUT/$name.log"
}
