"""Speed and memory of the packed W4A4KV4 model against the bf16 model.

Random params at real shapes (speed does not depend on the values): one
decoder layer at prefill, decode steps over a filled cache, and a whole-model
prefill. Each function times the float and the QuaRot version side by side
in one process and returns `benchmarking.record`s. Used by
`experiments/bench_model.py` on the GPU; the tests run it on tiny configs.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lab import benchmarking
from experiments.lab import layer_stages
from pallas_kernels import hadamard_quant as hq_lib
from quarot_jax import kernels as kernels_lib
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import quarot
from quarot_jax import run_layout
from quarot_jax.config import LlamaConfig

PRESETS = {
    "llama2-7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        head_dim=128),
    "llama2-13b": LlamaConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824,
        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
        head_dim=128),
    "llama3-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, rope_theta=500000.0),
    "llama2-70b": LlamaConfig(
        vocab_size=32000, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        head_dim=128, rms_norm_eps=1e-5),
}
W4A4KV4 = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4)


def check_presets(names: list[str]) -> None:
  """Raises ValueError naming the first of `names` not in `PRESETS`."""
  for name in names:
    if name not in PRESETS:
      raise ValueError(f"--models: {name!r} is not one of"
                       f" {sorted(PRESETS)}")


def packed_like(params: Any, key: jax.Array) -> Any:
  """Random packed int4 linears in place of the float kernels.

  Args:
    params: float params (kernels [L, in, out]).
    key: a `jax.random.key`.

  Returns:
    Params with `qweight uint8[L, out, in // 2]`, `wscale f32[L, out]`;
    the other leaves are shared.
  """
  layers = dict(params["layers"])
  keys = iter(jax.random.split(key, len(quarot.LINEARS)))
  for block, name in quarot.LINEARS:
    layers[block] = dict(layers[block])
    kernel = layers[block][name]["kernel"]
    n_layers, k, n = kernel.shape
    node = {a: b for a, b in layers[block][name].items() if a != "kernel"}
    node["qweight"] = jax.random.randint(
        next(keys), (n_layers, n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    node["wscale"] = jnp.full((n_layers, n), 0.02 / 7, jnp.float32)
    layers[block][name] = node
  return {**params, "layers": layers}


def nbytes(tree: Any) -> int:
  """Total bytes of the array leaves of a pytree."""
  return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(tree))


def random_cache(cache: kv_cache.KVCache, key: jax.Array,
                  end: int) -> kv_cache.KVCache:
  """The same cache filled with random keys/values, `end` slots written."""
  leaves, treedef = jax.tree.flatten((cache.k, cache.v))
  keys = jax.random.split(key, len(leaves))

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def fill(k, shape, dtype):  # jitted: no f32 temporary of the cache's size
    if jnp.issubdtype(dtype, jnp.integer):
      return jax.random.randint(k, shape, 0, 256, jnp.int32).astype(dtype)
    return (0.1 * jax.random.normal(k, shape)).astype(dtype)

  filled = [fill(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
  k_new, v_new = jax.tree.unflatten(treedef, filled)
  return dataclasses.replace(cache, k=k_new, v=v_new,
                             end=jnp.asarray(end, jnp.int32))


def _layer(params: Any) -> Any:
  return jax.tree.map(lambda a: a[0], params["layers"])


@dataclasses.dataclass(frozen=True)
class LayerPrefillInputs:
  """One decoder layer's prefill, bf16 and packed W4A4KV4, ready to time.

  `run(layer, x, cache, options, kernels)` (jitted; options and kernels
  static) returns the layer's output bf16[B, T, D], writing into an
  empty cache shaped like `cache` (all zeros, made inside the jit);
  `flayer` / `fcache` with `model.FLOAT` is the bf16 layer, `qlayer` /
  `qcache` with `options` the packed one. The layers are in the run
  layout `generate` uses on a GPU (`run_layout.fuse_projections`: one
  q/k/v and one gate/up matmul);
  `fparams` / `qparams` are the same weights stacked and unfused (L = 1).
  """
  run: Any
  fparams: Any
  qparams: Any
  flayer: Any
  qlayer: Any
  x: jax.Array
  fcache: kv_cache.KVCache
  qcache: kv_cache.KVCache
  options: Any


def layer_prefill_inputs(config: LlamaConfig, batch: int, seq: int,
                         key: jax.Array) -> LayerPrefillInputs:
  """Random one-layer params (bf16 and packed), input x bf16[B, T, D] and
  empty caches of T slots for timing or profiling one layer's prefill."""
  kf, kq, kx = jax.random.split(key, 3)
  one = dataclasses.replace(config, num_hidden_layers=1)
  fparams = model.init_params(one, kf, dtype=jnp.bfloat16)

  def run(layer, x, cache, opts, kern):
    # An empty cache made inside the jit, as `generate`'s prefill makes it:
    # one passed in (not donated) would be copied before the in-place write
    # (13 us of memcpy at B = 1, H200, 2026-12-05).
    cache = jax.tree.map(jnp.zeros_like, cache)
    out, _, _, _ = model.decoder_layer(
        x, layer, config=config, options=opts, kernels=kern,
        k_cache=jax.tree.map(lambda a: a[0], cache.k),
        v_cache=jax.tree.map(lambda a: a[0], cache.v), write_at=0,
        start=cache.start)
    return out

  qparams = packed_like(fparams, kq)
  fused = lambda p: run_layout.fuse_projections(_layer(p))
  return LayerPrefillInputs(
      run=jax.jit(run, static_argnames=("opts", "kern")), fparams=fparams,
      qparams=qparams, flayer=fused(fparams), qlayer=fused(qparams),
      x=jax.random.normal(kx, (batch, seq, config.hidden_size),
                          jnp.bfloat16),
      fcache=kv_cache.cache_for(one, batch, seq, dtype=jnp.bfloat16),
      qcache=kv_cache.cache_for(one, batch, seq, packed=True),
      options=W4A4KV4.run_options(config.head_dim))


