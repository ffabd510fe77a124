#!/usr/bin/env bash
# hadamard_quant with several rows per program: GPU tests, then the
# benchmark sweeping rows_per_program (1 = the previous kernel) and warps.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 150 python3 -m pytest -q --tb=short tests/pallas_kernels/test_hadamard_quant.py \
  2>&1 | tail -8 | tee "$OUT/gpu_tests.log"
timeout 380 python3 -m experiments.bench_hadamard_quant --out_dir="$OUT" \
  --m=2048,8192 --k=4096,11008 --num_warps=4,8 --rows_per_program=1,4,8 \
  2>&1 | filter | tee "$OUT/bench_hq.log"
