#!/usr/bin/env bash
# kv4_decode_attention's dot-free G = 1 (MHA) path: GPU tests, then the
# benchmark at LLaMA-2-7B heads sweeping block_s (64 = the old default, 128 =
# the new G = 1 default, 256) and num_splits, then a short num_warps sweep
# (the benchmark takes num_warps from the default config). Results to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
filter() { grep -v -E "^W1|^I1|DeprecationWarning|warnings.warn"; }
timeout 120 python3 -m pytest -q --tb=short \
  tests/pallas_kernels/test_kv4_decode_attention.py \
  2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
timeout 250 python3 -m experiments.bench_kv4_attention --out_dir="$OUT" \
  --heads=32x32x128 --batch=8,16 --seq=8192,32768 --block_s=64,128,256 \
  --num_splits=default,2x,4,8,16 2>&1 | filter | tee "$OUT/bench.log"
timeout 100 python3 - <<'EOF' 2>&1 | filter | tee "$OUT/warps.log"
import itertools
import jax
import jax.numpy as jnp
from experiments import bench_kv4_attention as bench
from pallas_kernels import kv4_decode_attention as attn
from quarot_jax import benchmarking
for b, s in ((8, 32768), (16, 8192)):
  q, k, v, _, _ = bench._inputs(jax.random.key(1), b, s, 32, 32, 128)
  start, end = jnp.zeros((b,), jnp.int32), jnp.full((b,), s, jnp.int32)
  for bs, ns, nw in itertools.product((128, 256), (4, 8), (4, 8)):
    cfg = attn.KV4DecodeAttentionConfig(block_s=bs, num_splits=ns,
                                        num_warps=nw, num_stages=2)
    fn = jax.jit(lambda *a, c=cfg: attn.kv4_decode_attention(
        *a, config=c, implementation="pallas"))
    try:
      ms = benchmarking.median_ms(fn, q, k, v, start, end)
    except Exception as e:  # pylint: disable=broad-except
      print(f"B{b} S{s} {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
      continue
    gbs = (k.nbytes + v.nbytes) / (ms * 1e-3) / 1e9
    print(f"B{b} S{s} {cfg}: {ms:.4f} ms ({gbs:.0f} GB/s)", flush=True)
EOF
