"""Decode step, qkv_proj output to attention input, in one launch.

For one new token per row, from the fused q/k/v projection's output
qkv[B, (N + 2K) · H] (query heads first, then keys, then values):
  q = T(rope(q)),  k = T(rope(k))      (T: the per-head transform, below)
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


def rotate_half_matrix(h: int, dtype) -> jax.Array:
  """P [H, H] with x @ P = concat(-x[H/2:], x[:H/2]) (HF's rotate_half)."""
  p = np.zeros((h, h), np.float32)
  half = h // 2
  p[np.arange(half) + half, np.arange(half)] = -1.0
  p[np.arange(half), np.arange(half) + half] = 1.0
  return jnp.asarray(p, dtype)


def rope(x, rotated, cos, sin, mul):
  """x · cos + rotate_half(x) · sin in f32, each product by `mul` (so the
  GPU rounds it before the add, as XLA's kernels do)."""
  return mul(x, cos) + mul(rotated, sin)


def decode_qkv_kernel(at_ref, qkv_ref, cos_ref, sin_ref, p_ref, t_ref,
                      kc_in, ks_in, kz_in, vc_in, vs_in, vz_in, q_ref,
                      kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, *,
                      n: int,
                      norm: float, k_clip_ratio: float, v_clip_ratio: float,
                      exact: bool):
  """One (row, kv head): rotate q and k, store q, quantize-write k and v."""
  # at_ref: int32[] slot; qkv_ref: [N + 2K, H] the row's heads;
  # cos_ref, sin_ref: f32[1, H]; p_ref: [H, H] `rotate_half_matrix`;
  # t_ref: [H, H] (±1 or identity), p and t in x's dtype
  # q_ref: [G, H]; kc/vc: uint8[S, H // 2]; ks/vs: f32[S]; kz/vz: uint8[S]
  # The *_in refs alias the outputs (input_output_aliases): only written.
  del kc_in, ks_in, kz_in, vc_in, vs_in, vz_in
  g, h = q_ref.shape
  kv_heads = (qkv_ref.shape[0] - n) // 2
  h2 = h // 2
  j = pl.program_id(1)
  dtype = qkv_ref.dtype
  mul, _ = append_lib.f32_ops(exact)
  rows = jnp.arange(_TILE)[:, None]
  dot = functools.partial(jax.lax.dot, preferred_element_type=jnp.float32,
                          precision=(jax.lax.Precision.HIGHEST
                                     if dtype == jnp.float32 else None))
  cos, sin = cos_ref[...], sin_ref[...]  # f32[1, H]
  t_even = t_ref[:, pl.ds(0, h2, stride=2)]  # [H, H/2]
  t_odd = t_ref[:, pl.ds(1, h2, stride=2)]

  def rotated(first: jax.Array, count: int):
    """Heads first .. first + count - 1 as a [16, H] tile, rotated and
    rounded to x's dtype (rows >= count zero)."""
    x = plgpu.load(qkv_ref.at[pl.ds(first, _TILE), :], mask=rows < count,
                   other=0)
    # rotate_half(x) = x @ P, P a signed permutation: one exact product
    # per output, so the dot is exact.
    half = dot(x, p_ref[...])
    return rope(x.astype(jnp.float32), half, cos, sin, mul).astype(dtype)

  def transformed(y, t):  # [16, H] @ T[:, cols] -> x's dtype
    return (dot(y, t) * norm).astype(dtype)

  q = transformed(rotated(j * g, g), t_ref[...])  # [16, H]
  plgpu.store(q_ref.at[pl.ds(0, _TILE), :], q, mask=rows < g)

  k = rotated(n + j, 1)
  first_row = lambda z: jnp.max(  # row 0 of [16, H/2], exactly
      jnp.where(rows == 0, z.astype(jnp.float32), -jnp.inf), axis=0,
      keepdims=True)
  k_even = first_row(transformed(k, t_even))
  k_odd = first_row(transformed(k, t_odd))
  v_row = qkv_ref.at[pl.ds(n + kv_heads + j, 1)]
  v_even = v_row[:, pl.ds(0, h2, stride=2)].astype(jnp.float32)
  v_odd = v_row[:, pl.ds(1, h2, stride=2)].astype(jnp.float32)

  s_len = kc_ref.shape[0]
  at = at_ref[()]
  at = jnp.where(at < 0, at + s_len, at)  # as jax's dynamic_update_slice
  slot = pl.ds(jnp.clip(at, 0, s_len - 1), 1)
  for (even, odd), c_ref, s_ref, z_ref, clip_ratio in (
      ((k_even, k_odd), kc_ref, ks_ref, kz_ref, k_clip_ratio),
      ((v_even, v_odd), vc_ref, vs_ref, vz_ref, v_clip_ratio)):
    codes, scale, zero = append_lib.quantize_halves(even, odd, clip_ratio,
                                                    exact)
    c_ref[slot, :] = codes
    s_ref[slot] = scale
    z_ref[slot] = zero


def _check(qkv, cos, sin, head_signs, k_cache, v_cache, at, num_heads
           ) -> tuple[int, int, int, int, int]:
  """Shapes and dtypes; returns (B, N, K, S, H)."""
  b = qkv.shape[0]
  kv_heads, s, h = (k_cache.codes.shape[1], k_cache.codes.shape[2],
                    2 * k_cache.codes.shape[3])
  width = (num_heads + 2 * kv_heads) * h
  if qkv.ndim != 2 or qkv.shape[1] != width:
    raise ValueError(
        f"qkv must be [B, (N + 2K) * H] = [B, {width}] for N={num_heads}"
        f" query heads and caches of K={kv_heads} heads of H={h}, got"
        f" {qkv.shape}")
  if num_heads % kv_heads:
    raise ValueError(f"num_heads={num_heads} must be a multiple of the"
                     f" caches' kv heads K={kv_heads}")
  for name, t in (("cos", cos), ("sin", sin)):
    if t.shape != (b, h) or t.dtype != jnp.float32:
      raise ValueError(f"{name} must be f32[B, H]={[b, h]}, got"
                       f" {t.dtype}{list(t.shape)}")
  if head_signs is not None and head_signs.shape != (h, h):
    raise ValueError(f"head_signs must be [H, H]={[h, h]}, got"
                     f" {head_signs.shape}")
  zeros = jnp.zeros((b, kv_heads, h), qkv.dtype)
  append_lib.check_kv4_append_shapes(k_cache, v_cache, zeros, zeros, at)
  return b, num_heads, kv_heads, s, h


@functools.partial(jax.jit, static_argnames=(
    "num_heads", "k_clip_ratio", "v_clip_ratio", "num_warps", "interpret",
    "debug", "implementation"))
def decode_qkv(qkv: jax.Array, cos: jax.Array, sin: jax.Array,
               head_signs: jax.Array | None, k_cache: kv4_lib.KV4,
               v_cache: kv4_lib.KV4, at: jax.Array, *, num_heads: int,
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
                                at, num_heads)
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
                                at, num_heads=num_heads,
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
      v_clip_ratio=v_clip_ratio, exact=not interpret)
  h2 = h // 2
  scalar = pl.BlockSpec((None,), lambda i, j: (0,))
  heads = pl.BlockSpec((None, n + 2 * kv_heads, h), lambda i, j: (i, 0, 0))
  per_row = pl.BlockSpec((1, h), lambda i, j: (i, 0))
  whole = pl.BlockSpec((h, h), lambda i, j: (0, 0))
  codes = pl.BlockSpec((None, None, s, h2), lambda i, j: (i, j, 0, 0))
  per_slot = pl.BlockSpec((None, None, s), lambda i, j: (i, j, 0))
  caches = [codes, per_slot, per_slot] * 2
  arrays = (k_cache.codes, k_cache.scale, k_cache.zero, v_cache.codes,
            v_cache.scale, v_cache.zero)
  out = pl.pallas_call(
      kernel,
      grid=(b, kv_heads),
      in_specs=[scalar, heads, per_row, per_row, whole, whole] + caches,
      out_specs=[pl.BlockSpec((None, None, g, h),
                              lambda i, j: (i, j, 0, 0))] + caches,
      out_shape=[jax.ShapeDtypeStruct((b, kv_heads, g, h), dtype)] + [
          jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays],
      input_output_aliases={6 + i: 1 + i for i in range(6)},
      compiler_params=compat.triton_params(num_warps=num_warps,
                                           num_stages=1),
      interpret=interpret, debug=debug, name="decode_qkv",
  )(jnp.asarray(at, jnp.int32).reshape(1),
    qkv.reshape(b, n + 2 * kv_heads, h), cos, sin,
    rotate_half_matrix(h, dtype), t, *arrays)
  return (out[0].reshape(b, n, h),
          kv4_lib.KV4(codes=out[1], scale=out[2], zero=out[3]),
          kv4_lib.KV4(codes=out[4], scale=out[5], zero=out[6]))