# The extra runs of the W4A4KV4 layer (layer_prefill) and model
# (model_prefill): name -> (FIELD, the Kernels fields it changes); the
# record holds `ours_{FIELD}_ms` and `speedup_{FIELD}`. All but xla_int8
# need a GPU (the Triton kernels have no CPU path).
KERNEL_VARIANTS = {
    "xla_int8": ("xla_int8_matmul", dict(w4a4="xla")),
    "triton": ("triton_matmul", dict(w4a4="triton")),
    "xla_qkv": ("xla_qkv", dict(prefill_qkv="xla")),
    "xla_residual_add": ("xla_residual_add", dict(residual_in_matmul=False)),
    "xla_swiglu": ("xla_swiglu", dict(swiglu_in_quant=False)),
    "hadamard_row_grid": ("hadamard_row_grid", dict(
        hadamard_config=hq_lib.HadamardQuantConfig(programs_per_sm=0))),
    "hadamard_m16": ("hadamard_m16", dict(
        hadamard_config=hq_lib.HadamardQuantConfig(piece_multiple=16))),
    "qkv_full_rope": ("qkv_full_rope", dict(prefill_qkv_half_rope=False)),
}
LAYER_PREFILL_VARIANTS = tuple(KERNEL_VARIANTS)


def _kernel_variants(variants, kernels: "kernels_lib.Kernels",
                     baseline_ms: float, time_with) -> dict:
  """Times `time_with(kernels changed as KERNEL_VARIANTS says)` for each
  of `variants` the backend runs (in the table's order), returning the
  record's `ours_*_ms` and `speedup_*` (baseline / it) fields."""
  gpu = jax.default_backend() == "gpu"
  extra = {}
  for name, (field, change) in KERNEL_VARIANTS.items():
    if name in variants and (gpu or name == "xla_int8"):
      ms = time_with(dataclasses.replace(kernels, **change))
      extra[f"ours_{field}_ms"] = round(ms, 4)
      extra[f"speedup_{field}"] = round(baseline_ms / ms, 3)
  return extra


