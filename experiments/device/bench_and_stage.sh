#!/usr/bin/env bash
# Device call 1 of 2: stage the GGUF's first half, then benchmark the int4
# matmul kernels (results to $OUT).
set -euo pipefail
bash experiments/device/stage_part1.sh > /dev/null
export PYTHONUNBUFFERED=1
python3 -m pytest -q tests/pallas_kernels/test_int4_matmul.py 2>&1 | tail -3
python3 -m experiments.bench_int4_matmul --out_dir="$OUT" 2>&1 \
  | grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn" | tee "$OUT/bench_int4_matmul.log"
