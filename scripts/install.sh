#!/usr/bin/env bash
# One-command install: torch first (CPU wheel here; keep the CUDA build you have on a GPU machine),
# then DeepSpeed without compiling any op, then neox and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
if ! ${PYTHON:-python3} -c "import torch" 2>/dev/null; then
    $PIP install -q "torch==${NEOX_TORCH_VERSION:-2.13.0}"
fi
$PIP install -q "setuptools>=61" wheel  # DeepSpeed and neox build without isolation
$PIP install -q -r requirements.txt
DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "deepspeed==0.19.8"
$PIP install -q -r requirements-dev.txt
$PIP install -q "lm_eval[hf]==0.4.13"  # lm-evaluation-harness: eval.py and eval_tasks; imported only when used
$PIP install -q --no-deps "torchao==0.18.0"  # FP8 training (fp8_recipe); imported only when FP8 is on
# FlashAttention-4 (CuTe DSL wheels, no CUDA compile) on Hopper/Blackwell GPUs: the flash attention backend's
# kernel there (neox/model/flash.py; 1.18x cuDNN at head dim 64 on an H200, docs/performance.md). NEOX_NO_FA4=1 skips it.
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 || true)
if [[ -z "${NEOX_NO_FA4:-}" && ( $CC == 9.* || $CC == 10.* ) ]]; then
    CU=$(${PYTHON:-python3} -c "import torch; print((torch.version.cuda or '').split('.')[0])")
    EXTRA=$([[ $CU == 13 ]] && echo "[cu13]" || true)  # CuTe DSL's runtime for CUDA 13 builds of torch; cu12 is its default
    $PIP install -q "flash-attn-4${EXTRA}==4.0.0b36" "nvidia-cutlass-dsl${EXTRA}==4.8.1" "quack-kernels==0.6.5"
fi
$PIP install -q --no-deps --no-build-isolation -e .
echo "neox installed: $(${PYTHON:-python3} -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
