#!/usr/bin/env bash
# Triton W4A4 after restoring one `acc +=` per dot (g128.sh measured the
# per-channel kernel slower than in earlier runs): tests, short benchmark.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 100 python3 -m pytest -q --tb=short tests/pallas_kernels/test_int4_matmul.py -k "w4a4" \
  2>&1 | tail -5 | tee "$OUT/gpu_tests.log"
timeout 200 python3 -m experiments.bench_int4_matmul --out_dir="$OUT" \
  --kernels=triton,triton_g128 --m=2048,8192 --kn=4096x4096,11008x4096 2>&1 \
  | filter | tee "$OUT/bench.log" | grep -E "^M|->|WRONG|failed"
