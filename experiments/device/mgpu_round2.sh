#!/usr/bin/env bash
# Mosaic GPU W4A4 matmul, round 2: GPU tests (kernel configs, qlinear
# dispatch, packed model on the wgmma kernel), then the matmul benchmark at
# every issue shape (in-kernel weight widening and pre-widened int8 weights).
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 170 python3 -m pytest -q --tb=line tests/pallas_kernels/test_int4_matmul_mgpu.py \
  tests/test_qlinear.py tests/test_packed_model.py -k "gpu or mgpu or w4a4_matmul" \
  2>&1 | tail -25 | tee "$OUT/gpu_tests_mgpu.log"
timeout 400 python3 -m experiments.bench_int4_matmul --out_dir="$OUT" --kernels=mosaic \
  2>&1 | filter | grep -v -E "Int4MatmulMgpuConfig\(.*[0-9] ms$" | tee "$OUT/bench_mgpu.log"
