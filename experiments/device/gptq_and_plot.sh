#!/usr/bin/env bash
# Device call 2 of 2 (after stage_part1.sh): the Figure-1 plot, then the
# GPTQ half of the accuracy sweep.
set -euo pipefail
source experiments/device/setup_env.sh
export QUAROT_JAX_CACHE=/root/stage/cache
python3 -m experiments.plot_activations --layer=10 --tap=down \
  --out="$OUT/activations_smollm2.png" 2>&1 | grep -v -E "^I1|it/s\]" | tail -3
bash experiments/device/accuracy.sh gptq
