"""Stages of one decoder layer's prefill, each jitted on its own.

`speed.layer_prefill` times a whole W4A4KV4 layer against a bf16 one; the
stages here say where that time goes. Each stage runs the code the layer
runs (the same library calls, with the kernels the layer resolved) on inputs
of the shapes and dtypes the layer hands it, in a jit of its own:

  W4A4KV4 (`qlinear.linears`, `model._packed_cache_attention`)
    quantize_qkv_in, hadamard_quantize_o_in, quantize_gate_up_in,
    hadamard_quantize_down_in   `hadamard_quant` of one [M, in] input, codes
                                in the format the layer's matmul reads;
    matmuls_qkv, matmuls_gate_up   the `w4a4_matmul`s that share one
                                quantized input; matmul_o, matmul_down;
    kv4_write_and_attention     both `write_kv4`s, then prefill attention
                                (flash on the dequantized codes with
                                kernels.attention 'cudnn', else the einsum
                                over the dequantized cache).
  The same W4A4KV4 layer with XLA matmuls (`w4a4='xla'`, what the record's
  `ours_xla_int8_matmul_ms` times): its four matmul stages, which unpack the
  packed int4 codes of x and W to int8 inside every call
  (`w4a4_matmul_reference`), and `unpack_weights`, that unpack of the seven
  weights timed alone.
  bf16 (`model._linear`, the float-cache branch of
  `model._attention_block`): matmuls_qkv, matmul_o, matmuls_gate_up,
    matmul_down (einsums), write_and_attention (the cache update, then
    the same choice of attention).

Not timed in any stage: the RMS norms, RoPE and the Q/K Hadamard, SwiGLU
and the residual adds. Prefill only: M = B * T must exceed
`kernels.DECODE_ROWS`, where the packed linears switch to `decode_matmul`.
Shape letters as in `quarot_jax/model.py`; M = B * T.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels import hadamard_quant as hq_lib
from pallas_kernels import int4_layout
from pallas_kernels.w4a4_matmul import api as w4a4_lib
from quarot_jax import kernels as kernels_lib
from quarot_jax import model
from quarot_jax import qlinear
from quarot_jax.config import LlamaConfig

# pylint: disable=protected-access
# The stages call the model's own private pieces, so that they time exactly
# the code the layer runs rather than a copy of it.

Params = dict[str, Any]
# (stage, linears) for the packed linears: one quantized input per group.
GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)),
          ("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",)))


@dataclasses.dataclass(frozen=True)
class Stage:
  """One timed piece of a layer: `fn(*args)`, which `what` describes."""

  what: str
  fn: Callable[..., Any]
  args: tuple[Any, ...]


def attention_used(config: LlamaConfig, kernels: kernels_lib.Kernels,
                   dtype=jnp.bfloat16) -> str:
  """The prefill attention a layer runs for queries of `dtype`.

  Returns:
    'cudnn' (flash attention) or 'xla' (einsum softmax), as
    `model._use_flash` decides it.
  """
  q = jax.ShapeDtypeStruct(
      (1, 2, config.num_attention_heads, config.head_dim), dtype)
  return ("cudnn" if model._use_flash(q, config.num_key_value_heads, kernels)
          else "xla")


def _block(name: str) -> str:
  return "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj",
                                       "o_proj")) else "mlp"


def _linear_widths(config: LlamaConfig) -> dict[str, int]:
  """Input width of each group's linears."""
  d = config.hidden_size
  return {"qkv": d, "o": config.num_attention_heads * config.head_dim,
          "gate_up": d, "down": config.intermediate_size}


def _w4a4_group(x_q, s_x, ps, *, kernels: kernels_lib.Kernels):
  """The matmuls of `qlinear.linears` after its quantizer (M > DECODE_ROWS):
  one `w4a4_matmul` per linear on the shared codes, bf16 out."""
  return [w4a4_lib.w4a4_matmul(x_q, p["qweight"], s_x, p["wscale"],
                               out_dtype=jnp.bfloat16,
                               implementation=kernels.w4a4,
                               interpret=kernels.interpret) for p in ps]


