#!/usr/bin/env bash
# Round 5 (2 of 3): GPU tests round 5a's time limit cut short, then the
# fused quantize benchmark again with int8 codes written as two halves.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 300 python3 -m pytest -q --tb=short tests/pallas_kernels/test_hadamard_quant.py \
  tests/test_qlinear.py tests/test_packed_model.py 2>&1 | tail -25 \
  | tee "$OUT/gpu_tests.log"
timeout 200 python3 -m experiments.bench_hadamard_quant --out_dir="$OUT" \
  --m=2048,8192 --k=4096,11008 --num_warps=4,8 --packed=false 2>&1 | filter \
  | tee "$OUT/bench_hq.log"
