#!/usr/bin/env bash
# Issue 20's FP8 measurements on ONE H200, through the real training path (bench/bench_train.py ->
# deepy.py train.py), each neox figure with its peers from the same call. From the repo root:
#   mkdir -p .carry && cp ../shared/bench/peers.py ../shared/bench/fsdp2_anchor.py .carry/   # carry: [".carry"]
#   PART=1 bash bench/fp8.sh      # then PART=2 .. 6: one device call each, each under ~9 min cold
# Logs and bench_results.jsonl under $OUT/<case>/ (OUT defaults to ./out); a one-line table per case.
#   PART=1  TinyLlama shape (seq 4096, mbs 4), configs/tinyllama_1b.yml as committed: neox bf16 with peers.py
#           plain_compile; the FSDP2 anchor bf16 and FP8=tensorwise (AC=0, mbs 4)
#   PART=2  TinyLlama shape: neox bf16, neox FP8 tensorwise (profiled on its last step), then FP8 rowwise
#   PART=3  Llemma-7B shape at TP 1 (fast settings, no checkpointing, mbs 2): neox bf16 (profiled on step 13),
#           neox FP8 tensorwise, then the FSDP2 + FP8 anchor (AC=0, mbs 2) in what is left of ~9.5 min
#   PART=4  Llemma-7B FP8 tensorwise: mbs 1 without and mbs 2 with checkpoint_activations; FSDP2 + FP8 anchor (AC=0, mbs 2)
#   PART=5  FP8 numerics: 300 steps of the 125M class on Markov data, bf16 vs tensorwise vs rowwise
#           (bench/fp8_loss.py; prints the max relative loss difference after warm-up, tolerance 1.5%)
#   PART=6  Llemma-7B bf16 at mbs 2, lever L0: compile tuning off / on (L1, accumulation 2 summed in bf16, ran out
#           of memory in session 8, with and without expandable segments: dropped)
#   PART=7  Llemma-7B bf16 with FA4 (4 GiB less at the peak than SDPA): mbs 2, then L1 again (mbs 2, accumulation 2
#           summed in bf16), then mbs 3; FP8 tensorwise at mbs 2 in what is left
#   PART=8  Llemma-7B bf16 with FA4, mbs 2, summed in bf16: accumulation 2 (4 sequences a step), then 4 (8 sequences:
#           Llemma's batch per data-parallel rank, mbs 4 x accumulation 2 in configs/llemma_7b.yml) on the same
#           Inductor cache (warm); GEMM=1 sets NEOX_GEMM_GRAD_ACCUMULATION=1 for both
# Every neox run compiles cold (60-160 s), so the runs are short: 20 steps, the first 10 left out,
# medians over two 5-step records. The TinyLlama runs use the committed config as is (torch_compile_tuning
# on); the 7B runs the same fast settings with tuning off to fit the time (TUNING=1 turns it on there).
# ONLY="case ..." runs just those cases of the part (names as printed after "==").
set -u
OUT=${OUT:-out}
PART=${PART:-1}
PEER_FILE=${PEERS:-.carry/peers.py}
unset PEERS  # cases.sh runs peers after every case when PEERS is set: only tiny_bf16 asks
ANCHOR=${ANCHOR:-.carry/fsdp2_anchor.py}
export OUT
mkdir -p "$OUT"
source bench/cases.sh
python -c "import torchao.float8" 2>/dev/null || { echo "fp8.sh: torchao is not importable (scripts/install.sh installs torchao==0.18.0)"; exit 1; }

STEPS=(--steps 20 --warmup 10 --log-interval 5)
# The committed one-GPU fast settings (configs/tinyllama_1b.yml), written out for the 7B shape config.
FAST=(--set torch_compile=true --set torch_compile_tuning="$([[ ${TUNING:-0} == 1 ]] && echo true || echo false)"
      --set precision=fp32 --set 'bf16={enabled: false}' --set 'data_types={}'
      --set 'torch_autocast={enabled: true, dtype: bfloat16}' --set 'zero_optimization={stage: 0}'
      --set optimizer_master_weights=true)
# One data folder per vocabulary: bench_train.py reuses a folder's tokenizer and tokens as they are.
TINY=(--config configs/tinyllama_1b.yml --work /tmp/neox_bench_fp8_32000 "${STEPS[@]}")
L7B=(--config configs/bench/llemma_7b_shape.yml --work /tmp/neox_bench_fp8_32016 "${STEPS[@]}" "${FAST[@]}"
     --set model_parallel_size=1 --set num_gpus=1)
TINY_SHAPE=(--layers 22 --hidden 2048 --heads 32 --kv 4 --ffn 5632 --vocab 32000 --seq 4096 --mbs 4)
L7B_SHAPE=(--layers 32 --hidden 4096 --heads 32 --kv 32 --ffn 11008 --vocab 32016 --seq 4096)

copy_profile() {  # case: its profile summary and the top of its kernel table beside its log
  cp "$OUT/$1/logs/profile/summary_rank0.json" "$OUT/$1.profile.json" 2>/dev/null &&
    head -60 "$OUT/$1/logs/profile/kernels_rank0.txt" > "$OUT/$1.kernels.txt" && head -30 "$OUT/$1.profile.json"
}