@functools.partial(jax.jit, static_argnames=(
    "num_heads", "k_clip_ratio", "v_clip_ratio"))
def decode_qkv_reference(qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                         head_signs: jax.Array | None, k_cache: kv4_lib.KV4,
                         v_cache: kv4_lib.KV4, at: jax.Array, *,
                         num_heads: int, k_clip_ratio: float = 0.95,
                         v_clip_ratio: float = 0.95
                         ) -> tuple[jax.Array, kv4_lib.KV4, kv4_lib.KV4]:
  """Plain-jnp `decode_qkv`: split, RoPE, head transform (einsum), then
  `kv4_append_reference`. Arguments and result as in `decode_qkv`."""
  b, n, kv_heads, _, h = _check(qkv, cos, sin, head_signs, k_cache, v_cache,
                                at, num_heads)
  dtype = qkv.dtype
  heads = qkv.reshape(b, n + 2 * kv_heads, h)
  q, k, v = jnp.split(heads, [n, n + kv_heads], axis=1)

  def rotate(x):  # [B, heads, H]
    x32 = x.astype(jnp.float32)
    half = jnp.concatenate([-x32[..., h // 2:], x32[..., :h // 2]], axis=-1)
    y = rope(x32, half, cos[:, None, :], sin[:, None, :],
             lambda a, b: a * b).astype(dtype)
    if head_signs is None:
      return y
    z = jnp.einsum("...i,ij->...j", y, head_signs.astype(dtype),
                   precision=(jax.lax.Precision.HIGHEST
                              if dtype == jnp.float32 else None),
                   preferred_element_type=jnp.float32)
    return (z * jnp.float32(1.0 / math.sqrt(h))).astype(dtype)

  q, k = rotate(q), rotate(k)
  k_cache, v_cache = append_lib.kv4_append_reference(
      k_cache, v_cache, k, v, at, k_clip_ratio=k_clip_ratio,
      v_clip_ratio=v_clip_ratio)
  return q, k_cache, v_cache
