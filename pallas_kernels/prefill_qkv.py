"""Prefill, qkv_proj output to flash-attention input and KV4 cache, in one
launch.

For T new tokens a row, from the fused q/k/v projection's output
qkv[B, T, (N + 2K) · H] (query heads first, then keys, then values), as
`decode_qkv` does for one token:
  q = T(rope(q)),  k = T(rope(k)) - c   (T: QuaRot's online Hadamard on
                                          each head, or nothing; c: an
                                          optional key center [K, H])
  k_cache[b, j, at + t] <- quantize_kv4(k[b, t, j]),  v_cache likewise,
and returns q [B, T, N, H] and what the caches now hold for this step,
dequantized in k's and v's own layout ([B, T, K, H]: `fake_quantize_kv4`),
which is what flash attention reads in the prefill of an empty cache
(`quarot_jax.model._packed_cache_attention`). Shape letters as in
`quarot_jax/model.py`.

Why: XLA runs this as RoPE fusions for q and k, two head-Hadamard GEMMs,
and the KV4 quantize, pack and transpose fusions of `write_kv4` and
`fake_quantize_kv4`: ~1.5 ms of a LLaMA-2-7B layer at 32768 tokens on an
H200, where the bytes (qkv read once; q, the dequantized k and v and the
cache written once) take ~0.36 ms (BENCHMARKS.md, 2026-12-04). Timed
alone: 1.16x / 1.90x its XLA reference at 7B heads, B = 16 / 1 (H200,
2026-12-04), and a 7B layer 1-2% faster with it at B = 1, 4, 16: on in
`quarot_jax.kernels`' GPU settings.

Numerics, step for step those of `decode_qkv` (and of the unfused ops,
`prefill_qkv_reference`): RoPE from f32 cos/sin of each token, rounded to
x's dtype; T as a dot with f32 accumulation times f32(1 / √h), rounded; the
key center subtracted in f32 and rounded; the KV4 quantizer of
`kv4_append` (`row_scale_zero`, `row_codes`) on each token's head; the
dequantized values (code - zero) * scale in f32.

Grid (B, T / bt, (N + 2K) / hb): program (b, i, g) takes tokens i·bt .. of
row b and heads g·hb .. (g + 1)·hb of qkv (`heads_per_program`: all
queries, all keys or all values), each as a [bt, H] tile. The tokens' cos
and sin are read once for the hb heads (with one head a program, they were
read N + K times per token). A tile's halves give RoPE without a
concatenate; T is two half-width dots. Keys and values are quantized in
their element order, and each byte packs elements 2e and 2e + 1 (a reshape
and an unstack, as `hadamard_quant` packs).

Backend: the Pallas Triton lowering (interpret mode on the CPU). Needs H / 2
a power of two and T a multiple of 16 (`kernel_takes`); callers fall back to
the unfused ops otherwise.
"""

import functools
import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import compat
from pallas_kernels import decode_qkv as decode_qkv_lib
from pallas_kernels import kv4_append as append_lib
from pallas_kernels import kv4_cache as kv4_lib

_MIN_TILE = 16  # Triton's smallest dot


def default_block_tokens(t: int, most: int = 64) -> int:
  """bt, the tokens a program takes: the largest power of two <= `most`
  dividing T (0 when T is not a multiple of 16)."""
  bt = most
  while bt >= _MIN_TILE and t % bt:
    bt //= 2
  return bt if bt >= _MIN_TILE else 0


def kernel_takes(head_dim: int, tokens: int) -> bool:
  """Whether the kernel takes heads of H and T tokens: H / 2 a power of two
  (as `kv4_append`), T a multiple of 16."""
  return append_lib.kernel_takes(head_dim) and default_block_tokens(tokens) > 0


def can_use_prefill_qkv(head_dim: int, tokens: int) -> bool:
  """True where the Pallas kernel compiles: a GPU and `kernel_takes`."""
  return jax.default_backend() == "gpu" and kernel_takes(head_dim, tokens)


