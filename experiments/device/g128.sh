#!/usr/bin/env bash
# W4A4 with group-128 scales (Triton kernel): GPU tests, then the benchmark
# next to the per-channel Triton kernel at LLaMA-2-7B shapes.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 120 python3 -m pytest -q --tb=short tests/pallas_kernels/test_int4_matmul.py \
  2>&1 | tail -12 | tee "$OUT/gpu_tests.log"
timeout 300 python3 -m experiments.bench_int4_matmul --out_dir="$OUT" \
  --kernels=triton,triton_g128 --m=2048,8192 \
  --kn=4096x4096,4096x11008,11008x4096 2>&1 | filter | tee "$OUT/bench.log" \
  | grep -E "^M|->|WRONG|failed"
