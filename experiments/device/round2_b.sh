#!/usr/bin/env bash
# Device call 2 of 2 (second round, right after round2_a.sh): join the GGUF;
# the packed path against simulated quantization on SmolLM2 (f32 matmuls at
# 'highest' precision in both), GPTQ and RTN.
set -uo pipefail
source experiments/device/setup_env.sh
set +e
export QUAROT_JAX_CACHE=/root/stage/cache
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn|it/s\]|s/it\]"; }
for method in gptq rtn; do
  timeout 250 python3 -m experiments.real_vs_simulated --w_method=$method \
    --max_windows=40 --out_dir="$OUT" 2>&1 | filter | tee -a "$OUT/real_vs_simulated.log"
done
