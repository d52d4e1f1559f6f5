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
$PIP install -q --no-deps --no-build-isolation -e .
echo "neox installed: $(${PYTHON:-python3} -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
