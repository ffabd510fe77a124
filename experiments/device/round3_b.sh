#!/usr/bin/env bash
# Device call 2 of 2 (third round): join the GGUF; GPTQ W4A4KV4 SmolLM2,
# packed vs simulated (and the one-ulp control), f32 at 'highest'.
set -uo pipefail
source experiments/device/setup_env.sh
set +e
export QUAROT_JAX_CACHE=/root/stage/cache
timeout 500 python3 -m experiments.real_vs_simulated --w_method=gptq \
  --max_windows=40 --prompts=4 --new_tokens=128 --out_dir="$OUT" 2>&1 \
  | grep -v -E "^W1|^I1|it/s\]|s/it\]" | tee "$OUT/real_vs_simulated.log"
