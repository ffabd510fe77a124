"""Decode step, qkv_proj output to attention input, in one launch.

For one new token per row, from the fused q/k/v projection's output
qkv[B, (N + 2K) · H] (query heads first, then keys, then values):
  q = T(rope(q)),  k = T(rope(k)) - c  (T: the per-head transform, below;
                                       c: an optional key center [K, H])
  k_cache[b, j, at] <- quantize_kv4(k[b, j]),  v_cache likewise (v as is),
and returns q [B, N, H] for the decode attention. T is QuaRot's online
Hadamard on each head of q and k (`head_signs` = the ±1 matrix H_h, applied
as x @ H_h · (1 / √h)) or nothing. Shape letters as in `quarot_jax/model.py`:
B rows, N query heads, K kv heads, G = N / K, H head dim, S cache slots.

Why: XLA ran this as ~6 launches a layer (the split of qkv with RoPE, the
head transform's GEMM, two converts, the `kv4_append` kernel), each a few
microseconds at decode (issue #14: 11.5 us a layer on LLaMA-3-8B shapes,
B = 1, H200); this is one.

Numerics, step for step those of the unfused path (`decode_qkv_reference`):
  * RoPE in HF's rotate-half layout from f32 cos/sin [B, H] (the caller's,
    `quarot_jax.layers.rope_cos_sin`): x · cos + rotate_half(x) · sin, each
    product and the sum rounded in f32 (`.rn` PTX products on the GPU, so
    no FMA contraction), then rounded to x's dtype. rotate_half is a dot
    with a signed permutation (one exact product per output): Triton has
    no concatenate, and a dot keeps the row whole for the next one.
  * T: a dot with f32 accumulation (the ±1 products are exact, so only the
    order of the f32 sums can differ from XLA's GEMM), times f32(1 / √h),
    rounded to x's dtype. Without T the kernel multiplies by the identity
    and 1, which changes nothing.
  * The key center (`quarot_jax.key_center`), in x's dtype, subtracted in
    f32 and rounded to x's dtype, as XLA does `k - center.astype(k.dtype)`.
  * The KV4 quantizer of `kv4_append` (`kv4_append.quantize_halves`).

Grid (B, K): program (b, j) loads kv head j's G query rows as one tile
[16, H] (16 = the smallest Triton dot; rows >= G masked) and its key as
another, rotates both, multiplies each by T (q in the element order, k
into even and odd columns for the int4 pair packing), stores q's G rows
and writes the quantized key and value into slot `at` of the aliased
caches.

Backend: the Pallas Triton lowering (interpret mode on the CPU). Needs H / 2
a power of two and G <= 16 (`kernel_takes`); callers fall back to the
unfused ops otherwise.
"""

import functools
import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import compat
from pallas_kernels import kv4_append as append_lib
from pallas_kernels import kv4_cache as kv4_lib

_TILE = 16  # rows of a dot tile: Triton's smallest dot


def kernel_takes(head_dim: int, group: int) -> bool:
  """Whether the kernel takes heads of H and G query heads per kv head:
  H / 2 a power of two, 1 <= G <= 16."""
  return append_lib.kernel_takes(head_dim) and 1 <= group <= _TILE


def can_use_decode_qkv(head_dim: int, group: int) -> bool:
  """True where the Pallas kernel compiles: a GPU and `kernel_takes`."""
  return jax.default_backend() == "gpu" and kernel_takes(head_dim, group)


def rope(x1, x2, c1, c2, s1, s2, mul):
  """RoPE (rotate-half) of the halves x1, x2 f32[..., H / 2] of x:
  x · cos + rotate_half(x) · sin as XLA computes it (rotate_half(x) =
  [-x2, x1]), each product by `mul` so the GPU rounds it before the add."""
  return mul(x1, c1) + mul(-x2, s1), mul(x2, c2) + mul(x1, s2)


