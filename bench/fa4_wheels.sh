#!/usr/bin/env bash
# FlashAttention-4 for a device machine that cannot reach a package registry (Python 3.12, x86_64,
# CUDA 13 torch), packed to travel in two device calls of under 64 MiB each:
#   bash bench/fa4_wheels.sh [DIR]   # default .fa4; writes DIR/part1.so.xz (~50 MB) and DIR/part2.tar.xz (~20 MB)
# On the device, after both halves are there:
#   mkdir -p $S && tar -C $S -xJf part2.tar.xz && xz -dc part1.so.xz > $S/$(cat part1.path)
#   export PYTHONPATH=$S:$S/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH   # the wheel's .pth, which --target skips
# (docs/performance.md, "Next device calls": the first call copies part1 to /tmp, the second brings part2.)
set -euo pipefail
DIR=${1:-.fa4}
TMP=$(mktemp -d)
mkdir -p "$DIR" "$TMP/whl"
PLAT=(--python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64)
python3 -m pip download -q --no-deps -d "$TMP/whl" "${PLAT[@]}" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
  nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
  quack-kernels==0.6.5 "apache-tvm-ffi<0.2,>=0.1.11" torch-c-dlpack-ext
python3 -m pip install -q --no-index --no-deps --no-compile --target "$TMP/site" "${PLAT[@]}" "$TMP"/whl/*.whl
BIG=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
echo "$BIG" > "$DIR/part1.path"
xz -9 -T2 -c "$TMP/site/$BIG" > "$DIR/part1.so.xz"
tar -C "$TMP/site" --exclude="./$BIG" -cf - . | xz -9 -T2 > "$DIR/part2.tar.xz"
ls -la "$DIR"; rm -rf "$TMP"
