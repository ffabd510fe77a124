#!/usr/bin/env bash
# Device call 2 of 2: join the GGUF, then run the accuracy sweep on the GPU.
#   bash experiments/device/accuracy.sh METHODS [MAX_WINDOWS]
# METHODS is all|rtn|gptq (see experiments/accuracy.py --methods).
set -euo pipefail
[ -n "${QUAROT_SMOLLM2_GGUF:-}" ] || source experiments/device/setup_env.sh
export QUAROT_JAX_CACHE=/root/stage/cache
mkdir -p /root/stage/cache && cp -n .carry/p1/cache/*.json /root/stage/cache/ 2>/dev/null || true
methods=${1:-all}
windows=${2:-}
extra=()
[ -n "$windows" ] && extra+=(--max_windows="$windows")
python3 -m experiments.accuracy --sweep=paper --methods="$methods" \
  --nsamples=128 --out_jsonl="$OUT/accuracy_smollm2.jsonl" \
  --out_md="$OUT/accuracy_smollm2_$methods.md" "${extra[@]}" 2>&1 \
  | grep -v -E "it/s\]|s/it\]" | tee "$OUT/accuracy_$methods.log"
