r"""Prefill attention: the model's einsum path vs cuDNN flash vs Mosaic GPU.

  python -m experiments.bench_attention --out_dir=results

Each case (batch B, T = S tokens, N x K x H heads, causal) times, on random
bf16 inputs in one process:
  xla_einsum        `model.attend` (einsum softmax over [T, S]; the model's
                    path before flash attention), causal mask.
  cudnn             `attention.flash_attention` without a cache: plain
                    causal `jax.nn.dot_product_attention(implementation=
                    'cudnn')` (ours: the model's no-cache prefill).
  cudnn_cache       `attention.flash_attention` with a traced start/end (the
                    model's path with a cache: rows shifted, per-row
                    lengths); start = 0, so it does the same work as cudnn
                    plus the gathers.
  cudnn_dense_mask  the alternative formulation: the model's cache mask as a
                    dense bool [B, 1, T, S] mask plus is_causal.
  mosaic_gpu_flash  jax's Pallas Mosaic GPU flash attention
                    (`jax.experimental.pallas.ops.gpu.attention_mgpu`, a
                    comparison only; the library never imports it), best of
                    a block_kv sweep.
  kv4_*             the KV4 prefill stage: quantize k and v to packed KV4,
                    then `model.attend_kv4` (einsum over the dequantized
                    cache) or dequantize + cudnn_cache (the model's flash
                    KV4 path).
Max abs errors are against xla_einsum's output. Appends one JSONL record per
case to --out_dir/prefill_attention.jsonl (ours = cudnn).
"""

import functools
import shlex
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments.lab import benchmarking
from pallas_kernels import kv4_cache as kv4_lib
from quarot_jax import attention
from quarot_jax import model

_OUT = flags.DEFINE_string("out_dir", "results", "Where JSONL goes.")
_BATCH = flags.DEFINE_list("batch", ["1", "4", "16"], "Batch sizes B.")
_SEQ = flags.DEFINE_integer("seq", 2048, "T = S tokens.")
_HEADS = flags.DEFINE_list("heads", ["32x32x128", "32x8x128"],
                           "Query heads x kv heads x head dim (NxKxH).")
_BLOCK_KV = flags.DEFINE_list("mgpu_block_kv", ["64", "128"],
                              "block_kv sweep of the Mosaic GPU kernel.")
_RUNS = flags.DEFINE_integer("runs", 10, "Timed runs (median).")

_NAMES = {"32x32x128": "llama2_7b", "32x8x128": "llama3_8b"}


def _time(fn, *args) -> float:
  return benchmarking.median_ms(fn, *args, warmup=2, runs=_RUNS.value,
                                inner=5)


def _err(a, b) -> float:
  return round(float(jnp.max(jnp.abs(a.astype(jnp.float32)
                                     - b.astype(jnp.float32)))), 5)


def _mgpu(q, k, v, block_sizes):
  """(ms, config, output, errors) of the fastest Mosaic GPU config.

  In jax 0.11.2 the kernel failed on bf16 inputs on the H200 ("Expected
  dtypes to match but src had type bfloat16 and dst had type float16"), so
  after a bf16 failure it is timed on the same values in f16.
  """
  best, errors = None, []
  for dtype in (q.dtype, jnp.float16):
    best = _mgpu_sweep(*(x.astype(dtype) for x in (q, k, v)), block_sizes,
                       errors)
    if best is not None:
      config = f"{best[1]} dtype={jnp.dtype(dtype).name}"
      return best[0], config, best[2], errors
  return None, None, None, errors


def _mgpu_sweep(q, k, v, block_sizes, errors):
  """(ms, config, output) of the fastest config, or None; failures go to
  errors."""
  # A comparison only: jax's example kernel (experiments may import it).
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.gpu import attention_mgpu
  best = None
  for block_kv in block_sizes:
    config = attention_mgpu.TuningConfig(
        block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)
    fn = jax.jit(functools.partial(attention_mgpu.attention, config=config))
    try:
      ms = _time(fn, q, k, v)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"{q.dtype} block_kv={block_kv}: {type(e).__name__}:"
                    f" {str(e)[:160]}")
      print("  mgpu", errors[-1], flush=True)
      continue
    if best is None or ms < best[0]:
      best = (ms, f"block_q=64 block_kv={block_kv} max_concurrent_steps=2",
              fn(q, k, v))
  return best