def layer_prefill(config: LlamaConfig, batch: int, seq: int, *,
                  command: str, key: jax.Array,
                  kernels: "str | kernels_lib.Kernels | None" = None,
                  variants: tuple[str, ...] = LAYER_PREFILL_VARIANTS,
                  stages: bool = True) -> list[dict]:
  """One decoder layer at prefill: bf16 vs W4A4KV4, plus the stage tables.

  Both run with `kernels` (resolved here); the record also times the
  W4A4 layer with its matmuls as XLA int8 dots and (on a GPU) as the
  Triton kernel, with `prefill_qkv` off (`ours_xla_qkv_ms`: RoPE, the
  head Hadamard and the KV4 write as XLA ops; records before 2026-12-04's
  third session hold `ours_prefill_qkv_ms`, it on), and with the residual
  adds outside the matmuls (`ours_xla_residual_add_ms`,
  `Kernels.residual_in_matmul` off; GPU only, as the two before), and with
  the SwiGLU as an XLA pass before down_proj's quantizer
  (`ours_xla_swiglu_ms`, `Kernels.swiglu_in_quant` off; GPU only), and
  with `hadamard_quant` on one program a row at every K
  (`ours_hadamard_row_grid_ms`, not its persistent grid at K >= 8192) or
  in pieces of 16 (`ours_hadamard_m16_ms`), and with `prefill_qkv`
  reading all of cos and sin (`ours_qkv_full_rope_ms`; records before
  2026-12-07's fifth session hold `ours_qkv_half_rope_ms`, the half read,
  then off; GPU only). Records of 2026-12-07 also hold
  `ours_qkv_bt128_ms` (128 tokens a `prefill_qkv` program) and
  `ours_qkv_half_rope_hadamard_m16_ms`, both measured slower or no faster
  and dropped. `variants` picks which of these run
  (`LAYER_PREFILL_VARIANTS`; each compiles the layer again). The stages
  (`layer_stages.prefill_stages`, skipped with `stages=False`) are the
  pieces of each layer, each jitted on its own; B * T must exceed
  `kernels.DECODE_ROWS`.

  Returns:
    A `layer_prefill` record with `attention` / `baseline_attention` (the
    prefill attention each layer ran: 'cudnn' or 'xla'), `stages_ms`,
    `xla_int8_stages_ms` and `baseline_stages_ms` (ms per stage),
    `stages` (what each stage name runs, per table), `stage_share` and
    `baseline_stage_share` (stage / its whole layer) and
    `stage_totals_ms`.
  """
  unknown = set(variants) - set(LAYER_PREFILL_VARIANTS)
  if unknown:
    raise ValueError(f"unknown layer_prefill variants {sorted(unknown)};"
                     f" known: {LAYER_PREFILL_VARIANTS}")
  kernels = kernels_lib.resolve(kernels)
  key, ks = jax.random.split(key)
  lp = layer_prefill_inputs(config, batch, seq, key)
  run, fparams, qparams, x = lp.run, lp.fparams, lp.qparams, lp.x
  flayer, qlayer = lp.flayer, lp.qlayer
  fcache, qcache, options = lp.fcache, lp.qcache, lp.options
  # Built first, so that a B * T too small for a prefill fails before any
  # timing.
  named_stages = layer_stages.prefill_stages(
      config, _layer(fparams), _layer(qparams), batch, seq, options=options,
      kernels=kernels, caches=(fcache, qcache), key=ks) if stages else {}
  float_ms = benchmarking.median_ms(
      lambda: run(flayer, x, fcache, model.FLOAT, kernels))
  ours_ms = benchmarking.median_ms(
      lambda: run(qlayer, x, qcache, options, kernels))
  extra = _kernel_variants(
      variants, kernels, float_ms, lambda kern: benchmarking.median_ms(
          lambda: run(qlayer, x, qcache, options, kern)))
  # Each stage's inputs are passed as arguments (none is created inside
  # the timed call), after three warm-up calls that compile it.
  ms = {table: {name: benchmarking.median_ms(stage.fn, *stage.args)
                for name, stage in named.items()}
        for table, named in named_stages.items()}
  r4 = lambda d: {k: round(v, 4) for k, v in d.items()}
  share = lambda d, whole: {k: round(v / whole, 3) for k, v in d.items()}
  total = lambda d, word: round(sum(v for k, v in d.items() if word in k),
                                4)
  stage_fields = dict(
      stages={table: {k: s.what for k, s in named.items()}
              for table, named in named_stages.items()},
      stages_ms=r4(ms["ours"]),
      xla_int8_stages_ms=r4(ms["xla_int8"]),
      baseline_stages_ms=r4(ms["baseline"]),
      stage_share=share(ms["ours"], ours_ms),
      baseline_stage_share=share(ms["baseline"], float_ms),
      stage_totals_ms={
          "int4_matmuls": total(ms["ours"], "matmul"),
          "quantize": total(ms["ours"], "quantize"),
          "xla_int8_matmuls": total(ms["xla_int8"], "matmul"),
          "baseline_matmuls": total(ms["baseline"], "matmul")},
  ) if stages else {}
  return [benchmarking.record(
      "layer_prefill", f"{_name(config)} b{batch} s{seq}", ours_ms,
      {"xla_bf16_layer": float_ms}, command=command, **extra,
      layout="fused q/k/v and gate/up (generate's run layout)",
      attention=layer_stages.attention_used(config, kernels),
      baseline_attention=layer_stages.attention_used(config, kernels),
      **stage_fields)]