def decode_qkv_kernel(at_ref, qkv_ref, cos_ref, sin_ref, t_ref, tk_ref,
                      ek_ref, center_ref, kc_in, ks_in, kz_in, vc_in, vs_in,
                      vz_in, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref,
                      vz_ref, *, n: int, norm: float, k_clip_ratio: float,
                      v_clip_ratio: float, exact: bool, centered: bool):
  """One row's tile of 16 heads: query heads (rotated, stored), key heads
  (rotated, quantized into the slot) or value heads (quantized)."""
  # at_ref: int32[] slot; qkv_ref: [N + 2K, H] the row's heads;
  # cos_ref, sin_ref: f32[1, H]; t_ref: [H, H] T (±1 or identity);
  # tk_ref: [H, H] T's even columns, then its odd ones; ek_ref: the same
  # of the identity; center_ref: [K, H] the key center's even elements,
  # then its odd ones (read only when `centered`)
  # q_ref: [N, H]; kc/vc: uint8[K, S, H // 2]; ks/vs: f32[K, S];
  # kz/vz: uint8[K, S]. The *_in refs alias the outputs: only written.
  del kc_in, ks_in, kz_in, vc_in, vs_in, vz_in
  kv_heads, s_len, h2 = kc_ref.shape
  dtype = qkv_ref.dtype
  tiles = pl.cdiv(n, _TILE), pl.cdiv(kv_heads, _TILE)
  t = pl.program_id(1)
  mul, _ = append_lib.f32_ops(exact)
  rows = jnp.arange(_TILE)
  dot = functools.partial(jax.lax.dot, preferred_element_type=jnp.float32,
                          precision=(jax.lax.Precision.HIGHEST
                                     if dtype == jnp.float32 else None))
  at = at_ref[()]
  at = jnp.where(at < 0, at + s_len, at)  # as jax's dynamic_update_slice
  slot = jnp.clip(at, 0, s_len - 1)
  half = lambda i: pl.ds(i * h2, h2)

  def load_halves(first, count):
    """Rows first .. first + 15 of qkv (< count real) as the two halves
    f32[16, H/2] of each head."""
    return [plgpu.load(qkv_ref.at[pl.ds(first, _TILE), half(i)],
                       mask=(rows < count)[:, None], other=0
                       ).astype(jnp.float32) for i in (0, 1)]

  def rotated(first, count):  # [16, H/2] halves, rotated, in x's dtype
    x1, x2 = load_halves(first, count)
    full = lambda r, i: jnp.broadcast_to(r[:, half(i)], x1.shape)
    y1, y2 = rope(x1, x2, full(cos_ref, 0), full(cos_ref, 1),
                  full(sin_ref, 0), full(sin_ref, 1), mul)
    return y1.astype(dtype), y2.astype(dtype)

  def transformed(y, top, bot, scale=norm):
    """Halves [16, H/2] @ T's rows (top, bot), times `scale`, rounded to
    x's dtype (held in f32)."""
    return ((dot(y[0], top) + dot(y[1], bot)) * scale).astype(
        dtype).astype(jnp.float32)

  def even_odd(y, m_ref):  # [even, odd] columns of halves @ m
    return [transformed(y, m_ref[half(0), half(i)], m_ref[half(1), half(i)],
                        1.0 if m_ref is ek_ref else norm) for i in (0, 1)]

  def write(even, odd, first, count, c_ref, s_ref, z_ref, clip_ratio):
    codes, scale, zero = append_lib.quantize_halves(even, odd, clip_ratio,
                                                    exact)
    valid = rows < count
    heads = pl.ds(first, _TILE)
    plgpu.store(c_ref.at[heads, slot, :], codes, mask=valid[:, None])
    plgpu.store(s_ref.at[heads, slot], scale, mask=valid)
    plgpu.store(z_ref.at[heads, slot], zero, mask=valid)

  @pl.when(t < tiles[0])
  def _():
    first = t * _TILE
    q = transformed(rotated(first, n - first), t_ref[half(0), :],
                    t_ref[half(1), :])
    plgpu.store(q_ref.at[pl.ds(first, _TILE), :], q.astype(dtype),
                mask=(rows < n - first)[:, None])

  @pl.when((t >= tiles[0]) & (t < tiles[0] + tiles[1]))
  def _():
    first = (t - tiles[0]) * _TILE
    even, odd = even_odd(rotated(n + first, kv_heads - first), tk_ref)
    if centered:
      valid = (rows < kv_heads - first)[:, None]
      center = [plgpu.load(center_ref.at[pl.ds(first, _TILE), half(i)],
                           mask=valid, other=0).astype(jnp.float32)
                for i in (0, 1)]
      even, odd = [(x - c).astype(dtype).astype(jnp.float32)
                   for x, c in zip((even, odd), center)]
    write(even, odd, first, kv_heads - first, kc_ref, ks_ref, kz_ref,
          k_clip_ratio)

  @pl.when(t >= tiles[0] + tiles[1])
  def _():
    first = (t - tiles[0] - tiles[1]) * _TILE
    # Even and odd elements by a 0/1 permutation (one exact product per
    # output; strided masked loads do not run in interpret mode).
    v = [x.astype(dtype) for x in load_halves(n + kv_heads + first,
                                               kv_heads - first)]
    even, odd = even_odd(v, ek_ref)
    write(even, odd, first, kv_heads - first, vc_ref, vs_ref, vz_ref,
          v_clip_ratio)


