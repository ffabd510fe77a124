#!/usr/bin/env bash
# Round 7d: GPU tests; the quantize-only kernel (block_elements) at more
# widths; one LLaMA layer's prefill with it inside the model.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn|it/s\]|s/it\]"; }
timeout 200 python3 -m pytest -q --tb=line tests/pallas_kernels/test_hadamard_quant.py \
  tests/pallas_kernels/test_w4a16_matmul.py 2>&1 | tail -25 > "$OUT/gpu_tests.log"
tail -4 "$OUT/gpu_tests.log"
timeout 200 python3 -m experiments.bench_hadamard_quant --out_dir="$OUT" \
  --m=2048,8192,16384 --k=4096,11008,14336 --num_warps=4,8 \
  --transform=quant_only --block_elements=4096,8192,16384 \
  2>&1 | filter > "$OUT/bench_hq.log"
grep "^hadamard_quant" "$OUT/bench_hq.log"
timeout 200 python3 -m experiments.bench_model --out_dir="$OUT" \
  --benchmarks=layer_prefill --models=llama2-7b,llama2-13b \
  --layer_batches=1,4 2>&1 | filter | tee "$OUT/bench_layer.log" | tail -40