anchor_case() {  # name, seconds, FP8 recipe ("" = bf16), AC (0/1), fsdp2_anchor.py shape arguments...
  local name=$1 limit=$2 fp8=$3 ac=$4; shift 4
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
  echo "== $name"
  [[ -f $ANCHOR ]] || { echo "fp8.sh: $ANCHOR missing (cp ../shared/bench/{peers,fsdp2_anchor}.py .carry/)"; return 0; }
  FP8=$fp8 AC=$ac timeout "$limit" python -m torch.distributed.run --standalone --nproc_per_node 1 "$ANCHOR" "$@" \
    > "$OUT/$name.log" 2>&1
  pkill -9 -f "$ANCHOR" 2>/dev/null && sleep 3
  if grep '^{' "$OUT/$name.log"; then grep '^{' "$OUT/$name.log" >> "$OUT/anchors.jsonl"; else tail -5 "$OUT/$name.log"; fi
}

case $PART in
1)
  PEERS=$PEER_FILE bench_case tiny_bf16 330 "${TINY[@]}" --peer-which plain_compile
  anchor_case tiny_anchor_bf16 120 "" 0 "${TINY_SHAPE[@]}"
  anchor_case tiny_anchor_fp8_tensorwise 130 tensorwise 0 "${TINY_SHAPE[@]}" ;;
2)
  bench_case tiny_bf16 200 "${TINY[@]}"
  bench_case tiny_fp8_tensorwise 300 "${TINY[@]}" --steps 22 --set fp8_recipe=tensorwise \
    --set profile=true --set profile_step_start=20 --set profile_step_stop=21
  copy_profile tiny_fp8_tensorwise
  bench_case tiny_fp8_rowwise 200 "${TINY[@]}" --set fp8_recipe=rowwise ;;
3)
  bench_case 7b_bf16_mbs2 250 "${L7B[@]}" --set train_micro_batch_size_per_gpu=2 --steps 14 --warmup 6 --log-interval 2 \
    --set profile=true --set profile_step_start=12 --set profile_step_stop=13
  copy_profile 7b_bf16_mbs2
  bench_case 7b_fp8_tensorwise_mbs2 300 "${L7B[@]}" --set train_micro_batch_size_per_gpu=2 --set fp8_recipe=tensorwise
  left=$((570 - SECONDS))
  if (( left > 60 )); then anchor_case 7b_anchor_fp8_tensorwise_mbs2 "$left" tensorwise 0 "${L7B_SHAPE[@]}" --mbs 2; fi ;;
4)
  bench_case 7b_fp8_tensorwise_mbs1 200 "${L7B[@]}" --set train_micro_batch_size_per_gpu=1 --set fp8_recipe=tensorwise
  bench_case 7b_fp8_tensorwise_mbs2_ckpt 200 "${L7B[@]}" --set train_micro_batch_size_per_gpu=2 --set fp8_recipe=tensorwise \
    --set checkpoint_activations=true
  anchor_case 7b_anchor_fp8_tensorwise_mbs2 130 tensorwise 0 "${L7B_SHAPE[@]}" --mbs 2 ;;
5)
  [[ -z "${ONLY:-}" || " $ONLY " == *" loss "* ]] || exit 0
  echo "== loss"
  timeout 520 python bench/fp8_loss.py --config configs/125M.yml --steps 300 --log-interval 10 --warmup 50 \
    --recipes tensorwise,rowwise --out "$OUT/fp8_loss" "${FAST[@]}" --set torch_compile_tuning=false \
    > "$OUT/fp8_loss.log" 2>&1
  pkill -9 -f "$PWD/(deepy|train)\.py" 2>/dev/null && sleep 3
  grep -A4 '^FP8 vs bf16' "$OUT/fp8_loss.log" || tail -20 "$OUT/fp8_loss.log" ;;
6)
  # Lever L0 (docs/performance.md, 7B bf16): compile tuning, which PART 3 turns off to fit the time
  bench_case 7b_bf16_mbs2 200 "${L7B[@]}" --set train_micro_batch_size_per_gpu=2
  bench_case 7b_bf16_mbs2_tuned 260 "${L7B[@]}" --set train_micro_batch_size_per_gpu=2 --set torch_compile_tuning=true ;;
7)
  bench_case 7b_bf16_mbs2 200 "${L7B[@]}" --set train_micro_batch_size_per_gpu=2 --steps 14 --warmup 6 --log-interval 2
  bench_case 7b_bf16_mbs2_ga2 170 "${L7B[@]}" --set train_micro_batch_size_per_gpu=2 --steps 10 --warmup 4 --log-interval 2 \
    --set gradient_accumulation_steps=2 --set 'data_types={grad_accum_dtype: bf16}'
  bench_case 7b_bf16_mbs3 170 "${L7B[@]}" --set train_micro_batch_size_per_gpu=3 --steps 12 --warmup 6 --log-interval 2
  left=$((570 - SECONDS))
  if (( left > 100 )); then bench_case 7b_fp8_tensorwise_mbs2 "$left" "${L7B[@]}" --set train_micro_batch_size_per_gpu=2 \
    --set fp8_recipe=tensorwise --steps 14 --warmup 6 --log-interval 2; fi ;;
8)
  BF16_SUMS=(--set train_micro_batch_size_per_gpu=2 --set 'data_types={grad_accum_dtype: bf16}' --steps 10 --warmup 4
             --log-interval 2)
  [[ ${GEMM:-0} == 1 ]] && export NEOX_GEMM_GRAD_ACCUMULATION=1
  bench_case 7b_bf16_mbs2_ga2 250 "${L7B[@]}" "${BF16_SUMS[@]}" --set gradient_accumulation_steps=2
  bench_case 7b_bf16_mbs2_ga4 220 "${L7B[@]}" "${BF16_SUMS[@]}" --set gradient_accumulation_steps=4 ;;
*) echo "fp8.sh: PART must be 1-8, got $PART"; exit 2 ;;
esac