def _name(config: LlamaConfig) -> str:
  for name, preset in PRESETS.items():
    if dataclasses.replace(preset, num_hidden_layers=1) == dataclasses.replace(
        config, num_hidden_layers=1):
      return name
  return (f"d{config.hidden_size}-f{config.intermediate_size}"
          f"-n{config.num_attention_heads}-k{config.num_key_value_heads}")


def decode_memory(config: LlamaConfig, batch: int, prefill: int,
                  new_tokens: int, *, command: str) -> list[dict]:
  """Bytes of weights + KV cache, bf16 vs W4A4KV4 (shapes only, no memory).

  Returns:
    A `decode_memory` record with `memory_ratio` = bf16 bytes / ours.
  """
  key = jax.random.key(0)
  fparams = jax.eval_shape(
      lambda: model.init_params(config, key, dtype=jnp.bfloat16))
  qparams = jax.eval_shape(lambda: packed_like(
      model.init_params(config, key, dtype=jnp.bfloat16), key))
  slots = prefill + new_tokens
  fcache = jax.eval_shape(lambda: kv_cache.cache_for(
      config, batch, slots, dtype=jnp.bfloat16))
  qcache = jax.eval_shape(lambda: kv_cache.cache_for(
      config, batch, slots, packed=True))
  ours = {"weights": nbytes(qparams), "cache": nbytes((qcache.k, qcache.v))}
  base = {"weights": nbytes(fparams), "cache": nbytes((fcache.k, fcache.v))}
  return [{
      "benchmark": "decode_memory",
      "case": f"{_name(config)} b{batch} prefill{prefill} +{new_tokens}",
      "ours_bytes": sum(ours.values()), "baseline_bytes": sum(base.values()),
      "memory_ratio": round(sum(base.values()) / sum(ours.values()), 3),
      "ours_breakdown": ours, "baseline_breakdown": base,
      **{k: v for k, v in benchmarking.record(
          "decode_memory", "", 1.0, {}, command=command).items()
         if k in ("device", "jax_version", "date", "command")},
  }]


MODEL_PREFILL_VARIANTS = ("xla_int8", "triton", "xla_qkv", "xla_residual_add",
                          "xla_swiglu", "all_logits")