def _float_group(x, ps, *, kernels: kernels_lib.Kernels):
  """The bf16 layer's linears on one input (`model._linears`, FLOAT)."""
  return model._linears(x, list(ps), model.FLOAT, kernels=kernels)


def _causal_mask(b: int, t: int) -> jax.Array:
  """bool[B, T, T]: `decoder_layer`'s default mask."""
  return jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, axis=0)


def _kv4_attention(q, k, v, k_cache, v_cache, start, *,
                   options: model.RunOptions,
                   kernels: kernels_lib.Kernels):
  """`model._packed_cache_attention` as `layer_prefill`'s layer calls it
  (write_at 0, the default causal mask): both KV4 writes and attention."""
  b, t = q.shape[:2]
  return model._packed_cache_attention(
      q, k, v, k_cache, v_cache, 0, start, _causal_mask(b, t), options,
      kernels=kernels)


def _float_attention(q, k, v, k_cache, v_cache, start, *,
                     kernels: kernels_lib.Kernels):
  """The float-cache branch of `model._attention_block` under FLOAT (no
  fake quantization) at write_at 0 with the default causal mask."""
  b, t = q.shape[:2]
  k_cache = jax.lax.dynamic_update_slice_in_dim(
      k_cache, k.astype(k_cache.dtype), 0, axis=1)
  v_cache = jax.lax.dynamic_update_slice_in_dim(
      v_cache, v.astype(v_cache.dtype), 0, axis=1)
  if model._use_flash(q, k.shape[2], kernels):
    dtype = k_cache.dtype
    chunk = lambda: (k.astype(dtype).astype(q.dtype),
                     v.astype(dtype).astype(q.dtype))
    cached = lambda: (k_cache.astype(q.dtype), v_cache.astype(q.dtype))
    out = model._flash_prefill(q, chunk, cached, 0, start)
  else:
    out = model.attend(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype),
                       _causal_mask(b, t))
  return out, k_cache, v_cache


