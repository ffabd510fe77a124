"""The functional LLaMA-family decoder.

Params are a plain nested dict and `forward` is a pure function, so jit, vmap,
grad and the rotation transforms (params in, params out) all work on the same
pytree with no module state. We use plain functions rather than Flax linen
modules: QuaRot rewrites weights between runs, and a dict with Hugging Face
leaf names makes each rewrite a one-line tree update.

Shape letters (used in every einsum and shape comment of the package):
  B batch, T query positions, S key/value positions (cache slots), D hidden,
  F FFN, N query heads, K kv heads, G = N / K, H head dim, V vocab, L layers.

Params layout (float kernels are [in, out], so `y = x @ kernel`; layers are
stacked on a leading L axis and run with `lax.scan`):

  embed_tokens/embedding                 [V, D]
  layers/input_layernorm/scale           [L, D]
  layers/self_attn/{q,k,v}_proj/kernel   [L, D, N*H] / [L, D, K*H]
  layers/self_attn/{q,k,v}_proj/bias     [L, N*H] / [L, K*H]   (Qwen2 only)
  layers/self_attn/o_proj/kernel         [L, N*H, D]
  layers/self_attn/k_center              [L, K, H]  (optional, `key_center`)
  layers/post_attention_layernorm/scale  [L, D]
  layers/mlp/{gate,up}_proj/kernel       [L, D, F]
  layers/mlp/down_proj/kernel            [L, F, D]
  norm/scale                             [D]
  lm_head/kernel                         [D, V]   (absent when tied)

A decoder linear quantized for real (`qlinear.pack_params`) holds
`qweight uint8[L, out, in // 2]` (int4 codes packed along `in`, the layout of
`pallas_kernels/int4_layout.py`) and `wscale f32[L, out]` instead of `kernel`;
`forward` then runs it with the int4 kernels its `kernels` argument names
(resolved once by `kernels.resolve`: Pallas on a GPU, the XLA references on
a CPU under 'auto').

A norm `scale` may be absent: after QuaRot fuses it into the next linears the
norm is a plain `x / rms(x)`.

Decoding runs a per-layer copy (`run_layout.unstack_layers(params,
fuse=True)`): `layers` a tuple of L dicts without the L axis, whose q/k/v and
gate/up linears are one `self_attn/qkv_proj` and one `mlp/gate_up_proj`.
"""

from collections.abc import Mapping
import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import decode_attention as decode_attn_lib
from pallas_kernels import decode_qkv as decode_qkv_lib
from pallas_kernels import kv4_append as kv4_append_lib
from pallas_kernels import kv4_cache as kv4_lib
from pallas_kernels import kv4_decode_attention as kv4_attn_lib
from pallas_kernels import prefill_qkv as prefill_qkv_lib
from quarot_jax import attention as attention_lib
from quarot_jax import hadamard
from quarot_jax import kernels as kernels_lib
from quarot_jax import kv_cache as kv_cache_lib
from quarot_jax import layers
from quarot_jax import qlinear
from quarot_jax import quant
from quarot_jax import run_layout
from quarot_jax import shard_kernels
from quarot_jax.config import LlamaConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
  """What the forward computes besides the float model (static under jit).

  Numerics only: which kernels compute it is `kernels` (`kernels.py`).

  Attributes:
    online_had_down: apply a Hadamard of size F to the down_proj input (its
      transpose is folded into `down_proj` by `rotation.rotate`).
    online_had_o: apply a Hadamard of size N*H to the o_proj input.
    qk_had: rotate queries and keys by a Hadamard of size H after RoPE (it
      cancels in q·k and makes the key cache quantizable).
    a_spec: `quant.QuantSpec` for the input of every linear but lm_head
      (per token), or None for no activation quantization.
    k_spec: `quant.QuantSpec` for cached keys (per token and head), or None.
    v_spec: likewise for values.
    had_blocks: the online down/o Hadamards are block-diagonal with this
      many blocks, one per tensor-parallel shard (`rotation.rotate(...,
      tp=had_blocks)` folds the same ones); 1 is the full-width transform.
    row_groups: o_proj and down_proj quantize their input per token in this
      many contiguous groups of in/row_groups (an `a_spec.group_size`, if
      set, is kept), one per tensor-parallel shard: what a packed run on a
      mesh computes (`shard_kernels`), where it must equal the mesh's tp.
      A packed o_proj/down_proj's fused online Hadamard then spans one
      group. 1: per token.
  """

  online_had_down: bool = False
  online_had_o: bool = False
  qk_had: bool = False
  a_spec: Any = None
  k_spec: Any = None
  v_spec: Any = None
  had_blocks: int = 1
  row_groups: int = 1


FLOAT = RunOptions()


def _fake_quant(x: jax.Array, spec) -> jax.Array:
  if spec is None or not spec.enabled:
    return x
  return quant.fake_quant(x, spec)


def _hadamard(x: jax.Array, blocks: int = 1) -> jax.Array:
  # In f32 (and back): rounding stays a property of the quantizers.
  return hadamard.block_hadamard_transform(x.astype(jnp.float32),
                                           blocks).astype(x.dtype)


def _head_hadamard(x: jax.Array) -> jax.Array:
  """x @ H_h / sqrt(h) on the last axis (a head) as one dense matmul.

  Not the butterfly of `hadamard.fast_hadamard_transform`: XLA fuses its
  log2(h) slice/stack stages into one loop whose every output recomputes
  the whole tree, which took 53 us a layer for q and k of one 7B decode
  token on an H200 (`decode_step_kernels --profile_steps`); the matmul is
  one small GEMM. Same map up to f32 rounding. The ±1 matrix is exact in
  any float dtype, so the GEMM reads x as it is (products exact, sums in
  f32): no conversion kernel before it (there were two a layer).
  """
  h = x.shape[-1]
  signs = jnp.asarray(hadamard.hadamard_matrix(h), x.dtype)  # ±1
  exact = x.dtype == jnp.float32  # 16-bit products are exact as they are
  y = jnp.einsum("...i,ij->...j", x, signs,
                 precision=jax.lax.Precision.HIGHEST if exact else None,
                 preferred_element_type=jnp.float32)
  return (y * jnp.float32(1.0 / math.sqrt(h))).astype(x.dtype)


