#!/usr/bin/env bash
# Mosaic GPU W4A4 matmul, round 4 (1 of 2): GPU tests, then the matmul
# benchmark at LLaMA-2-7B shapes for the four operand variants.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 170 python3 -m pytest -q --tb=line tests/pallas_kernels/test_int4_matmul_mgpu.py \
  tests/test_qlinear.py tests/test_packed_model.py -k "gpu or mgpu or w4a4_matmul" \
  2>&1 | tail -15 | tee "$OUT/gpu_tests_mgpu.log"
timeout 330 python3 -m experiments.bench_int4_matmul --out_dir="$OUT" --kernels=mosaic \
  --m=2048,8192 --kn=4096x4096,4096x11008,11008x4096 2>&1 | filter \
  | tee "$OUT/bench_mgpu.log" | grep -v -E "Int4MatmulMgpuConfig\(.*[0-9] ms$|None: [0-9.]+ ms$"
