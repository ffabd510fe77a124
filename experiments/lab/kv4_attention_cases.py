"""The KV4 decode-attention benchmark's cases: the sweep around the model's
config, the inputs, and one timed case against the bf16 baselines.

Kept apart from `experiments/bench_kv4_attention.py` (the CLI, which owns
the absl flags) so tests can import it beside other benchmarks' flags.
"""

import itertools

import jax
import jax.numpy as jnp

from experiments.lab import benchmarking
from pallas_kernels import decode_attention as float_attn
from pallas_kernels import kv4_cache as kv4_lib
from pallas_kernels import kv4_decode_attention as attn


def sweep_configs(b, n, kv_heads, s, h, block_sizes, splits, paths, *,
                  warps=("default",), stages=("default",),
                  nibbles=("convert",), softmax_rows=("all",),
                  dtype=jnp.bfloat16):
  """The sweep: the model's own config first (what `kv4_decode_attention`
  picks with config=None for q of `dtype`), then every block_s with every
  num_splits choice, path, warps, stages, nibbles and softmax_rows choice
  ('default' warps / stages: the model config's)."""
  model = attn.default_kv4_decode_attention_config(
      b, kv_heads, s, h, query_heads=n, dtype=dtype)
  named = {"default": model.num_splits, "2x": 2 * model.num_splits}
  counts = sorted({named.get(x) or int(x) for x in splits})
  paths = [p for p in paths if p != "dot_free" or n == kv_heads]
  pick = lambda values, dflt: sorted({dflt if x == "default" else int(x)
                                      for x in values})
  configs = [attn.KV4DecodeAttentionConfig(
      block_s=bs, num_splits=ns, num_warps=nw, num_stages=st, path=path,
      nibbles=nib, softmax_rows=rows)
             for bs, ns, path, nw, st, nib, rows in itertools.product(
                 block_sizes, counts, paths, pick(warps, model.num_warps),
                 pick(stages, model.num_stages), nibbles, softmax_rows)]
  # 'bits' on the dot-free path is the 'convert' kernel again.
  dot_free = lambda c: c.path == "dot_free" or (
      c.path == "auto" and attn.uses_dot_free_path(n, kv_heads))
  # ... and so is softmax_rows 'one' there, or at G > 1.
  configs = [c for c in configs
             if (c.nibbles == "convert" and c.softmax_rows == "all")
             or not (dot_free(c) or (c.softmax_rows == "one"
                                     and n != kv_heads))]
  return [model] + [c for c in configs if c != model]


def _inputs(key, b, s, n, kv_heads, h):
  """q bf16[B, N, H], KV4 keys/values, their bf16 [B, S, K, H] caches."""
  keys = jax.random.split(key, 8)

  def kv4(k1, k2, k3):
    return kv4_lib.KV4(
        codes=jax.random.randint(k1, (b, kv_heads, s, h // 2), 0, 256,
                                 jnp.int32).astype(jnp.uint8),
        scale=jax.random.uniform(k2, (b, kv_heads, s), jnp.float32, 0.01,
                                 0.1),
        zero=jax.random.randint(k3, (b, kv_heads, s), 0, 16,
                                jnp.int32).astype(jnp.uint8))

  q = jax.random.normal(keys[0], (b, n, h), jnp.bfloat16)
  k, v = kv4(*keys[1:4]), kv4(*keys[4:7])
  kf, vf = (jax.random.normal(kk, (b, s, kv_heads, h), jnp.bfloat16)
            for kk in jax.random.split(keys[7]))
  return q, k, v, kf, vf


def fastest(op, configs, args, runs, interpret, *, label):
  """Times `op(*args, config=c)` (Pallas) for each config, printing each.

  Returns:
    (ms, config, timing info) of the fastest that ran, or None; and
    {config: ms} of every config that ran.
  """
  best, times = None, {}
  for cfg in configs:
    fn = jax.jit(lambda *a, c=cfg: op(*a, config=c, interpret=interpret,
                                      implementation="pallas"))
    try:
      ms, how = benchmarking.timed_ms(fn, *args, **runs)
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {label}{cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
      continue
    print(f"  {label}{cfg}: {ms:.4f} ms ({how['timing']}; wall"
          f" {how['wall_ms']:.4f})", flush=True)
    times[cfg] = ms
    if best is None or ms < best[0]:
      best = (ms, cfg, how)
  return best, times


def bench_case(key, b, s, n, kv_heads, h, *, block_sizes, splits, paths,
               interpret, command, sweep=None, flash_configs=(None,),
               hbm_gbps=4800.0):
  """Times one case: the kernel's sweep (best kept) and the XLA baseline.

  Args (beyond the case's B, S, N, K, H): block_sizes, splits, paths and
  `sweep` (warps, stages, nibbles, softmax_rows) as `sweep_configs` takes
  them; flash_configs: the bf16 flash-decoding baseline's configs (None:
  its default), the fastest kept; hbm_gbps: the peak for hbm_fraction.

  Returns:
    A `benchmarking.record` dict, or None if no config ran.
  """
  q, k, v, kf, vf = _inputs(key, b, s, n, kv_heads, h)
  start = jnp.zeros((b,), jnp.int32)
  end = jnp.full((b,), s, jnp.int32)
  runs = dict(runs=3, inner=1, warmup=1) if interpret else {}
  configs = sweep_configs(b, n, kv_heads, s, h, block_sizes, splits, paths,
                          dtype=q.dtype, **(sweep or {}))
  best, times = fastest(attn.kv4_decode_attention, configs,
                        (q, k, v, start, end), runs, interpret, label="")
  base, base_how = benchmarking.timed_ms(attn.bf16_decode_attention, q, kf,
                                         vf, start, end, **runs)
  # The strongest bf16 baseline we have: our flash decoding over the same
  # bf16 cache (what our bf16 model runs), its fastest config.
  flash, flash_cfg, _ = fastest(
      float_attn.decode_attention, list(flash_configs),
      (q, kf, vf, start, end), runs, interpret, label="flash ")[0] or (
          None, None, None)
  if best is None:
    return None
  ms, cfg, how = best
  ours_bytes, base_bytes = k.nbytes + v.nbytes, kf.nbytes + vf.nbytes
  peak = hbm_gbps * 1e9
  return benchmarking.record(
      "kv4_decode_attention", f"B{b}_S{s}_N{n}_K{kv_heads}_H{h}", ms,
      {"xla_bf16_attention": base,
       **({"pallas_bf16_flash_decoding": flash} if flash else {})},
      command=command, config=str(cfg), flash_config=str(flash_cfg),
      # What the model runs (config=None), which the sweep's best may beat.
      model_config=str(configs[0]),
      model_config_ms=(round(times[configs[0]], 4) if configs[0] in times
                       else None),
      timing=how["timing"], wall_ms=how["wall_ms"],
      baseline_wall_ms=base_how["wall_ms"],
      memory_ratio=round(ours_bytes / base_bytes, 4),
      ours_bytes=ours_bytes, baseline_bytes=base_bytes,
      hbm_fraction=round(ours_bytes / (ms * 1e-3) / peak, 3),
      baseline_hbm_fraction=round(base_bytes / (base * 1e-3) / peak, 3))
