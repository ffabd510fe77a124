r"""prefill_qkv (one Pallas launch) against its unfused XLA reference.

  python -m experiments.bench_prefill_qkv --out_dir=results

For each batch B of T tokens (LLaMA heads: --heads N, --kv_heads K,
--head_dim H; the head Hadamard and an empty cache of T slots, as the
model's prefill): ours at each block_tokens x block_heads x num_warps
(`sweep`, ms by b<bt>_h<hb>_w<warps>; None: failed) against `xla_unfused`
(`prefill_qkv_reference`: RoPE, the head-Hadamard GEMMs, write_kv4 and
fake_quantize_kv4, fused as XLA can). `hbm_fraction` = the bytes (qkv
read; q, the dequantized k and v and the caches written) / time /
--peak_gbps. Appends to --out_dir/prefill_qkv.jsonl.
"""

import os
import shlex
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments.lab import benchmarking
from pallas_kernels import kv4_cache as kv4_lib
from pallas_kernels import prefill_qkv as pq
from quarot_jax import hadamard
from quarot_jax import layers

_OUT = flags.DEFINE_string("out_dir", "results", "Where JSONL goes.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes B.")
_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens a row, T.")
_HEADS = flags.DEFINE_integer("heads", 32, "Query heads N.")
_KV = flags.DEFINE_integer("kv_heads", 32, "Key/value heads K.")
_HDIM = flags.DEFINE_integer("head_dim", 128, "Head width H.")
_BT = flags.DEFINE_list("block_tokens", ["16", "32", "64", "128", "256"],
                        "block_tokens sweep.")
_BH = flags.DEFINE_list("block_heads", ["1", "2", "4", "8"],
                        "block_heads sweep (those dividing N and K).")
_WARPS = flags.DEFINE_list("num_warps", ["4", "8"], "num_warps sweep.")
_HALF = flags.DEFINE_bool(
    "rope_halves_equal", True, "Read half of cos and sin, as the model"
    " does (`Kernels.prefill_qkv_half_rope`); false: the full read.")
_PEAK = flags.DEFINE_float("peak_gbps", 4800.0, "HBM peak (H200).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "CPU smoke test.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  command = shlex.join(["python", "-m", "experiments.bench_prefill_qkv"]
                       + sys.argv[1:])
  t, n, kv_heads, h = _TOKENS.value, _HEADS.value, _KV.value, _HDIM.value
  signs = jnp.asarray(hadamard.hadamard_matrix(h), jnp.bfloat16)
  inv_freq = layers.rope_inv_freq(h, 10000.0)
  for b in map(int, _BATCHES.value):
    qkv = jax.random.normal(jax.random.key(b), (b, t, (n + 2 * kv_heads) * h),
                            jnp.bfloat16)
    positions = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
    cos, sin = layers.rope_cos_sin(positions, inv_freq)
    cache = kv4_lib.empty_kv4(b, kv_heads, t, h)
    args = (qkv, cos, sin, signs, cache, cache, jnp.int32(0))
    sweep, best = {}, None
    for bt, hb, warps in [(int(x), int(y), int(w)) for x in _BT.value
                          for y in _BH.value for w in _WARPS.value]:
      if n % hb or kv_heads % hb or t % bt:
        continue
      name = f"b{bt}_h{hb}_w{warps}"
      fn = jax.jit(lambda *a, bt=bt, hb=hb, w=warps: pq.prefill_qkv(
          *a, num_heads=n, block_tokens=bt, block_heads=hb, num_warps=w,
          rope_halves_equal=_HALF.value,
          implementation="pallas", interpret=_INTERPRET.value))
      try:
        ms, how = benchmarking.timed_ms(fn, *args)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}")
        sweep[name] = None
        continue
      print(f"  {name}: {ms:.4f} ms ({how['timing']})", flush=True)
      sweep[name] = round(ms, 4)
      if best is None or ms < best[0]:
        best = (ms, name, how)
    if best is None:
      continue
    ms, name, how = best
    xla = jax.jit(lambda *a: pq.prefill_qkv_reference(*a, num_heads=n))
    base = {"xla_unfused": benchmarking.timed_ms(xla, *args)[0]}
    # qkv read; q, k, v written (bf16); codes (H / 2 bytes) and scale and
    # zero (5 bytes) of each k and v head-token written.
    moved = (b * t * (n + 2 * kv_heads) * h * 2 * 2
             + 2 * b * t * kv_heads * (h // 2 + 5))
    record = benchmarking.record(
        "prefill_qkv", f"B{b}_T{t}_N{n}_K{kv_heads}_H{h}", ms, base,
        command=command, config=name, sweep=sweep,
        rope_halves_equal=_HALF.value, timing=how["timing"],
        wall_ms=how["wall_ms"],
        hbm_fraction=round(moved / (ms * 1e-3) / (_PEAK.value * 1e9), 3),
        xla_hbm_fraction=round(moved / (base["xla_unfused"] * 1e-3)
                               / (_PEAK.value * 1e9), 3))
    print(benchmarking.summary_line(record),
          f"hbm {record['hbm_fraction']:.2f}", flush=True)
    benchmarking.append_jsonl(os.path.join(_OUT.value, "prefill_qkv.jsonl"),
                              [record])


if __name__ == "__main__":
  app.run(main)