def _linear(x: jax.Array, p: Params, options: RunOptions, *,
            kernels: kernels_lib.Kernels,
            online_hadamard: bool = False, residual=None,
            gate_up: bool = False) -> jax.Array:
  """`x @ kernel + bias` (+ `residual`), or the packed int4 linear of
  `qlinear` (which may add the residual in its matmul's epilogue).

  Float kernels see the input fake-quantized by `options.a_spec`, after
  the online Hadamard if `online_hadamard`; packed linears quantize for
  real (the Hadamard fused into their quantize kernel). `gate_up` (packed
  only, one Hadamard block): x is gate | up and the input is their SwiGLU,
  formed by the quantizer (`qlinear.linear`).
  """
  if gate_up and ("qweight" not in p or (online_hadamard
                                         and options.had_blocks > 1)):
    raise ValueError("gate_up=True needs a packed linear and one Hadamard"
                     " block")
  if "qweight" in p:
    if online_hadamard and options.had_blocks > 1:  # not the fused one
      x, online_hadamard = _hadamard(x, options.had_blocks), False
    fuse = residual is not None and residual.dtype == x.dtype
    y = qlinear.linear(x, p, a_spec=options.a_spec,
                       online_hadamard=online_hadamard, kernels=kernels,
                       residual=residual if fuse else None, gate_up=gate_up)
    return y if fuse or residual is None else residual + y
  if online_hadamard:
    x = _hadamard(x)
  x = _fake_quant(x, options.a_spec)
  y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(x.dtype))
  if "bias" in p:
    y = y + p["bias"].astype(y.dtype)
  return y if residual is None else residual + y


def _row_linear(x: jax.Array, p: Params, options: RunOptions, *,
                kernels: kernels_lib.Kernels, online_hadamard: bool,
                mesh=None, residual=None) -> jax.Array:
  """o_proj or down_proj: `_linear` with the input quantized in
  `options.row_groups` groups per token; with a `mesh`, a packed one runs
  row parallel per shard (`shard_kernels.linears`). With `residual`
  [..., out], returns residual + the linear's output (the decoder's
  residual add, which one packed linear fuses into its matmul)."""
  groups = options.row_groups
  if groups == 1 and mesh is None:
    return _linear(x, p, options, kernels=kernels,
                   online_hadamard=online_hadamard, residual=residual)
  y = _row_linear_parts(x, p, options, kernels=kernels,
                        online_hadamard=online_hadamard, mesh=mesh)
  return y if residual is None else residual + y


