#!/usr/bin/env bash
# Mosaic GPU W4A4 matmul, round 6: its GPU tests (with the shared-memory fix
# to the config test), then the 13B and 70B FFN shapes.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 150 python3 -m pytest -q --tb=short tests/pallas_kernels/test_int4_matmul_mgpu.py \
  2>&1 | tail -8 | tee "$OUT/gpu_tests_mgpu.log"
timeout 400 python3 -m experiments.bench_int4_matmul --out_dir="$OUT" --kernels=mosaic \
  --m=2048,8192 --kn=5120x13824,13824x5120,8192x28672,28672x8192 2>&1 | filter \
  | tee "$OUT/bench_mgpu.log" | grep -v -E "Int4MatmulMgpuConfig\(.*[0-9] ms$|None: [0-9.]+ ms$"
