#!/usr/bin/env bash
# W4A16 decode matmul timed over 32 layers' weights per jitted call (so the
# host's dispatch is amortized), against XLA bf16 timed the same way.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 500 python3 -m experiments.bench_int4_matmul --out_dir="$OUT" --kernels=w4a16 \
  --kn=4096x4096,4096x11008,11008x4096,5120x13824,13824x5120 --decode_m=1,4,16 \
  --decode_layers=32 2>&1 | filter | tee "$OUT/bench_w4a16.log"