def bench_case(b, t, n, kv_heads, h, *, block_sizes, command):
  """One JSONL record for one (B, T, N, K, H)."""
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
  k, v = (jax.random.normal(kk, (b, t, kv_heads, h), jnp.bfloat16)
          for kk in keys[1:])
  start = jnp.zeros((b,), jnp.int32)
  causal = jnp.tril(jnp.ones((t, t), bool))

  einsum = jax.jit(lambda q, k, v: model.attend(
      q, k, v, jnp.broadcast_to(causal, (q.shape[0], t, t))))
  cudnn = jax.jit(attention.flash_attention)
  cudnn_cache = jax.jit(lambda q, k, v, st: attention.flash_attention(
      q, k, v, start=st, end=0))

  def dense(q, k, v, st):
    slots = jnp.arange(t)
    mask = causal[None] & (slots[None, None, :] >= st[:, None, None])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                        is_causal=True,
                                        implementation="cudnn")

  def deq(c):  # [B, K, S, H // 2] codes -> bf16 [B, S, K, H]
    return jnp.swapaxes(kv4_lib.dequantize_kv4(c), 1, 2).astype(q.dtype)

  kv4_einsum = jax.jit(lambda q, k, v: model.attend_kv4(
      q, kv4_lib.quantize_kv4(k), kv4_lib.quantize_kv4(v),
      jnp.broadcast_to(causal, (q.shape[0], t, t))))
  kv4_cudnn = jax.jit(lambda q, k, v, st: attention.flash_attention(
      q, deq(kv4_lib.quantize_kv4(k)), deq(kv4_lib.quantize_kv4(v)),
      start=st, end=0))

  want = einsum(q, k, v)
  einsum_ms = _time(einsum, q, k, v)
  ours_ms = _time(cudnn, q, k, v)
  extra, errors = {}, {"cudnn": _err(cudnn(q, k, v), want)}
  cache_ms = _time(cudnn_cache, q, k, v, start)
  errors["cudnn_cache"] = _err(cudnn_cache(q, k, v, start), want)
  extra["cudnn_cache_ms"] = round(cache_ms, 4)
  try:
    dense_fn = jax.jit(dense)
    extra["cudnn_dense_mask_ms"] = round(_time(dense_fn, q, k, v, start), 4)
    errors["cudnn_dense_mask"] = _err(dense_fn(q, k, v, start), want)
  except Exception as e:  # pylint: disable=broad-except
    extra["cudnn_dense_mask_error"] = f"{type(e).__name__}: {str(e)[:200]}"
  baselines = {"xla_einsum": einsum_ms}
  mgpu_ms, mgpu_config, mgpu_out, mgpu_errors = _mgpu(q, k, v, block_sizes)
  if mgpu_ms is not None:
    baselines["mosaic_gpu_flash"] = mgpu_ms
    extra["mgpu_config"] = mgpu_config
    errors["mosaic_gpu_flash"] = _err(mgpu_out, want)
  if mgpu_errors:
    extra["mosaic_gpu_flash_errors"] = mgpu_errors
  kv4 = {"kv4_einsum_ms": _time(kv4_einsum, q, k, v),
         "kv4_cudnn_ms": _time(kv4_cudnn, q, k, v, start)}
  extra.update({name: round(ms, 4) for name, ms in kv4.items()})
  extra["kv4_speedup"] = round(kv4["kv4_einsum_ms"] / kv4["kv4_cudnn_ms"], 3)
  name = _NAMES.get(f"{n}x{kv_heads}x{h}", "")
  return benchmarking.record(
      "prefill_attention", f"{name} N{n} K{kv_heads} H{h} b{b} t{t}".strip(),
      ours_ms, baselines, command=command,
      ours="cudnn (attention.flash_attention, causal)",
      max_abs_err_vs_einsum=errors, **extra)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  command = "python -m experiments.bench_attention " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  block_sizes = [int(x) for x in _BLOCK_KV.value]
  records = []
  for heads in _HEADS.value:
    n, kv_heads, h = (int(x) for x in heads.split("x"))
    for b in (int(x) for x in _BATCH.value):
      r = bench_case(b, _SEQ.value, n, kv_heads, h, block_sizes=block_sizes,
                     command=command)
      print(benchmarking.summary_line(r), "| cache", r["cudnn_cache_ms"],
            "dense", r.get("cudnn_dense_mask_ms"), "| kv4",
            r["kv4_einsum_ms"], "->", r["kv4_cudnn_ms"], "| err",
            r["max_abs_err_vs_einsum"], flush=True)
      records.append(r)
      benchmarking.append_jsonl(f"{_OUT.value}/prefill_attention.jsonl", [r])


if __name__ == "__main__":
  app.run(main)
