#!/usr/bin/env bash
# Device call 1 of 2 (third round): stage the GGUF's first half; layer
# prefill at batch 16 and at LLaMA-2-13B / LLaMA-3-8B shapes.
set -uo pipefail
bash experiments/device/stage_part1.sh > /dev/null
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn|it/s\]|s/it\]"; }
timeout 150 python3 -m experiments.bench_model --out_dir="$OUT" \
  --benchmarks=layer_prefill --models=llama2-13b,llama3-8b \
  --layer_batches=1,4 2>&1 | filter | tee "$OUT/bench_layer.log"