def prefill_qkv_kernel(at_ref, qkv_ref, cos_ref, sin_ref, t_ref, center_ref,
                       kc_in, ks_in, kz_in, vc_in, vs_in, vz_in, q_ref,
                       kf_ref, vf_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref,
                       vz_ref, *, n: int, kv_heads: int, tokens: int,
                       norm: float, k_clip_ratio: float, v_clip_ratio: float,
                       exact: bool, centered: bool, half_rope: bool = False):
  """Tokens i·bt .. (i + 1)·bt of row b, heads g·hb .. (g + 1)·hb: query
  heads (rotated, stored), key heads (rotated, quantized into the cache,
  dequantized into kf) or value heads (quantized, dequantized into vf)."""
  # at_ref: int32[] first slot; qkv_ref: [bt, hb, H] heads of the tokens;
  # cos_ref, sin_ref: f32[bt, H], or f32[bt, H / 2] (their first halves)
  # with `half_rope`, for both halves; t_ref: [H, H] T (±1 or identity);
  # center_ref: [K, H] (read only when `centered`).
  # q_ref, kf_ref, vf_ref: [bt, hb, H] (q heads g·hb.., k and v heads
  # g·hb - N.., g·hb - N - K..); kc/vc: uint8[hb, S, H // 2]; ks/vs, kz/vz:
  # [hb, S] (those heads' caches). The *_in refs alias the caches.
  del kc_in, ks_in, kz_in, vc_in, vs_in, vz_in
  bt, hb, h = qkv_ref.shape
  h2 = h // 2
  s_len = kc_ref.shape[1]
  dtype = qkv_ref.dtype
  g = pl.program_id(2)
  mul, _ = append_lib.f32_ops(exact)
  dot = functools.partial(jax.lax.dot, preferred_element_type=jnp.float32,
                          precision=(jax.lax.Precision.HIGHEST
                                     if dtype == jnp.float32 else None))
  at = at_ref[()]
  at = jnp.where(at < 0, at + s_len, at)  # as dynamic_update_slice: the T
  first = jnp.clip(at, 0, s_len - tokens) + pl.program_id(1) * bt  # fit
  half = lambda i: pl.ds(i * h2, h2)
  slots = pl.ds(first, bt)

  def rotated(jj, cs):
    """Head jj of the program: RoPE, then T, in x's dtype (as f32 [bt, H]).
    Each head is stored before the next is formed, so that one head's
    tiles are live at a time (a list of all hb heads spilled)."""
    x1, x2 = (qkv_ref[:, jj, half(i)].astype(jnp.float32) for i in (0, 1))
    y1, y2 = decode_qkv_lib.rope(x1, x2, *cs, mul)
    y1, y2 = y1.astype(dtype), y2.astype(dtype)
    z = dot(y1, t_ref[half(0), :]) + dot(y2, t_ref[half(1), :])
    return (z * norm).astype(dtype).astype(jnp.float32)

  # The tokens' cos and sin, read once for the program's hb heads.
  def cos_sin():
    if half_rope:  # HF's layout: the H / 2 frequencies twice
      c, s = cos_ref[...], sin_ref[...]
      return [c, c, s, s]
    return [ref[:, half(i)] for ref in (cos_ref, sin_ref) for i in (0, 1)]

  def write(jj, x, c_ref, s_ref, z_ref, f_ref, clip_ratio):
    """Quantizes the rows x f32[bt, H] of head jj into its cache slots and
    stores them dequantized."""
    xmin = jnp.minimum(x.min(axis=1), 0.0)  # [bt], 0 included
    xmax = jnp.maximum(x.max(axis=1), 0.0)
    scale, zero = append_lib.row_scale_zero(xmin, xmax, clip_ratio, exact)
    codes = append_lib.row_codes(x, scale, zero, exact)  # [bt, H]
    rows = lambda v: jax.lax.broadcast_in_dim(v, (bt, h), (0,))
    f_ref[:, jj, :] = mul(codes.astype(jnp.float32) - rows(zero),
                          rows(scale)).astype(f_ref.dtype)
    even, odd = jnp.unstack(codes.reshape(bt, h2, 2), axis=-1)
    c_ref[jj, slots, :] = (even | (odd << 4)).astype(jnp.uint8)
    s_ref[jj, slots] = scale
    z_ref[jj, slots] = zero.astype(jnp.int32).astype(jnp.uint8)

  q_groups, kv_groups = n // hb, kv_heads // hb

  @pl.when(g < q_groups)
  def _():
    cs = cos_sin()
    for jj in range(hb):
      q_ref[:, jj, :] = rotated(jj, cs).astype(q_ref.dtype)

  @pl.when((g >= q_groups) & (g < q_groups + kv_groups))
  def _():
    cs = cos_sin()
    for jj in range(hb):
      k = rotated(jj, cs)
      if centered:
        row = (g - q_groups) * hb + jj
        c = center_ref[pl.ds(row, 1), :].astype(jnp.float32)  # [1, H]
        k = (k - jnp.broadcast_to(c, k.shape)).astype(dtype).astype(
            jnp.float32)
      write(jj, k, kc_ref, ks_ref, kz_ref, kf_ref, k_clip_ratio)

  @pl.when(g >= q_groups + kv_groups)
  def _():
    for jj in range(hb):
      write(jj, qkv_ref[:, jj, :].astype(jnp.float32), vc_ref, vs_ref,
            vz_ref, vf_ref, v_clip_ratio)


