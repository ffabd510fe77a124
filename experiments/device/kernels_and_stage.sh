#!/usr/bin/env bash
# Device call 1 of 2: stage the GGUF's first half; run the kernel and
# packed-model tests on the GPU (Pallas, not interpret); benchmark the fused
# Hadamard-quantize and the KV4 decode attention. Results go to $OUT.
set -uo pipefail
bash experiments/device/stage_part1.sh > /dev/null
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn|it/s\]|s/it\]"; }
timeout 220 python3 -m pytest -q tests/pallas_kernels tests/test_qlinear.py tests/test_packed_model.py -k "not gptq and not convert" \
  2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
timeout 150 python3 -m experiments.bench_hadamard_quant --out_dir="$OUT" 2>&1 \
  | filter | tee "$OUT/bench_hadamard_quant.log"
timeout 150 python3 -m experiments.bench_kv4_attention --out_dir="$OUT" 2>&1 \
  | filter | tee "$OUT/bench_kv4_attention.log"