def check_heads(qkv, cos, sin, head_signs, k_cache, num_heads, k_center,
                *, lead: str) -> tuple[int, int, int]:
  """The checks `decode_qkv` and `prefill_qkv` share: qkv [*lead, (N + 2K)
  · H] against the cache's K and H, cos and sin f32[*lead, H], the head
  transform and the key center. `lead` names qkv's leading axes ('B' or
  'B, T'). Returns (K, S, H).

  Raises:
    ValueError: naming the first argument that does not fit.
  """
  kv_heads, s, h = (k_cache.codes.shape[1], k_cache.codes.shape[2],
                    2 * k_cache.codes.shape[3])
  width = (num_heads + 2 * kv_heads) * h
  ndim = len(lead.split(", ")) + 1
  if qkv.ndim != ndim or qkv.shape[-1] != width:
    raise ValueError(
        f"qkv must be [{lead}, (N + 2K) * H] = [{lead}, {width}] for"
        f" N={num_heads} query heads and caches of K={kv_heads} heads of"
        f" H={h}, got {qkv.shape}")
  if num_heads % kv_heads:
    raise ValueError(f"num_heads={num_heads} must be a multiple of the"
                     f" caches' kv heads K={kv_heads}")
  want = [*qkv.shape[:-1], h]
  for name, t in (("cos", cos), ("sin", sin)):
    if list(t.shape) != want or t.dtype != jnp.float32:
      raise ValueError(f"{name} must be f32[{lead}, H]={want}, got"
                       f" {t.dtype}{list(t.shape)}")
  if head_signs is not None and head_signs.shape != (h, h):
    raise ValueError(f"head_signs must be [H, H]={[h, h]}, got"
                     f" {head_signs.shape}")
  if k_center is not None and k_center.shape != (kv_heads, h):
    raise ValueError(f"k_center must be [K, H]={[kv_heads, h]}, got"
                     f" {list(k_center.shape)}")
  return kv_heads, s, h


def _check(qkv, cos, sin, head_signs, k_cache, v_cache, at, num_heads,
           k_center=None) -> tuple[int, int, int, int, int]:
  """Shapes and dtypes; returns (B, N, K, S, H)."""
  kv_heads, s, h = check_heads(qkv, cos, sin, head_signs, k_cache,
                               num_heads, k_center, lead="B")
  b = qkv.shape[0]
  zeros = jnp.zeros((b, kv_heads, h), qkv.dtype)
  append_lib.check_kv4_append_shapes(k_cache, v_cache, zeros, zeros, at)
  return b, num_heads, kv_heads, s, h


@functools.partial(jax.jit, static_argnames=(
    "num_heads", "k_clip_ratio", "v_clip_ratio", "num_warps", "interpret",
    "debug", "implementation"))