def prefill_stages(config: LlamaConfig, float_layer: Params,
                   packed_layer: Params, batch: int, seq: int, *,
                   options: model.RunOptions, kernels: kernels_lib.Kernels,
                   caches: tuple[Any, Any], key: jax.Array
                   ) -> dict[str, dict[str, Stage]]:
  """The stages of both layers, in the order they are to be timed.

  Args:
    config: the model config.
    float_layer: one bf16 layer's params (no L axis).
    packed_layer: the same layer with packed linears (`speed.packed_like`).
    batch: B.
    seq: T (the cache holds T slots, written from slot 0).
    options: the W4A4KV4 run options (4-bit per-token activations, KV4;
      had_blocks 1).
    kernels: the resolved kernels both layers run.
    caches: (float, KV4) `kv_cache.KVCache`s of one layer ([1, ...] leaves).
    key: a `jax.random.key` for the inputs.

  Returns:
    {'ours': ..., 'xla_int8': ..., 'baseline': ...}, each {name: Stage}
    (see the module docstring).

  Raises:
    ValueError: B * T <= `kernels.DECODE_ROWS` (a decode, not a prefill).
  """
  m = batch * seq
  if m <= kernels_lib.DECODE_ROWS:
    raise ValueError(f"prefill stages need B * T = {m} >"
                     f" {kernels_lib.DECODE_ROWS=} tokens")
  n, kv, h = (config.num_attention_heads, config.num_key_value_heads,
              config.head_dim)
  keys = iter(jax.random.split(key, 8))
  xla_mm = dataclasses.replace(kernels, w4a4="xla")
  a_spec = options.a_spec
  stages = {"ours": {}, "xla_int8": {}, "baseline": {}}

  def quantize_fn(kern: kernels_lib.Kernels):
    # `qlinear.linears`' quantizer; int8 codes only for the Mosaic matmul.
    return jax.jit(functools.partial(
        hq_lib.hadamard_quant, clip_ratio=a_spec.clip_ratio,
        packed=kern.w4a4 != "mosaic", implementation=kern.hadamard_quant,
        interpret=kern.interpret))

  for group, names in GROUPS:
    width = _linear_widths(config)[group]
    had = group in ("o", "down") and (
        options.online_had_o if group == "o" else options.online_had_down)
    x = jax.random.normal(next(keys), (m, width), jnp.bfloat16)
    base = qlinear.hadamard_base(width) if had else None
    quantize = quantize_fn(kernels)
    fmt = "packed uint8" if kernels.w4a4 != "mosaic" else "int8"
    stages["ours"][f"{'hadamard_' if had else ''}quantize_{group}_in"] = (
        Stage(f"hadamard_quant({'Hadamard + ' if had else ''}per-token int4"
              f" of bf16[M, {width}], {fmt} codes,"
              f" implementation={kernels.hadamard_quant!r})", quantize,
              (x, base)))
    ps = [packed_layer[_block(name)][name] for name in names]
    what = (f"{len(ps)} x w4a4_matmul(implementation={{!r}}) on one"
            f" quantized input [M, {width}], bf16 out")
    x_q, s_x = quantize(x, base)
    stages["ours"][_matmul_name(group)] = Stage(
        what.format(kernels.w4a4),
        jax.jit(functools.partial(_w4a4_group, kernels=kernels)),
        (x_q, s_x, ps))
    x_q, s_x = quantize_fn(xla_mm)(x, base)
    stages["xla_int8"][_matmul_name(group)] = Stage(
        what.format("xla") + ": packed x and W unpacked to int8 in the"
        " call, int32 dot, f32 scales", jax.jit(functools.partial(
            _w4a4_group, kernels=xla_mm)), (x_q, s_x, ps))
    fps = [float_layer[_block(name)][name] for name in names]
    stages["baseline"][_matmul_name(group)] = Stage(
        f"{len(fps)} x bf16 einsum [B, T, {width}] @ [{width}, out]",
        jax.jit(functools.partial(_float_group, kernels=kernels)),
        (x.reshape(batch, seq, width), fps))
    if group == "qkv":
      q = jax.random.normal(next(keys), (batch, seq, n, h), jnp.bfloat16)
      k, v = (jax.random.normal(next(keys), (batch, seq, kv, h),
                                jnp.bfloat16) for _ in range(2))
      stages["ours"]["kv4_write_and_attention"] = Stage(
          "write_kv4 of k and v into the packed cache, then"
          f" {_attention_what(config, kernels, kv4=True)}",
          jax.jit(functools.partial(_kv4_attention, options=options,
                                    kernels=kernels)),
          (q, k, v, *_layer0(caches[1])))
      stages["baseline"]["write_and_attention"] = Stage(
          "bf16 cache update of k and v, then"
          f" {_attention_what(config, kernels, kv4=False)}",
          jax.jit(functools.partial(_float_attention, kernels=kernels)),
          (q, k, v, *_layer0(caches[0])))
  weights = [packed_layer[_block(name)][name]["qweight"]
             for _, names in GROUPS for name in names]
  stages["xla_int8"]["unpack_weights"] = Stage(
      "int4_layout.unpack_int4 of the 7 packed weights to int8[N, K]"
      " alone (each xla_int8 matmul stage also does it)",
      jax.jit(lambda ws: [int4_layout.unpack_int4(w, signed=True)
                          for w in ws]), (weights,))
  return stages


def _matmul_name(group: str) -> str:
  return f"matmul{'s' if group in ('qkv', 'gate_up') else ''}_{group}"


def _attention_what(config: LlamaConfig, kernels: kernels_lib.Kernels, *,
                    kv4: bool) -> str:
  if attention_used(config, kernels) == "cudnn":
    on = ("this step's codes dequantized to bf16" if kv4
          else "this step's bf16 k, v")
    return (f"cuDNN flash attention (model._flash_prefill, plain causal:"
            f" write_at 0, no padded row) on {on}")
  on = "the dequantized KV4 cache" if kv4 else "the bf16 cache"
  return f"einsum softmax attention over {on} (model.attend)"


def _layer0(cache) -> tuple[Any, Any, jax.Array]:
  """(k, v, start) of a one-layer cache, without the L axis."""
  first = lambda tree: jax.tree.map(lambda a: a[0], tree)
  return first(cache.k), first(cache.v), cache.start