def _row_linear_parts(x: jax.Array, p: Params, options: RunOptions, *,
                      kernels: kernels_lib.Kernels, online_hadamard: bool,
                      mesh) -> jax.Array:
  """`_row_linear` over several row groups or shards (no residual)."""
  groups = options.row_groups
  packed = "qweight" in p
  if mesh is not None and packed and groups != shard_kernels.tp_size(mesh):
    raise ValueError(
        f"packed o_proj/down_proj on a mesh quantize their input per shard:"
        f" RunOptions(row_groups={groups}) must equal the mesh's"
        f" tp={shard_kernels.tp_size(mesh)}")
  if not packed:
    spec = options.a_spec
    if spec is not None and spec.group_size is None:
      spec = dataclasses.replace(spec, group_size=x.shape[-1] // groups)
    return _linear(x, p, dataclasses.replace(options, a_spec=spec),
                   kernels=kernels, online_hadamard=online_hadamard)
  if online_hadamard and options.had_blocks != groups:  # not the fused one
    x, online_hadamard = _hadamard(x, options.had_blocks), False
  if mesh is not None:
    (y,) = shard_kernels.linears(x, [p], mesh=mesh, parallel="row",
                                 a_spec=options.a_spec,
                                 online_hadamard=online_hadamard,
                                 kernels=kernels)
    return y
  # One device: each group of `in` with its bytes of qweight (packing
  # pairs adjacent `in` elements), summed as the shards' psum sums.
  xs = jnp.split(x, groups, axis=-1)
  parts = [{"qweight": w} for w in jnp.split(p["qweight"], groups, axis=-1)]
  for name in ("wscale", "wzero"):  # group scales split with `in`
    if name in p:
      vs = (jnp.split(p[name], groups, axis=-1) if qlinear.is_grouped(p)
            else [p[name]] * groups)
      for part, v in zip(parts, vs):
        part[name] = v
  y = sum(qlinear.linear(xi, part, a_spec=options.a_spec,
                         online_hadamard=online_hadamard, kernels=kernels)
          for xi, part in zip(xs, parts))
  return y + p["bias"].astype(y.dtype) if "bias" in p else y


def _linears(x: jax.Array, ps: list[Params], options: RunOptions, *,
             kernels: kernels_lib.Kernels,
             pre_norm=None, mesh=None) -> list[jax.Array]:
  """`_linear` of one input through several linears (q/k/v, gate/up);
  packed ones quantize the input once for all (`qlinear.linears`), per
  shard and column parallel with a `mesh` (`shard_kernels.linears`).
  `pre_norm`: (residual, norm weight, eps) that x is the RMS norm of;
  packed linears take those instead of x and fuse the norm into their
  quantizer at decode."""
  if all("qweight" in p for p in ps):
    norm = None
    if pre_norm is not None:
      x, weight, eps = pre_norm
      norm = (weight, eps)
    if mesh is not None:
      return shard_kernels.linears(x, ps, mesh=mesh, parallel="column",
                                   a_spec=options.a_spec, kernels=kernels,
                                   norm=norm)
    return qlinear.linears(x, ps, a_spec=options.a_spec,
                           online_hadamard=False, kernels=kernels, norm=norm)
  return [_linear(x, p, options, kernels=kernels) for p in ps]


def _norm_weight(x: jax.Array, p: Params) -> jax.Array:
  scale = p.get("scale") if p else None
  if scale is None:
    scale = jnp.ones((x.shape[-1],), x.dtype)
  return scale


def _norm(x: jax.Array, p: Params, eps: float, *,
          quantized: bool = False) -> jax.Array:
  """The RMS norm of p; `quantized`: a quantizer reads it (keep its
  roundings, `layers.rms_norm`)."""
  return layers.rms_norm(x, _norm_weight(x, p), eps=eps,
                         keep_roundings=quantized)


def attend(q: jax.Array, k: jax.Array, v: jax.Array,
           mask: jax.Array) -> jax.Array:
  """Grouped-query attention.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys.
    v: [B, S, K, H] values.
    mask: bool[B, T, S], True where query t may see slot s.

  Returns:
    [B, T, N, H] in the dtype of `q`.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  # [B, T, K, G, H]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k,
                      preferred_element_type=jnp.float32) / jnp.sqrt(
                          jnp.float32(h))
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


def _use_flash(q: jax.Array, kv_heads: int,
               kernels: kernels_lib.Kernels) -> bool:
  """Whether prefill attention (T > 1) runs `attention.flash_attention`:
  `kernels.attention == 'cudnn'` and cuDNN takes q (else `attend`, logged).
  """
  if kernels.attention != "cudnn" or q.shape[1] == 1:
    return False
  k = jax.ShapeDtypeStruct(q.shape[:2] + (kv_heads, q.shape[3]), q.dtype)
  if attention_lib.can_use_cudnn(q, k):
    return True
  logging.info("attention='cudnn' cannot take q %s[%s]; using the einsum"
               " attention", q.dtype, q.shape)
  return False


def _use_decode_kernel(q, k_cache, kernels: kernels_lib.Kernels,
                       mesh) -> bool:
  """Whether a decode token (T = 1) reads a float cache with the Pallas
  flash-decoding kernel: `kernels.decode_attention == 'pallas'`, the cache
  in q's dtype (the einsum `attend` computes in q's dtype), no mesh."""
  return (kernels.decode_attention == "pallas" and q.shape[1] == 1
          and k_cache is not None and k_cache.dtype == q.dtype
          and mesh is None)


def _flash_prefill(q, chunk, cached, write_at, start):
  """`attention.flash_attention` (cuDNN) with the model's mask.

  Args:
    q: [B, T, N, H] queries.
    chunk: () -> (k, v) [B, T, K, H], this step's keys and values exactly
      as the cache holds them (dequantized for KV4), in the dtype of q.
    cached: () -> (k, v) [B, S, K, H], the whole cache after this step's
      write, in the dtype of q; None without a cache (plain causal).
    write_at: slot of the first query (int or int32[]).
    start: int32[B] first valid slot per row, or None.

  Returns:
    [B, T, N, H]. When the cache was empty before this step (write_at ==
    0), only this step's T keys are read, so a long preallocated (or KV4)
    cache is not; if no row is left-padded either, the mask is plain causal
    and cuDNN runs without `flash_attention`'s row shift (its gathers took
    0.05 of 0.17 ms at B = 1 and 0.54 of 1.65 ms at B = 16, LLaMA-2-7B
    heads, 2048 tokens, H200). One `lax.switch` on the traced values picks.
  """
  def plain():
    return attention_lib.flash_attention(q, *chunk())

  if cached is None:
    return plain()

  def from_chunk():
    return attention_lib.flash_attention(q, *chunk(), start=start, end=0)

  def from_cache():
    return attention_lib.flash_attention(q, *cached(), start=start,
                                         end=write_at)

  if isinstance(write_at, int) and write_at != 0:
    return from_cache()
  padded = (jnp.zeros((), bool) if start is None
            else jnp.any(jnp.asarray(start) != 0))
  branch = jnp.where(jnp.asarray(write_at) == 0, padded.astype(jnp.int32), 2)
  return jax.lax.switch(branch, (plain, from_chunk, from_cache))


def _attention_block(x, p, positions, mask, k_cache, v_cache, write_at, *,
                     config: LlamaConfig, options: RunOptions, inv_freq,
                     start=None,
                     kernels: kernels_lib.Kernels = kernels_lib.XLA,
                     pre_norm=None, mesh=None, residual=None):
  """One attention sub-block (`pre_norm` and `mesh` as in `_linears`;
  `residual` [B, T, D] is added to its output, in o_proj's epilogue where
  o_proj can).

  A float cache ([B, S, K, H]) stores keys and values fake-quantized by
  `options.k_spec`/`v_spec`; a packed `kv4_cache.KV4` cache quantizes them
  for real, and a single decode token (T = 1) then reads it with the
  packed decode-attention kernel. Prefill (T > 1) attends with
  `kernels.attention`: 'cudnn' is flash attention (`_flash_prefill`; the
  mask is then causal without a cache and start <= s <= write_at + t with
  one, which is what `forward` passes), 'xla' the einsum `attend` over
  `mask`. `p` holds q/k/v_proj, or their fused qkv_proj (`run_layout`;
  replicated on a mesh, so it runs unsplit). With a `mesh`, the packed KV4
  cache attention runs per shard of kv heads (`shard_kernels`).

  Returns:
    (output [B, T, D] (+ residual), new k cache, new v cache, o_proj input
    [B, T, N*H] (before the online Hadamard when o_proj is packed)).
  """
  b, t, _ = x.shape
  n, kv, h = (config.num_attention_heads, config.num_key_value_heads,
              config.head_dim)
  # [B, T, N, H] and [B, T, K, H]
  if "qkv_proj" in p:  # fused (run_layout): one matmul, split by width
    (qkv,) = _linears(x, [p["qkv_proj"]], options, kernels=kernels,
                      pre_norm=pre_norm)
    if _use_decode_qkv(qkv, k_cache, kernels, mesh, n // kv, h):
      out, k_cache, v_cache = _decode_qkv_attention(
          qkv, positions, inv_freq, k_cache, v_cache, write_at, start,
          n, options, kernels, k_center=p.get("k_center"))
      o, o_in = _o_proj(out.reshape(b, t, n * h), p, options, kernels, mesh,
                        residual)
      return o, k_cache, v_cache, o_in
    if _use_prefill_qkv(qkv, k_cache, kernels, mesh, h):
      out, k_cache, v_cache = _prefill_qkv_attention(
          qkv, positions, inv_freq, k_cache, v_cache, write_at, start, mask,
          n, options, kernels, k_center=p.get("k_center"))
      o, o_in = _o_proj(out.reshape(b, t, n * h), p, options, kernels, mesh,
                        residual)
      return o, k_cache, v_cache, o_in
    q, k, v = jnp.split(qkv, [n * h, (n + kv) * h], axis=-1)
  else:
    q, k, v = _linears(x, [p["q_proj"], p["k_proj"], p["v_proj"]], options,
                       kernels=kernels, pre_norm=pre_norm, mesh=mesh)
  # q and k stay apart: joined on the head axis, tensor-parallel shards of
  # the two would interleave and GSPMD would move them between devices.
  q = _rope_heads(q.reshape(b, t, n, h), positions, inv_freq, options)
  k = _rope_heads(k.reshape(b, t, kv, h), positions, inv_freq, options)
  v = v.reshape(b, t, kv, h)
  if "k_center" in p:  # [K, H]: softmax ignores a shift shared by all keys
    k = k - p["k_center"].astype(k.dtype)
  if isinstance(k_cache, kv4_lib.KV4):
    attend_packed = lambda q, k, v, kc, vc, write_at, start, mask: (
        _packed_cache_attention(q, k, v, kc, vc, write_at, start, mask,
                                options, kernels=kernels))
    if mesh is None:
      out = attend_packed(q, k, v, k_cache, v_cache, write_at, start, mask)
    else:
      out = shard_kernels.kv4_attention(attend_packed, q, k, v, k_cache,
                                        v_cache, write_at, start, mask,
                                        mesh=mesh)
    out, k_cache, v_cache = out
  else:
    k = _fake_quant(k, options.k_spec)
    v = _fake_quant(v, options.v_spec)
    if k_cache is not None:
      k_cache = jax.lax.dynamic_update_slice_in_dim(
          k_cache, k.astype(k_cache.dtype), write_at, axis=1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(
          v_cache, v.astype(v_cache.dtype), write_at, axis=1)
    if _use_decode_kernel(q, k_cache, kernels, mesh):
      end = jnp.asarray(write_at + 1, jnp.int32)  # [] (shared by the rows)
      out = decode_attn_lib.decode_attention(
          q[:, 0], k_cache, v_cache,
          jnp.zeros((b,), jnp.int32) if start is None else start, end,
          implementation="pallas", interpret=kernels.interpret)[:, None]
    elif _use_flash(q, kv, kernels):
      # What the cache holds: this step's keys, or all of them.
      dtype = q.dtype if k_cache is None else k_cache.dtype
      chunk = lambda: (k.astype(dtype).astype(q.dtype),
                       v.astype(dtype).astype(q.dtype))
      cached = None if k_cache is None else (
          lambda: (k_cache.astype(q.dtype), v_cache.astype(q.dtype)))
      out = _flash_prefill(q, chunk, cached, write_at, start)
    else:
      if k_cache is not None:
        k, v = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
      out = attend(q, k, v, mask)
  o, o_in = _o_proj(out.reshape(b, t, n * h), p, options, kernels, mesh,
                    residual)
  return o, k_cache, v_cache, o_in


def _rope_heads(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                options: RunOptions) -> jax.Array:
  """Queries or keys [B, T, heads, H] as attention sees them: RoPE, then
  the online head Hadamard when `options.qk_had`."""
  x = layers.apply_rope(x, positions, inv_freq)
  return _head_hadamard(x) if options.qk_had else x


def cached_keys(x: jax.Array, p: Params, positions: jax.Array, *,
                config: LlamaConfig, options: RunOptions) -> jax.Array:
  """The keys a float layer caches for its normed input, before any key
  center is subtracted and before quantization.

  Args:
    x: [B, T, D] the input of k_proj (the 'qkv' tap of `decoder_layer`).
    p: one layer's float self_attn params (unfused k_proj).
    positions: int32[B, T] RoPE positions.
    config: the model config.
    options: gives `qk_had` (the online head Hadamard after RoPE).

  Returns:
    f32[B, T, K, H].
  """
  k = jnp.einsum("btd,dk->btk", x.astype(jnp.float32),
                 p["k_proj"]["kernel"].astype(jnp.float32))
  if "bias" in p["k_proj"]:
    k = k + p["k_proj"]["bias"].astype(jnp.float32)
  b, t, _ = x.shape
  inv_freq = layers.rope_inv_freq(config.head_dim, config.rope_theta,
                                  config.rope_scaling_dict)
  return _rope_heads(k.reshape(b, t, config.num_key_value_heads,
                               config.head_dim), positions, inv_freq, options)


def _o_proj(out, p, options: RunOptions, kernels: kernels_lib.Kernels,
            mesh, residual=None) -> tuple[jax.Array, jax.Array]:
  """(o_proj of the attention output [B, T, N*H] (+ `residual`), o_proj's
  input): after the online Hadamard, which a packed o_proj fuses into its
  quantizer (its input is then the attention output itself). The input is
  GPTQ's tap, so it must be what the linear multiplies."""
  packed = "qweight" in p["o_proj"]
  if options.online_had_o and not packed:
    out = _hadamard(out, options.had_blocks)
  return _row_linear(out, p["o_proj"], options, kernels=kernels,
                     online_hadamard=options.online_had_o and packed,
                     mesh=mesh, residual=residual), out


