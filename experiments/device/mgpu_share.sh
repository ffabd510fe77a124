#!/usr/bin/env bash
# Mosaic GPU W4A4: warpgroups sharing the weight widening (wg 'm'). GPU tests
# of the kernel (share configs first), then the 7B-shape benchmark with the
# shared-widening configs among the candidates.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 150 python3 -m pytest -q -x --tb=short tests/pallas_kernels/test_int4_matmul_mgpu.py \
  -k "share" 2>&1 | tail -30 | tee "$OUT/gpu_tests_share.log"
timeout 100 python3 -m pytest -q --tb=line tests/pallas_kernels/test_int4_matmul_mgpu.py \
  2>&1 | tail -8 | tee "$OUT/gpu_tests_mgpu.log"
timeout 300 python3 -m experiments.bench_int4_matmul --out_dir="$OUT" --kernels=mosaic \
  --m=2048,8192 --kn=4096x4096,4096x11008,11008x4096 2>&1 | filter \
  | tee "$OUT/bench_mgpu.log"