def heads_per_program(num_heads: int, kv_heads: int, most: int = 2) -> int:
  """hb: the largest power of two <= `most` dividing N and K, so that a
  program's heads are all queries, all keys or all values. 2 was fastest
  of 1/2/4/8 at 7B heads on an H200, B = 1 and 16 (more programs, each
  shorter; `experiments/bench_prefill_qkv.py`, BENCHMARKS.md)."""
  hb = most
  while num_heads % hb or kv_heads % hb:
    hb //= 2
  return hb


def _check(qkv, cos, sin, head_signs, k_cache, v_cache, num_heads,
           k_center) -> tuple[int, int, int, int, int, int]:
  """Shapes and dtypes; returns (B, T, N, K, S, H)."""
  kv_heads, s, h = decode_qkv_lib.check_heads(
      qkv, cos, sin, head_signs, k_cache, num_heads, k_center, lead="B, T")
  b, t, _ = qkv.shape
  if t > s:
    raise ValueError(f"T={t} new tokens do not fit the caches' S={s} slots")
  for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
    if (c.codes.shape[0] != b or c.codes.shape != k_cache.codes.shape
        or c.codes.dtype != jnp.uint8):
      raise ValueError(f"{name} codes must be uint8[B, K, S, H // 2] ="
                       f" {[b, kv_heads, s, h // 2]}, got"
                       f" {c.codes.dtype}{list(c.codes.shape)}")
  return b, t, num_heads, kv_heads, s, h


_STATIC = ("num_heads", "k_clip_ratio", "v_clip_ratio", "block_tokens",
           "block_heads", "num_warps", "rope_halves_equal", "interpret",
           "debug", "implementation")