def _use_decode_qkv(qkv, k_cache, kernels: kernels_lib.Kernels, mesh,
                    group: int, head_dim: int) -> bool:
  """Whether one decode token's fused qkv goes through `decode_qkv` (RoPE,
  head Hadamard and the KV4 write in one launch) into the KV4 kernel."""
  return (isinstance(k_cache, kv4_lib.KV4) and qkv.shape[1] == 1
          and mesh is None and kernels.kv4_attention == "pallas"
          and (kernels.interpret
               or decode_qkv_lib.can_use_decode_qkv(head_dim, group)))


def _decode_qkv_attention(qkv, positions, inv_freq, k_cache, v_cache,
                          write_at, start, num_heads: int,
                          options: RunOptions,
                          kernels: kernels_lib.Kernels, k_center=None):
  """Decode attention over packed KV4 caches from the fused qkv [B, 1,
  (N + 2K) H]: `decode_qkv` then `kv4_decode_attention`, the same bits as
  `apply_rope`, `_head_hadamard`, the key center's subtraction (`k_center`
  [K, H] or None) and `_packed_cache_attention`'s decode branch (up to the
  order of the head Hadamard's f32 sums on the GPU).

  Returns:
    (out [B, 1, N, H], k_cache, v_cache).
  """
  h = 2 * k_cache.codes.shape[-1]
  for spec in (options.k_spec, options.v_spec):
    _check_kv4_spec(spec, h)
  cos, sin = layers.rope_cos_sin(positions[:, 0], inv_freq)  # f32[B, H]
  signs = (jnp.asarray(hadamard.hadamard_matrix(h), qkv.dtype)
           if options.qk_had else None)
  q, k_cache, v_cache = decode_qkv_lib.decode_qkv(
      qkv[:, 0], cos, sin, signs, k_cache, v_cache, write_at,
      num_heads=num_heads, k_center=k_center,
      k_clip_ratio=options.k_spec.clip_ratio,
      v_clip_ratio=options.v_spec.clip_ratio, interpret=kernels.interpret,
      implementation="pallas")
  end = jnp.asarray(write_at + 1, jnp.int32)  # [] (shared by the rows)
  out = kv4_attn_lib.kv4_decode_attention(
      q, k_cache, v_cache, start, end, implementation=kernels.kv4_attention,
      interpret=kernels.interpret)
  return out[:, None].astype(q.dtype), k_cache, v_cache