def decode_qkv(qkv: jax.Array, cos: jax.Array, sin: jax.Array,
               head_signs: jax.Array | None, k_cache: kv4_lib.KV4,
               v_cache: kv4_lib.KV4, at: jax.Array, *, num_heads: int,
               k_center: jax.Array | None = None,
               k_clip_ratio: float = 0.95, v_clip_ratio: float = 0.95,
               num_warps: int = 4, interpret: bool = False,
               debug: bool = False,
               implementation: Literal["pallas", "xla"] | None = None
               ) -> tuple[jax.Array, kv4_lib.KV4, kv4_lib.KV4]:
  """RoPE and the head transform of one decode token's q and k, with k and
  v quantized into slot `at` of packed KV4 caches.

  Args:
    qkv: float[B, (N + 2K) · H], the fused q/k/v projection of one token a
      row (bf16, f16 or f32).
    cos: f32[B, H] rotary cosines at each row's position
      (`quarot_jax.layers.rope_cos_sin`).
    sin: f32[B, H] rotary sines.
    head_signs: [H, H] ±1 Hadamard matrix applied to each rotated head as
      x @ head_signs / √H, or None (no transform).
    k_cache: `kv4_cache.KV4` keys, codes uint8[B, K, S, H // 2].
    v_cache: `kv4_cache.KV4` values, the same shapes.
    at: int32[] slot shared by the batch (negative: from the end; then
      clamped, as in `lax.dynamic_update_slice`).
    num_heads: N.
    k_center: [K, H] mean key of each kv head, subtracted from the rotated
      keys before they are quantized (`quarot_jax.key_center`), or None.
    k_clip_ratio: range clip of the key quantizer (QuaRot: 0.95).
    v_clip_ratio: range clip of the value quantizer.
    num_warps: Triton warps a program.
    interpret: run the kernel in interpret mode (CPU tests).
    debug: print the kernel's jaxpr.
    implementation: 'pallas' (the kernel where `kernel_takes`, else the
      reference), 'xla' (the reference) or None (pallas where
      `can_use_decode_qkv` or `interpret`; logged).

  Returns:
    (q [B, N, H] in qkv's dtype, k_cache, v_cache); the caches' buffers
    are updated in place where XLA can donate them.

  Raises:
    ValueError: shapes or dtypes that do not fit together.
  """
  b, n, kv_heads, s, h = _check(qkv, cos, sin, head_signs, k_cache, v_cache,
                                at, num_heads, k_center)
  g = n // kv_heads
  if implementation is None:
    implementation = ("pallas" if interpret or can_use_decode_qkv(h, g)
                      else "xla")
    logging.info("decode_qkv: using %s", implementation)
  elif implementation == "pallas" and not (interpret or kernel_takes(h, g)):
    implementation = "xla"
    logging.info("decode_qkv: the kernel does not take H=%d, G=%d; using"
                 " the reference", h, g)
  if implementation == "xla":
    return decode_qkv_reference(qkv, cos, sin, head_signs, k_cache, v_cache,
                                at, num_heads=num_heads, k_center=k_center,
                                k_clip_ratio=k_clip_ratio,
                                v_clip_ratio=v_clip_ratio)
  dtype = qkv.dtype
  if head_signs is None:  # the identity: exact products, norm 1
    t, norm = jnp.eye(h, dtype=dtype), 1.0
  else:
    norm = float(np.float32(1.0 / math.sqrt(h)))
    t = head_signs.astype(dtype)
  kernel = functools.partial(
      decode_qkv_kernel, n=n, norm=norm, k_clip_ratio=k_clip_ratio,
      v_clip_ratio=v_clip_ratio, exact=not interpret,
      centered=k_center is not None)
  h2 = h // 2
  tiles = pl.cdiv(n, _TILE) + 2 * pl.cdiv(kv_heads, _TILE)
  scalar = pl.BlockSpec((None,), lambda i, j: (0,))
  row = lambda *shape: pl.BlockSpec((None,) + shape,
                                    lambda i, j: (i,) + (0,) * len(shape))
  whole = pl.BlockSpec((h, h), lambda i, j: (0, 0))
  center = (jnp.zeros((kv_heads, h), dtype) if k_center is None
            else k_center.astype(dtype))
  caches = [row(kv_heads, s, h2), row(kv_heads, s), row(kv_heads, s)] * 2
  arrays = (k_cache.codes, k_cache.scale, k_cache.zero, v_cache.codes,
            v_cache.scale, v_cache.zero)
  out = pl.pallas_call(
      kernel,
      grid=(b, tiles),
      in_specs=[scalar, row(n + 2 * kv_heads, h), row(1, h), row(1, h),
                whole, whole, whole,
                pl.BlockSpec((kv_heads, h), lambda i, j: (0, 0))] + caches,
      out_specs=[row(n, h)] + caches,
      out_shape=[jax.ShapeDtypeStruct((b, n, h), dtype)] + [
          jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays],
      input_output_aliases={8 + i: 1 + i for i in range(6)},
      compiler_params=compat.triton_params(num_warps=num_warps,
                                           num_stages=1),
      interpret=interpret, debug=debug, name="decode_qkv",
  )(jnp.asarray(at, jnp.int32).reshape(1),
    qkv.reshape(b, n + 2 * kv_heads, h), cos[:, None], sin[:, None], t,
    *[jnp.concatenate([m[:, 0::2], m[:, 1::2]], axis=1)
      for m in (t, jnp.eye(h, dtype=dtype), center)], *arrays)
  return (out[0],
          kv4_lib.KV4(codes=out[1], scale=out[2], zero=out[3]),
          kv4_lib.KV4(codes=out[4], scale=out[5], zero=out[6]))


