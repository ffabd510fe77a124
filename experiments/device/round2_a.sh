#!/usr/bin/env bash
# Device call 1 of 2 (second round): stage the GGUF's first half; the
# GPU-only tests; the layer/decode/model benchmarks that did not fit before.
set -uo pipefail
bash experiments/device/stage_part1.sh > /dev/null
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn|it/s\]|s/it\]"; }
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -4 | tee "$OUT/gpu_tests.log"
timeout 200 python3 -m experiments.bench_model --out_dir="$OUT" \
  --benchmarks=layer_prefill --models=llama2-7b,llama2-13b,llama3-8b \
  --layer_batches=1,4,16 2>&1 | filter | tee "$OUT/bench_layer.log"
timeout 230 python3 -m experiments.bench_model --out_dir="$OUT" \
  --benchmarks=decode_throughput,model_prefill --models=llama2-7b \
  --decode_batches=16 --prefills=1024,4096 --model_batches=1 2>&1 \
  | filter | tee "$OUT/bench_model.log"
