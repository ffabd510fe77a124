#!/usr/bin/env bash
# Mosaic GPU W4A4 matmul: GPU tests, then its benchmark against XLA bf16/int8.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 200 python3 -m pytest -q --tb=short tests/pallas_kernels/test_int4_matmul_mgpu.py \
  2>&1 | tail -60 | tee "$OUT/gpu_tests_mgpu.log"
timeout 330 python3 -m experiments.bench_int4_matmul --out_dir="$OUT" --kernels=mosaic \
  --m=2048,8192 --kn=4096x4096,4096x11008,11008x4096 2>&1 | filter | tee "$OUT/bench_mgpu.log"