def _use_prefill_qkv(qkv, k_cache, kernels: kernels_lib.Kernels, mesh,
                     head_dim: int) -> bool:
  """Whether a prefill's fused qkv goes through `prefill_qkv` (RoPE, head
  Hadamard, KV4 write and the dequantized k, v in one launch)."""
  t = qkv.shape[1]
  return (isinstance(k_cache, kv4_lib.KV4) and t > 1 and mesh is None
          and kernels.prefill_qkv == "pallas"
          and (prefill_qkv_lib.can_use_prefill_qkv(head_dim, t)
               or (kernels.interpret
                   and prefill_qkv_lib.kernel_takes(head_dim, t))))


def _prefill_qkv_attention(qkv, positions, inv_freq, k_cache, v_cache,
                           write_at, start, mask, num_heads: int,
                           options: RunOptions,
                           kernels: kernels_lib.Kernels, k_center=None):
  """Prefill attention over packed KV4 caches from the fused qkv [B, T,
  (N + 2K) H]: `prefill_qkv`, then the attention of
  `_packed_cache_attention`'s prefill branch over its q and dequantized k,
  v (or the whole cache). The same bits as `_rope_heads`, the key center's
  subtraction and `_packed_cache_attention` (up to the order of the head
  Hadamard's f32 sums on the GPU).

  Returns:
    (out [B, T, N, H], k_cache, v_cache).
  """
  h = 2 * k_cache.codes.shape[-1]
  for spec in (options.k_spec, options.v_spec):
    _check_kv4_spec(spec, h)
  cos, sin = layers.rope_cos_sin(positions, inv_freq)  # f32[B, T, H]
  signs = (jnp.asarray(hadamard.hadamard_matrix(h), qkv.dtype)
           if options.qk_had else None)
  q, k, v, k_cache, v_cache = prefill_qkv_lib.prefill_qkv(
      qkv, cos, sin, signs, k_cache, v_cache, write_at, num_heads=num_heads,
      k_center=k_center, k_clip_ratio=options.k_spec.clip_ratio,
      v_clip_ratio=options.v_spec.clip_ratio,
      block_tokens=(None if kernels.prefill_qkv_block_tokens is None else
                    prefill_qkv_lib.default_block_tokens(
                        qkv.shape[1], most=kernels.prefill_qkv_block_tokens)),
      rope_halves_equal=kernels.prefill_qkv_half_rope,  # rope_cos_sin's
      interpret=kernels.interpret, implementation="pallas")
  if _use_flash(q, k.shape[2], kernels):
    out = _flash_prefill(q, lambda: (k, v),
                         lambda: (_cached_kv(k_cache, q.dtype),
                                  _cached_kv(v_cache, q.dtype)),
                         write_at, start)
    return out, k_cache, v_cache
  return attend_kv4(q, k_cache, v_cache, mask), k_cache, v_cache


def _cached_kv(c: kv4_lib.KV4, dtype) -> jax.Array:
  """A packed cache dequantized in the model's layout: codes [B, K, S,
  H // 2] -> [B, S, K, H] in `dtype`."""
  return jnp.swapaxes(kv4_lib.dequantize_kv4(c), 1, 2).astype(dtype)


def _check_kv4_spec(spec, head_dim: int) -> None:
  """A packed KV4 cache stores QuaRot's 4-bit asymmetric per-head codes."""
  if (spec is None or spec.bits != 4 or spec.symmetric
      or spec.group_size not in (None, head_dim)):
    raise NotImplementedError(
        f"a packed KV4 cache needs 4-bit asymmetric per-head k/v specs"
        f" (group_size None or {head_dim}), got {spec}")


