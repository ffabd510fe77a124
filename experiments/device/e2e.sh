#!/usr/bin/env bash
# Device call 2 of 2 (right after kernels_and_stage.sh): join the GGUF; the
# real int4 path against simulated quantization on SmolLM2; the layer,
# decode and whole-model benchmarks at LLaMA shapes. Results go to $OUT.
set -uo pipefail
source experiments/device/setup_env.sh
set +e
export QUAROT_JAX_CACHE=/root/stage/cache
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn|it/s\]|s/it\]"; }
timeout 200 python3 -m experiments.real_vs_simulated --w_method=gptq \
  --max_windows=40 --out_dir="$OUT" 2>&1 | filter | tee "$OUT/real_vs_simulated.log"
timeout 120 python3 -m experiments.bench_model --out_dir="$OUT" \
  --benchmarks=layer_prefill,decode_memory \
  --models=llama2-7b,llama2-13b,llama3-8b 2>&1 | filter | tee "$OUT/bench_layer.log"
timeout 200 python3 -m experiments.bench_model --out_dir="$OUT" \
  --benchmarks=decode_throughput,model_prefill --models=llama2-7b \
  --decode_batches=1,16 --prefills=256,2048 2>&1 | filter | tee "$OUT/bench_model.log"
