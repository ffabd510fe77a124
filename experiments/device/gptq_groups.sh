#!/usr/bin/env bash
# Device call 2 of 2: the W4A4KV4 GPTQ rows with weight groups (64 for
# SmolLM2, whose widths are not multiples of 128), with and without rotation.
set -euo pipefail
source experiments/device/setup_env.sh
export QUAROT_JAX_CACHE=/root/stage/cache
for rot in --rotate --norotate; do
  python3 -m experiments.accuracy --w_bits=4 --a_bits=4 --k_bits=4 \
    --v_bits=4 --gptq --w_groupsize=64 $rot --nsamples=128 \
    --out_jsonl="$OUT/accuracy_smollm2.jsonl" --out_md="$OUT/groups$rot.md" \
    2>&1 | grep -v -E "it/s\]|s/it\]|^I1|^W1" | tail -4
done