def _packed_cache_attention(q, k, v, k_cache, v_cache, write_at, start,
                            mask, options: RunOptions, *,
                            kernels: kernels_lib.Kernels = kernels_lib.XLA):
  """Writes k, v [B, T, K, H] into packed KV4 caches and attends.

  Decode (T = 1) with `kernels.kv4_attention == 'pallas'` writes both rows
  with one `kv4_append` launch instead of `write_kv4`'s ~8 (same bits).

  Prefill with `kernels.attention == 'cudnn'` dequantizes this step's codes
  (the simulated path's quantize -> dequantize) when the cache was empty
  before, else the whole cache, and runs flash attention on them.

  Returns:
    (out [B, T, N, H], k_cache, v_cache).
  """
  for spec in (options.k_spec, options.v_spec):
    _check_kv4_spec(spec, k.shape[-1])
  if q.shape[1] == 1 and kernels.kv4_attention == "pallas":
    # Decode: one launch quantizes and writes both rows (bit for bit the
    # write_kv4 below; the reference where the kernel does not take H).
    k_cache, v_cache = kv4_append_lib.kv4_append(
        k_cache, v_cache, k[:, 0], v[:, 0], write_at,
        k_clip_ratio=options.k_spec.clip_ratio,
        v_clip_ratio=options.v_spec.clip_ratio,
        interpret=kernels.interpret, implementation="pallas")
  else:
    k_cache = kv4_lib.write_kv4(k_cache, k, write_at,
                                clip_ratio=options.k_spec.clip_ratio)
    v_cache = kv4_lib.write_kv4(v_cache, v, write_at,
                                clip_ratio=options.v_spec.clip_ratio)
  if q.shape[1] == 1:
    end = jnp.asarray(write_at + 1, jnp.int32)  # [] (shared by the rows)
    out = kv4_attn_lib.kv4_decode_attention(
        q[:, 0], k_cache, v_cache, start, end,
        implementation=kernels.kv4_attention, interpret=kernels.interpret)
    return out[:, None].astype(q.dtype), k_cache, v_cache
  if _use_flash(q, k.shape[2], kernels):
    # What write_kv4 just wrote, dequantized, straight from k and v in their
    # layout (bit for bit; no pack, unpack or transposes), and outside
    # `_flash_prefill`'s switch, where XLA can share the quantizer's
    # reductions with write_kv4's (a traced write_at > 0, which reads the
    # cache instead, pays one unused elementwise pass over this step's k, v).
    chunk = tuple(
        kv4_lib.fake_quantize_kv4(x, clip_ratio=spec.clip_ratio
                                  ).astype(q.dtype)
        for x, spec in ((k, options.k_spec), (v, options.v_spec)))
    out = _flash_prefill(q, lambda: chunk,
                         lambda: (_cached_kv(k_cache, q.dtype),
                                  _cached_kv(v_cache, q.dtype)),
                         write_at, start)
    return out, k_cache, v_cache
  return attend_kv4(q, k_cache, v_cache, mask), k_cache, v_cache


def attend_kv4(q: jax.Array, k_cache, v_cache, mask: jax.Array
               ) -> jax.Array:
  """`attend` over packed KV4 caches, dequantized (prefill).

  Args:
    q: [B, T, N, H] queries.
    k_cache: `kv4_cache.KV4` keys (codes [B, K, S, H // 2]).
    v_cache: `kv4_cache.KV4` values.
    mask: bool[B, T, S].

  Returns:
    [B, T, N, H] in the dtype of `q`.
  """
  # XLA:CPU cannot run the bf16 dot this fuses into, so CPU attends in f32.
  dtype = q.dtype if jax.default_backend() == "gpu" else jnp.float32
  # [B, K, S, H] -> [B, S, K, H]
  keys = jnp.swapaxes(kv4_lib.dequantize_kv4(k_cache), 1, 2).astype(dtype)
  values = jnp.swapaxes(kv4_lib.dequantize_kv4(v_cache), 1, 2).astype(dtype)
  return attend(q.astype(dtype), keys, values, mask).astype(q.dtype)


def _mlp_block(x, p, *, options: RunOptions, kernels: kernels_lib.Kernels,
               pre_norm=None, mesh=None, residual=None):
  """One FFN sub-block (gate/up_proj, or their fused gate_up_proj from
  `run_layout`, unsplit on a mesh; `pre_norm` and `mesh` as in `_linears`;
  `residual` as in `_attention_block`).
  Returns (output [B, T, D] (+ residual),
  down_proj input (before the online Hadamard when down_proj is packed))."""
  packed = "qweight" in p["down_proj"]
  if "gate_up_proj" in p:  # fused (run_layout): [B, T, 2F], gate, up
    (gate_up,) = _linears(x, [p["gate_up_proj"]], options, kernels=kernels,
                          pre_norm=pre_norm)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    if (packed and kernels.swiglu_in_quant and options.row_groups == 1
        and mesh is None and (options.had_blocks == 1
                              or not options.online_had_down)):
      # down_proj's quantizer forms the SwiGLU as it loads gate | up; the
      # tap (GPTQ's) is computed only where a caller uses it.
      y = _linear(gate_up, p["down_proj"], options, kernels=kernels,
                  online_hadamard=options.online_had_down,
                  residual=residual, gate_up=True)
      return y, layers.swiglu(gate, up)
  else:
    gate, up = _linears(x, [p["gate_proj"], p["up_proj"]], options,
                        kernels=kernels, pre_norm=pre_norm, mesh=mesh)
  hidden = layers.swiglu(gate, up)
  if options.online_had_down and not packed:
    hidden = _hadamard(hidden, options.had_blocks)
  return _row_linear(hidden, p["down_proj"], options, kernels=kernels,
                     online_hadamard=options.online_had_down and packed,
                     mesh=mesh, residual=residual), hidden


