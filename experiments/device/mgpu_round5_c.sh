#!/usr/bin/env bash
# Round 5 (3 of 3): the packed model's GPU test, then one LLaMA-2-7B layer
# and the whole 7B model at prefill, bf16 vs W4A4KV4 on the wgmma matmul
# (and on the Triton and XLA int8 matmuls, side by side).
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn|it/s\]|s/it\]"; }
timeout 90 python3 -m pytest -q --tb=short tests/test_packed_model.py -k gpu \
  2>&1 | tail -5 | tee "$OUT/gpu_tests.log"
timeout 200 python3 -m experiments.bench_model --out_dir="$OUT" \
  --benchmarks=layer_prefill --models=llama2-7b --layer_batches=1,4 \
  2>&1 | filter | tee "$OUT/bench_layer.log"
timeout 250 python3 -m experiments.bench_model --out_dir="$OUT" \
  --benchmarks=model_prefill --models=llama2-7b --model_batches=1 \
  2>&1 | filter | tee "$OUT/bench_model.log"
