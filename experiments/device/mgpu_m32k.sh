#!/usr/bin/env bash
# The Mosaic W4A4 matmul at M = 32768 (2048 x 16), the LLaMA-2-7B shapes:
# the one M of the list the earlier rounds did not time.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 500 python3 -m experiments.bench_int4_matmul --out_dir="$OUT" --kernels=mosaic \
  --m=32768 --kn=4096x4096,4096x11008,11008x4096 2>&1 | filter > "$OUT/bench_mosaic.log"
grep -v "^  " "$OUT/bench_mosaic.log" | tail -30
