#!/usr/bin/env bash
# Round 5 (1 of 2): hadamard_quant writing int8 codes for the Mosaic GPU
# matmul. GPU tests of the kernels and packed linears, then the fused
# quantize benchmark (packed and int8 outputs; matmul share vs the Mosaic
# kernel the model runs).
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 240 python3 -m pytest -q --tb=short tests/pallas_kernels/test_hadamard_quant.py \
  tests/pallas_kernels/test_int4_matmul_mgpu.py tests/test_qlinear.py \
  tests/test_packed_model.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
timeout 300 python3 -m experiments.bench_hadamard_quant --out_dir="$OUT" \
  --m=2048,8192 --k=4096,11008 --num_warps=4 2>&1 | filter \
  | tee "$OUT/bench_hq.log"