@functools.partial(jax.jit, static_argnames=(
    "num_heads", "k_clip_ratio", "v_clip_ratio"))
def decode_qkv_reference(qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                         head_signs: jax.Array | None, k_cache: kv4_lib.KV4,
                         v_cache: kv4_lib.KV4, at: jax.Array, *,
                         num_heads: int, k_center: jax.Array | None = None,
                         k_clip_ratio: float = 0.95,
                         v_clip_ratio: float = 0.95
                         ) -> tuple[jax.Array, kv4_lib.KV4, kv4_lib.KV4]:
  """Plain-jnp `decode_qkv`: split, RoPE, head transform (einsum), then
  `kv4_append_reference`. Arguments and result as in `decode_qkv`."""
  b, n, kv_heads, _, h = _check(qkv, cos, sin, head_signs, k_cache, v_cache,
                                at, num_heads, k_center)
  heads = qkv.reshape(b, n + 2 * kv_heads, h)
  q, k, v = jnp.split(heads, [n, n + kv_heads], axis=1)
  q, k = (rotated_reference(x, cos[:, None, :], sin[:, None, :], head_signs,
                            k_center=c) for x, c in ((q, None), (k, k_center)))
  k_cache, v_cache = append_lib.kv4_append_reference(
      k_cache, v_cache, k, v, at, k_clip_ratio=k_clip_ratio,
      v_clip_ratio=v_clip_ratio)
  return q, k_cache, v_cache


def _rounded(y: jax.Array, dtype) -> jax.Array:
  """y rounded to a 16-bit `dtype` in a way XLA keeps: XLA:GPU would skip a
  convert to 16 bits and back inside one fusion, where the kernels and the
  model's unfused ops round (at their kernel boundaries)."""
  return (y.astype(dtype) if dtype == jnp.float32 else
          jax.lax.optimization_barrier(y.astype(dtype)))


def rotated_reference(x: jax.Array, cos: jax.Array, sin: jax.Array,
                      head_signs: jax.Array | None, *,
                      k_center: jax.Array | None = None) -> jax.Array:
  """Plain-jnp RoPE, then the head transform, of heads x [..., heads, H]
  (cos, sin f32 broadcastable to x), each rounding to x's dtype kept; then
  `k_center` [heads, H] subtracted in f32 and rounded, if given. The
  unfused path of `decode_qkv` and `prefill_qkv`."""
  dtype, h = x.dtype, x.shape[-1]
  x32 = x.astype(jnp.float32)
  y = jnp.concatenate(rope(x32[..., :h // 2], x32[..., h // 2:],
                           cos[..., :h // 2], cos[..., h // 2:],
                           sin[..., :h // 2], sin[..., h // 2:],
                           lambda a, b: a * b), axis=-1)
  y = _rounded(y, dtype)
  if head_signs is not None:
    z = jnp.einsum("...i,ij->...j", y, head_signs.astype(dtype),
                   precision=(jax.lax.Precision.HIGHEST
                              if dtype == jnp.float32 else None),
                   preferred_element_type=jnp.float32)
    y = _rounded(z * jnp.float32(1.0 / math.sqrt(h)), dtype)
  if k_center is not None:
    y = _rounded(y.astype(jnp.float32)
                 - k_center.astype(dtype).astype(jnp.float32), dtype)
  return y