def model_prefill(config: LlamaConfig, batch: int, seq: int, *,
                  command: str, key: jax.Array,
                  kernels: "str | kernels_lib.Kernels | None" = None,
                  variants: tuple[str, ...] = MODEL_PREFILL_VARIANTS
                  ) -> list[dict]:
  """Whole-model prefill (writing the cache): bf16 vs W4A4KV4.

  Both run with `kernels` (resolved here) as `generate` prefills: layers
  unrolled on GPUs, and only the last position projected to the
  vocabulary (`forward(..., last_only=True)`; records before 2026-12-05
  formed all T positions' logits, f32[B, T, V], in both models). Also
  timed, each compiling the whole model once more (`variants`, a subset of
  `MODEL_PREFILL_VARIANTS`): 'xla_int8' and 'triton' matmuls (Triton on a
  GPU only), 'xla_qkv' (`prefill_qkv` off; GPU only), 'xla_residual_add'
  (`Kernels.residual_in_matmul` off; GPU only), 'xla_swiglu'
  (`Kernels.swiglu_in_quant` off; GPU only), 'all_logits' (both
  models again with every position's logits, as before 2026-12-05).

  Returns:
    A `model_prefill` record with tokens/s, the bytes of weights, and the
    prefill attention each model ran (`attention`, `baseline_attention`:
    'cudnn' or 'xla').
  """
  unknown = set(variants) - set(MODEL_PREFILL_VARIANTS)
  if unknown:
    raise ValueError(f"unknown model_prefill variants {sorted(unknown)};"
                     f" known: {MODEL_PREFILL_VARIANTS}")
  kernels = kernels_lib.resolve(kernels)
  kf, kq, kt = jax.random.split(key, 3)
  fparams = model.init_params(config, kf, dtype=jnp.bfloat16)
  qparams = packed_like(fparams, kq)
  options = W4A4KV4.run_options(config.head_dim)
  tokens = jax.random.randint(kt, (batch, seq), 0, config.vocab_size,
                              jnp.int32)

  # As generate prefills: with layers unrolled (GPUs), per-layer weights
  # with q/k/v and gate/up fused, and a per-layer cache.
  unrolled = kernels.layer_loop == "unrolled"
  if unrolled:
    fparams = run_layout.unstack_layers(fparams, fuse=True)
    qparams = run_layout.unstack_layers(qparams, fuse=True)

  def run(params, packed, opts, kern, last_only=True):
    cache = kv_cache.cache_for(config, batch, seq, dtype=jnp.bfloat16,
                               packed=packed, per_layer=unrolled)
    return model.forward(params, tokens, config, cache=cache,
                         options=opts, kernels=kern, last_only=last_only)[0]

  run = jax.jit(run, static_argnames=("packed", "opts", "kern", "last_only"))
  timed = lambda *args, **kw: benchmarking.median_ms(
      lambda: run(*args, **kw), warmup=1, runs=5, inner=1)
  float_ms = timed(fparams, False, model.FLOAT, kernels)
  ours_ms = timed(qparams, True, options, kernels)
  extra = _kernel_variants(variants, kernels, float_ms,
                           lambda kern: timed(qparams, True, options, kern))
  if "all_logits" in variants:
    all_float = timed(fparams, False, model.FLOAT, kernels, last_only=False)
    all_ours = timed(qparams, True, options, kernels, last_only=False)
    extra.update(ours_all_logits_ms=round(all_ours, 4),
                 baseline_all_logits_ms=round(all_float, 4),
                 speedup_all_logits=round(all_float / all_ours, 3))
  tps = lambda ms: batch * seq / (ms / 1e3)
  return [benchmarking.record(
      "model_prefill", f"{_name(config)} b{batch} s{seq}", ours_ms,
      {"xla_bf16_model": float_ms}, command=command,
      ours_tokens_per_s=round(tps(ours_ms), 1),
      baseline_tokens_per_s=round(tps(float_ms), 1),
      **extra,
      attention=layer_stages.attention_used(config, kernels),
      baseline_attention=layer_stages.attention_used(config, kernels),
      layout=("fused q/k/v and gate/up, layers unrolled (generate's run"
              " layout)" if unrolled else "stacked, lax.scan"),
      logits="last position",
      ours_weight_bytes=nbytes(qparams),
      baseline_weight_bytes=nbytes(fparams))]