def decoder_layer(x: jax.Array, p: Params, *, config: LlamaConfig,
                  options: RunOptions = FLOAT,
                  kernels: kernels_lib.Kernels = kernels_lib.XLA,
                  k_cache=None, v_cache=None, positions=None, mask=None,
                  write_at=None, start=None, mesh=None):
  """One decoder layer, also returning the input of every linear.

  Args:
    x: [B, T, D] residual stream.
    p: one layer's params (the `layers` subtree without the L axis).
    config: the model config.
    options: rotation/quantization behaviour.
    kernels: a resolved `kernels.Kernels` (default: the XLA references).
    k_cache: [B, S, K, H] or None (then `x` is one causal sequence per row).
    v_cache: [B, S, K, H] or None.
    positions: int32[B, T] RoPE positions (default 0..T-1).
    mask: bool[B, T, S] (default causal).
    write_at: cache slot of the first token.
    start: int32[B] first valid slot per row (packed KV4 caches only).
    mesh: as for `forward`.

  Returns:
    (x [B, T, D], k_cache, v_cache, taps) where taps maps 'qkv', 'o',
    'gate_up', 'down' to the (unquantized) input of those linears; GPTQ
    collects its Hessians from them.
  """
  b, t, _ = x.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if mask is None:
    mask = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, axis=0)
  inv_freq = layers.rope_inv_freq(config.head_dim, config.rope_theta,
                                  config.rope_scaling_dict)
  eps = config.rms_norm_eps
  # Packed q/k/v and gate/up linears take the residual and the norm
  # (`pre_norm`) to fuse it into their quantizer; an unused tap is dropped.
  quantized = options.a_spec is not None and options.a_spec.enabled
  attn_in = _norm(x, p["input_layernorm"], eps, quantized=quantized)
  # The residual adds ride in o_proj's and down_proj's matmul epilogues
  # where those can (the packed prefill matmul on Hopper); else `x + h`.
  x, k_cache, v_cache, o_in = _attention_block(
      attn_in, p["self_attn"], positions, mask, k_cache, v_cache, write_at,
      config=config, options=options, inv_freq=inv_freq, start=start,
      kernels=kernels, mesh=mesh,
      pre_norm=(x, _norm_weight(x, p["input_layernorm"]), eps), residual=x)
  mlp_in = _norm(x, p["post_attention_layernorm"], eps, quantized=quantized)
  x, down_in = _mlp_block(
      mlp_in, p["mlp"], options=options, kernels=kernels, mesh=mesh,
      pre_norm=(x, _norm_weight(x, p["post_attention_layernorm"]), eps),
      residual=x)
  taps = {"qkv": attn_in, "o": o_in, "gate_up": mlp_in, "down": down_in}
  return x, k_cache, v_cache, taps


def forward(params: Params, tokens: jax.Array, config: LlamaConfig, *,
            cache: kv_cache_lib.KVCache | None = None,
            options: RunOptions = FLOAT,
            kernels: "str | kernels_lib.Kernels | None" = None,
            return_hidden: bool = False,
            last_only: bool = False,
            mesh: jax.sharding.Mesh | None = None,
            remat: bool = False):
  """Runs the decoder.

  Without a cache, `tokens` is one causal sequence per row starting at
  position 0. With a cache, the tokens are written at slots
  `[cache.end, cache.end + T)` and attend to every valid earlier slot.

  Args:
    params: the params pytree (layout in the module docstring).
    tokens: int32[B, T].
    config: the model's `LlamaConfig`.
    cache: a `KVCache` from `kv_cache.init_cache`, or None.
    options: rotation/quantization behaviour (`RunOptions`).
    kernels: which kernels run: a `kernels.SETTINGS` word, None ('auto'),
      or a resolved `kernels.Kernels`; resolved here, once.
    return_hidden: return the final hidden state [B, T, D] instead of logits.
    last_only: norm and project only the last position (logits f32[B, 1,
      V], or hidden [B, 1, D]): what sampling reads after a prefill,
      without the f32[B, T, V] logits and the lm_head GEMM over every
      token.
    mesh: the 1-D mesh (axis 'tp') the params and cache are placed on
      (`sharding.py`), or None. Only packed linears and the packed KV4
      cache attention read it: they run per shard inside `shard_map`
      (`shard_kernels`), so no Pallas kernel gathers a sharded weight or
      cache; GSPMD partitions the rest. Packed params then need
      `options.row_groups` equal to the mesh's tp.
    remat: recompute each layer in a backward pass (`jax.checkpoint` per
      layer): a gradient through the forward then keeps each layer's input
      [B, T, D] instead of all of its intermediates, for about a third
      more compute. The values are the same.

  Returns:
    (logits f32[B, T, V] (f32[B, 1, V] with `last_only`), new cache or
    None).

  Raises:
    ValueError: an unknown `kernels` setting, or one this platform cannot
      run; packed params on a mesh whose tp is not `options.row_groups`.
  """
  kernels = kernels_lib.resolve(kernels)
  b, t = tokens.shape
  x = params["embed_tokens"]["embedding"][tokens]  # [B, T, D]
  if cache is None:
    positions = mask = write_at = cache_k = cache_v = start = None
  else:
    slots = cache.end + jnp.arange(t, dtype=jnp.int32)  # [T]
    positions = slots[None, :] - cache.start[:, None]
    key_slots = jnp.arange(cache.max_len, dtype=jnp.int32)
    mask = ((key_slots[None, None, :] <= slots[None, :, None])
            & (key_slots[None, None, :] >= cache.start[:, None, None]))
    write_at, start = cache.end, cache.start
    cache_k, cache_v = cache.k, cache.v

  def layer(x, scanned):
    p, k_layer, v_layer = scanned
    x, k_layer, v_layer, _ = decoder_layer(
        x, p, config=config, options=options, kernels=kernels,
        k_cache=k_layer, v_cache=v_layer, positions=positions, mask=mask,
        write_at=write_at, start=start, mesh=mesh)
    return x, (k_layer, v_layer)

  if remat:
    layer = jax.checkpoint(layer)
  if run_layout.is_unstacked(params):
    # Per-layer arrays: each layer's weights and cache are read in place
    # (a scan slices, i.e. copies, each layer's weights every step).
    _check_cache_matches(params, cache)
    per_layer = params["layers"]
    none = (None,) * len(per_layer)
    new_k, new_v = [], []
    for p, k_layer, v_layer in zip(per_layer, cache_k or none,
                                   cache_v or none):
      x, (k_layer, v_layer) = layer(x, (p, k_layer, v_layer))
      new_k.append(k_layer)
      new_v.append(v_layer)
    new_k, new_v = tuple(new_k), tuple(new_v)
  else:
    _check_cache_matches(params, cache)
    x, (new_k, new_v) = jax.lax.scan(layer, x,
                                     (params["layers"], cache_k, cache_v))
  if last_only:  # the final norm is per position: norm only the last
    x = x[:, -1:]
  x = _norm(x, params.get("norm"), config.rms_norm_eps)
  if return_hidden:
    return x, None
  logits = logits_from_hidden(params, x)
  new_cache = None
  if cache is not None:
    new_cache = kv_cache_lib.KVCache(k=new_k, v=new_v, start=cache.start,
                                     end=cache.end + t)
  return logits, new_cache


