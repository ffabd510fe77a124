#!/usr/bin/env bash
# Round 7b: GPU tests of hadamard_quant and w4a16; the quantize-only kernel
# (block_elements) timed per config (this run also swept a butterfly left
# factor, HadamardQuantConfig.left, since removed: BENCHMARKS.md); W4A16 with the
# in-kernel atomic K-split reduction, timed over 32 layers by lax.map and by
# an unrolled loop over 32 separate weights.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 150 python3 -m pytest -q --tb=short tests/pallas_kernels/test_hadamard_quant.py \
  tests/pallas_kernels/test_w4a16_matmul.py \
  2>&1 | tail -8 | tee "$OUT/gpu_tests.log"
timeout 170 python3 -m experiments.bench_hadamard_quant --out_dir="$OUT" \
  --m=2048,8192,16384 --k=4096,11008 --num_warps=4,8 --rows_per_program=1 \
--block_elements=4096,8192,16384,32768 \
  2>&1 | filter > "$OUT/bench_hq.log"
grep "^hadamard_quant" "$OUT/bench_hq.log"
for timing in unrolled map; do
  timeout 120 python3 -m experiments.bench_int4_matmul --out_dir="$OUT" --kernels=w4a16 \
    --kn=4096x4096,4096x11008,11008x4096 --decode_m=1,16 \
    --decode_layers=32 --decode_timing=$timing 2>&1 | filter > "$OUT/bench_w4a16_$timing.log"
  grep -E "^w4a16|->" "$OUT/bench_w4a16_$timing.log"
done