@functools.partial(jax.jit, static_argnames=_STATIC)
def prefill_qkv(qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                head_signs: jax.Array | None, k_cache: kv4_lib.KV4,
                v_cache: kv4_lib.KV4, at: jax.Array, *, num_heads: int,
                k_center: jax.Array | None = None,
                k_clip_ratio: float = 0.95, v_clip_ratio: float = 0.95,
                block_tokens: int | None = None,
                block_heads: int | None = None, num_warps: int = 4,
                rope_halves_equal: bool = False, interpret: bool = False,
                debug: bool = False,
                implementation: Literal["pallas", "xla"] | None = None):
  """RoPE and the head transform of T tokens' q and k, with k and v
  quantized into slots at .. at + T - 1 of packed KV4 caches.

  Args:
    qkv: float[B, T, (N + 2K) · H], the fused q/k/v projection (bf16, f16
      or f32).
    cos: f32[B, T, H] rotary cosines at each token's position
      (`quarot_jax.layers.rope_cos_sin`).
    sin: f32[B, T, H] rotary sines.
    head_signs: [H, H] ±1 Hadamard matrix applied to each rotated head as
      x @ head_signs / √H, or None (no transform).
    k_cache: `kv4_cache.KV4` keys, codes uint8[B, K, S, H // 2].
    v_cache: `kv4_cache.KV4` values, the same shapes.
    at: int32[] first slot (negative: from the end; then clamped so that
      the T slots fit, as `lax.dynamic_update_slice`).
    num_heads: N.
    k_center: [K, H] mean key of each kv head, subtracted from the rotated
      keys before they are quantized, or None.
    k_clip_ratio: range clip of the key quantizer (QuaRot: 0.95).
    v_clip_ratio: range clip of the value quantizer.
    block_tokens: tokens a program (a power of two dividing T, >= 16; None:
      `default_block_tokens(T)`).
    block_heads: heads a program (hb: dividing N and K; None:
      `heads_per_program(N, K)`).
    num_warps: Triton warps a program.
    rope_halves_equal: cos and sin hold the H / 2 frequencies twice (HF's
      layout, as `rope_cos_sin` builds them), so the kernel reads only
      their first halves, for both halves of each head (half the bytes of
      cos and sin each program reads). With halves that differ the result
      is wrong: the caller vouches for the layout.
    interpret: run the kernel in interpret mode (CPU tests).
    debug: print the kernel's jaxpr.
    implementation: 'pallas' (the kernel where `kernel_takes`, else the
      reference), 'xla' (the reference) or None (pallas where
      `can_use_prefill_qkv` or `interpret`; logged).

  Returns:
    (q [B, T, N, H], k [B, T, K, H], v [B, T, K, H], k_cache, v_cache): q
    in qkv's dtype; k and v what the caches now hold for these tokens,
    dequantized ((code - zero) * scale, rounded to qkv's dtype); the
    caches' buffers updated in place where XLA can donate them.

  Raises:
    ValueError: shapes or dtypes that do not fit together, a
      block_tokens that does not divide T or a block_heads that does not
      divide N and K.
  """
  b, t, n, kv_heads, s, h = _check(qkv, cos, sin, head_signs, k_cache,
                                   v_cache, num_heads, k_center)
  if implementation is None:
    implementation = ("pallas" if interpret or can_use_prefill_qkv(h, t)
                      else "xla")
    logging.info("prefill_qkv: using %s", implementation)
  elif implementation == "pallas" and not kernel_takes(h, t):
    implementation = "xla"
    logging.info("prefill_qkv: the kernel does not take H=%d, T=%d; using"
                 " the reference", h, t)
  if implementation == "xla":
    return prefill_qkv_reference(
        qkv, cos, sin, head_signs, k_cache, v_cache, at, num_heads=n,
        k_center=k_center, k_clip_ratio=k_clip_ratio,
        v_clip_ratio=v_clip_ratio)
  bt = block_tokens or default_block_tokens(t)
  if bt < _MIN_TILE or bt & (bt - 1) or t % bt:
    raise ValueError(f"block_tokens={bt} must be a power of two >="
                     f" {_MIN_TILE} dividing T={t}")
  dtype = qkv.dtype
  if head_signs is None:  # the identity: exact products, norm 1
    signs, norm = jnp.eye(h, dtype=dtype), 1.0
  else:
    norm = float(np.float32(1.0 / math.sqrt(h)))
    signs = head_signs.astype(dtype)
  center = (jnp.zeros((kv_heads, h), dtype) if k_center is None
            else k_center.astype(dtype))
  kernel = functools.partial(
      prefill_qkv_kernel, n=n, kv_heads=kv_heads, tokens=t, norm=norm,
      k_clip_ratio=k_clip_ratio, v_clip_ratio=v_clip_ratio,
      exact=not interpret, centered=k_center is not None,
      half_rope=rope_halves_equal)
  h2 = h // 2
  hb = block_heads or heads_per_program(n, kv_heads)
  if hb < 1 or n % hb or kv_heads % hb:
    raise ValueError(f"block_heads={hb} must divide N={n} and K={kv_heads}")
  q_groups, kv_groups = n // hb, kv_heads // hb
  clip = lambda g, lo: jnp.clip(g - lo, 0, kv_groups - 1)
  tile = lambda group: pl.BlockSpec((None, bt, hb, h),
                                    lambda r, i, g: (r, i, group(g), 0))
  whole = lambda *shape: pl.BlockSpec(shape,
                                      lambda r, i, g: (0,) * len(shape))

  def cache(lo):  # hb heads' whole caches: [hb, S, H // 2], [hb, S] x 2
    return [pl.BlockSpec((None, hb, s, h2),
                         lambda r, i, g: (r, clip(g, lo), 0, 0)),
            pl.BlockSpec((None, hb, s), lambda r, i, g: (r, clip(g, lo), 0)),
            pl.BlockSpec((None, hb, s), lambda r, i, g: (r, clip(g, lo), 0))]

  caches = cache(q_groups) + cache(q_groups + kv_groups)
  arrays = (k_cache.codes, k_cache.scale, k_cache.zero, v_cache.codes,
            v_cache.scale, v_cache.zero)
  token_rows = pl.BlockSpec((None, bt, h2 if rope_halves_equal else h),
                            lambda r, i, g: (r, i, 0))
  out = pl.pallas_call(
      kernel,
      grid=(b, t // bt, q_groups + 2 * kv_groups),
      in_specs=[pl.BlockSpec((None,), lambda r, i, g: (0,)),
                tile(lambda g: g), token_rows, token_rows, whole(h, h),
                whole(kv_heads, h)] + caches,
      out_specs=[tile(lambda g: jnp.minimum(g, q_groups - 1)),
                 tile(lambda g: clip(g, q_groups)),
                 tile(lambda g: clip(g, q_groups + kv_groups))] + caches,
      out_shape=[jax.ShapeDtypeStruct((b, t, n, h), dtype),
                 jax.ShapeDtypeStruct((b, t, kv_heads, h), dtype),
                 jax.ShapeDtypeStruct((b, t, kv_heads, h), dtype)] + [
                     jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays],
      input_output_aliases={6 + i: 3 + i for i in range(6)},
      compiler_params=compat.triton_params(num_warps=num_warps,
                                           num_stages=1),
      interpret=interpret, debug=debug, name="prefill_qkv",
  )(jnp.asarray(at, jnp.int32).reshape(1),
    qkv.reshape(b, t, n + 2 * kv_heads, h), cos, sin, signs, center, *arrays)
  q, k, v = out[:3]
  return (q, k, v, kv4_lib.KV4(codes=out[3], scale=out[4], zero=out[5]),
          kv4_lib.KV4(codes=out[6], scale=out[7], zero=out[8]))


@functools.partial(jax.jit, static_argnames=(
    "num_heads", "k_clip_ratio", "v_clip_ratio"))
def prefill_qkv_reference(qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                          head_signs: jax.Array | None,
                          k_cache: kv4_lib.KV4, v_cache: kv4_lib.KV4,
                          at: jax.Array, *, num_heads: int,
                          k_center: jax.Array | None = None,
                          k_clip_ratio: float = 0.95,
                          v_clip_ratio: float = 0.95):
  """Plain-jnp `prefill_qkv`: split, RoPE, head transform (einsum), key
  center, then `write_kv4` and `fake_quantize_kv4` of k and v. Arguments
  and result as in `prefill_qkv`."""
  b, t, n, kv_heads, _, h = _check(qkv, cos, sin, head_signs, k_cache,
                                   v_cache, num_heads, k_center)
  dtype = qkv.dtype
  heads = qkv.reshape(b, t, n + 2 * kv_heads, h)
  q, k, v = jnp.split(heads, [n, n + kv_heads], axis=2)
  q, k = (decode_qkv_lib.rotated_reference(
      x, cos[:, :, None, :], sin[:, :, None, :], head_signs, k_center=c)
          for x, c in ((q, None), (k, k_center)))
  caches = tuple(kv4_lib.write_kv4(c, x, at, clip_ratio=r)
                 for c, x, r in ((k_cache, k, k_clip_ratio),
                                 (v_cache, v, v_clip_ratio)))
  k_deq, v_deq = (kv4_lib.fake_quantize_kv4(x, clip_ratio=r).astype(dtype)
                  for x, r in ((k, k_clip_ratio), (v, v_clip_ratio)))
  return (q, k_deq, v_deq, *caches)