def _check_cache_matches(params: Params, cache) -> None:
  """Per-layer params need a per-layer cache, stacked params a stacked one."""
  if cache is None:
    return
  per_layer = run_layout.is_unstacked(params)
  if per_layer != cache.per_layer:
    raise ValueError(
        f"params are {'per-layer' if per_layer else 'stacked'}"
        f" but the cache is {'per-layer' if cache.per_layer else 'stacked'};"
        " build the cache with kv_cache.cache_for(..., per_layer="
        f"{per_layer})")


def uses_kv4_cache(params: Params, options: RunOptions) -> bool:
  """Whether generation should keep a packed KV4 cache: the linears are
  packed (real quantization) and keys and values are 4-bit."""
  return (qlinear.is_packed(params)
          and all(s is not None and s.bits == 4
                  for s in (options.k_spec, options.v_spec)))


def logits_from_hidden(params: Params, x: jax.Array) -> jax.Array:
  """Final projection: f32[..., V] from the normed hidden state [..., D]."""
  if "lm_head" in params:
    w = params["lm_head"]["kernel"]
    return jnp.einsum("...D,DV->...V", x, w.astype(x.dtype),
                      preferred_element_type=jnp.float32)
  emb = params["embed_tokens"]["embedding"]
  return jnp.einsum("...D,VD->...V", x, emb.astype(x.dtype),
                    preferred_element_type=jnp.float32)


def unwrap(params: Any) -> tuple[Params, Any]:
  """Lets every entry point take Flax variables `{"params": params}` too.

  `quarot_jax.nn.Llama` keeps this module's params pytree under "params";
  the transforms, checkpoints and generation call `unwrap` on entry so both
  faces share one layout, and hand results back wrapped as they came.

  Args:
    params: a params pytree, or Flax variables `{"params": params}`.

  Returns:
    (params, wrap): the params pytree, and a function that wraps a result
    as the input was (the identity for a plain params pytree).
  """
  if isinstance(params, Mapping) and set(params) == {"params"}:
    return params["params"], lambda p: {"params": p}
  return params, lambda p: p


def init_params(config: LlamaConfig, key: jax.Array, *,
                dtype=jnp.float32, scale: float = 0.02) -> Params:
  """Random params of the right shapes (tests and benchmarks).

  Args:
    config: model sizes.
    key: a `jax.random.key`.
    dtype: param dtype.
    scale: std of the normal init.

  Returns:
    A params pytree in the documented layout.
  """
  d, f = config.hidden_size, config.intermediate_size
  n, kv, h = (config.num_attention_heads, config.num_key_value_heads,
              config.head_dim)
  num_layers, vocab = config.num_hidden_layers, config.vocab_size
  shapes = {
      ("embed_tokens", "embedding"): (vocab, d),
      ("layers", "self_attn", "q_proj", "kernel"): (num_layers, d, n * h),
      ("layers", "self_attn", "k_proj", "kernel"): (num_layers, d, kv * h),
      ("layers", "self_attn", "v_proj", "kernel"): (num_layers, d, kv * h),
      ("layers", "self_attn", "o_proj", "kernel"): (num_layers, n * h, d),
      ("layers", "mlp", "gate_proj", "kernel"): (num_layers, d, f),
      ("layers", "mlp", "up_proj", "kernel"): (num_layers, d, f),
      ("layers", "mlp", "down_proj", "kernel"): (num_layers, f, d),
  }
  if config.attention_bias:
    for name, width in (("q_proj", n * h), ("k_proj", kv * h),
                        ("v_proj", kv * h)):
      shapes[("layers", "self_attn", name, "bias")] = (num_layers, width)
  if not config.tie_word_embeddings:
    shapes[("lm_head", "kernel")] = (d, vocab)
  params: Params = {}
  keys = jax.random.split(key, len(shapes) + 3)
  for k, (path, shape) in zip(keys, shapes.items()):
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = (scale * jax.random.normal(k, shape)).astype(dtype)
  # Norm scales near 1 but not equal, so fusing them is really tested.
  for k, path, shape in ((keys[-3], ("input_layernorm",), (num_layers, d)),
                         (keys[-2], ("post_attention_layernorm",),
                          (num_layers, d))):
    params["layers"][path[0]] = {
        "scale": (1 + 0.1 * jax.random.normal(k, shape)).astype(dtype)}
  params["norm"] = {
      "scale": (1 + 0.1 * jax.random.normal(keys[-1], (d,))).astype(dtype)}
  return params
