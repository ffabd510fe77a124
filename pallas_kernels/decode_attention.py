"""Flash-decoding attention over a float KV cache (the float model's decode).

One query token per row, grouped-query attention over the cache layout of
`quarot_jax/model.py` (k, v: [B, S, K, H]):
  out[b, n] = Σ_s softmax_s(q[b, n] · k[b, s, n // G] / √H) v[b, s, n // G]
over the slots start[b] <= s < end[b]. Shape letters as in the model: B
batch, N query heads, K kv heads, G = N / K, S slots, H head dim.

Why: XLA's einsum attention (`model.attend` at T = 1, and the plain-JAX
anchor) reads a bf16 cache at ~0.3 of HBM bandwidth at batch 16 (LLaMA-2-7B
heads, 4096 slots, H200: ~380 us a layer for 545 MB), which made our bf16
model slower than the anchor there.

Grid (B, K, num_splits), as `kv4_decode_attention`: each program takes the
G query heads of one kv head, padded to Gp >= 16 rows (Triton's smallest
dot; rows past G repeat head G - 1 and are never written), and one split of
the row's valid range, cut into runs of whole blocks; it loops over blocks
of block_s slots with an online softmax, q · kᵀ and p · v as tensor-core dots
in the cache dtype with f32 accumulation (as `model.attend`: f32 scores and
softmax, probabilities rounded to the cache dtype). For G = 1 the padded
rows are equal, so the softmax runs on one row (a max over the rows picks
it) and is broadcast back for the p · v dot. With one split the program
normalizes and writes the output; otherwise a second kernel,
`flash_decoding.merge` on grid (B, K, G), merges the splits' partials
(log-sum-exp): one program a real query row (never a padding row), all
splits at once (why, and its time: `flash_decoding`).

A block that would run past S is shifted back to end at S and its seen
slots masked, so no load leaves the cache (only S < 16 is padded). Rows with
an empty range (start >= end) give 0.

Backend: the Pallas Triton lowering (interpret mode on the CPU). Needs H a
power of two >= 16 on the GPU.
"""

import dataclasses
import functools
import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import compat
from pallas_kernels import flash_decoding

_MIN_DOT = 16  # smallest M, N, K of a Triton dot


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeAttentionConfig:
  """Tiling: slots per inner block, splits of each row's range, launch.

  Attributes:
    block_s: slots per inner step (a power of two >= 16); lowered to the
      largest power of two <= S for short caches.
    num_splits: programs per (row, kv head); None:
      `flash_decoding.default_num_splits`.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
  """

  block_s: int = 64
  num_splits: int | None = None
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    if not _is_pow2(self.block_s) or self.block_s < _MIN_DOT:
      raise ValueError(f"block_s={self.block_s} must be a power of two"
                       f" >= {_MIN_DOT}")
    if self.num_splits is not None and self.num_splits < 1:
      raise ValueError(f"num_splits={self.num_splits} must be >= 1 (or"
                       " None)")
    if not _is_pow2(self.num_warps):
      raise ValueError(f"num_warps={self.num_warps} must be a power of two")
    if self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages} must be >= 1")


def kernel_takes(head_dim: int) -> bool:
  """Whether the Pallas kernel takes heads of H on a GPU: H = 2^k >= 16."""
  return _is_pow2(head_dim) and head_dim >= _MIN_DOT


def can_use_decode_attention(head_dim: int) -> bool:
  """True where the Pallas kernel compiles: a GPU and `kernel_takes(H)`."""
  return jax.default_backend() == "gpu" and kernel_takes(head_dim)


def decode_attention_kernel(q_ref, start_ref, end_ref, k_ref, v_ref,
                            *out_refs, block_s: int, num_splits: int,
                            sm_scale: float, seq_len: int, gp: int):
  """One (row, kv head, split): online softmax over its run of blocks."""
  # q_ref: [G, H] (cache dtype); start_ref, end_ref: int32[1]
  # k_ref, v_ref: [S', H] this row's and kv head's slots (S' >= seq_len)
  # out_refs, num_splits = 1: o_ref [G, H] (dtype of q); else o_ref f32[Gp,
  #   H], m_ref, l_ref f32[Gp] (unnormalized partials for the merge, this
  #   split's slice of the NSp-long split axis)
  split = pl.program_id(2)
  g, h = q_ref.shape
  s_len = k_ref.shape[0]
  dt = k_ref.dtype
  lo_tok, hi_tok, first, last = flash_decoding.split_blocks(
      start_ref[0], end_ref[0], split, seq_len=seq_len, block_s=block_s,
      num_splits=num_splits)
  rows = jnp.minimum(jnp.arange(gp, dtype=jnp.int32), g - 1)[:, None]
  cols = jnp.arange(h, dtype=jnp.int32)[None, :]
  q = q_ref[rows, cols]  # [Gp, H]
  one_row = g == 1  # the Gp rows are one head: softmax on one row
  r = 1 if one_row else gp
  # HIGHEST: f32 caches (tests, CPU models) get IEEE dots, not TF32.
  dot = functools.partial(jax.lax.dot_general,
                          precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)

  def body(i, carry):
    o, m_prev, l_prev = carry
    off = lo_tok + i * block_s  # first slot of this block (< hi_tok)
    at = jnp.minimum(off, s_len - block_s)  # shifted back to end at S'
    pos = at + jnp.arange(block_s, dtype=jnp.int32)
    valid = (pos >= off) & (pos < hi_tok)  # [block_s]
    slots = pl.ds(at, block_s)
    s = dot(q, k_ref[slots, :], (((1,), (1,)), ((), ())))  # [Gp, block_s]
    if one_row:
      s = s.max(axis=0, keepdims=True)
    s = jnp.where(valid[None, :], s * sm_scale, -jnp.inf)  # [R, block_s]
    # Every block holds >= 1 valid slot, so m_next is finite.
    m_next = jnp.maximum(m_prev, s.max(axis=1))
    corr = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, None])
    l_next = corr * l_prev + p.sum(axis=1)
    pv = jnp.broadcast_to(p.astype(dt), (gp, block_s))
    o = corr[:, None] * o + dot(pv, v_ref[slots, :],
                                (((1,), (0,)), ((), ())))
    return o, m_next, l_next

  init = (jnp.zeros((gp, h), jnp.float32),
          jnp.full((r,), -jnp.inf, jnp.float32), jnp.zeros((r,), jnp.float32))
  o, m, l = jax.lax.fori_loop(first, last, body, init)
  m, l = jnp.broadcast_to(m, (gp,)), jnp.broadcast_to(l, (gp,))
  if num_splits == 1:
    (o_ref,) = out_refs
    _store_rows(o_ref, _normalize(o, l), g)
  else:
    o_ref, m_ref, l_ref = out_refs
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def _normalize(o, l):
  """o / l over f32[Gp, H]; 0 where l = 0 (an empty range)."""
  return o * jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)[:, None]


def _store_rows(o_ref, o, g: int):
  """Writes rows < G of f32[Gp, H] into o_ref [G, H] in its dtype."""
  gp, h = o.shape
  rows = jnp.arange(gp, dtype=jnp.int32)[:, None]
  cols = jnp.arange(h, dtype=jnp.int32)[None, :]
  mask = None if gp == g else jnp.broadcast_to(rows < g, (gp, h))
  plgpu.store(o_ref.at[rows, cols], o.astype(o_ref.dtype), mask=mask)


def _check(q, k_cache, v_cache, start, end):
  """Shapes; returns (B, N, K, S, H) and int32 start[B], end[B] or end[]."""
  if q.ndim != 3:
    raise ValueError(f"q must be [B, N, H], got {q.shape=}")
  b, n, h = q.shape
  if k_cache.ndim != 4 or k_cache.shape[0] != b or k_cache.shape[3] != h:
    raise ValueError(f"k_cache must be [B, S, K, H] with B={b}, H={h}; got"
                     f" {k_cache.shape}")
  if v_cache.shape != k_cache.shape:
    raise ValueError(f"k and v caches differ: {k_cache.shape=}"
                     f" {v_cache.shape=}")
  _, s, kv_heads, _ = k_cache.shape
  start, end = flash_decoding.check_heads_and_range(b, n, kv_heads, start,
                                                    end)
  return (b, n, kv_heads, s, h), start, end


@functools.partial(jax.jit, static_argnames=(
    "config", "interpret", "implementation"))
def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     start: jax.Array, end: jax.Array, *,
                     config: DecodeAttentionConfig | None = None,
                     interpret: bool = False,
                     implementation: Literal["pallas", "xla"] | None = None
                     ) -> jax.Array:
  """Decode attention of one query token per row over a float cache.

  Args:
    q: [B, N, H] queries (cast to the cache dtype for the dots, as
      `model.attend` computes in one dtype).
    k_cache: [B, S, K, H] keys (bf16, f16 or f32).
    v_cache: [B, S, K, H] values.
    start: int32[B], first valid slot of each row.
    end: int32[B] or int32[] (shared), one past the last valid slot.
    config: tiling; the class defaults when None.
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    implementation: 'pallas' (the kernel where `kernel_takes` H, else the
      reference), 'xla' (`decode_attention_reference`) or None (pallas on a
      GPU where `can_use_decode_attention`, or when interpret=True; logged).

  Returns:
    [B, N, H] in the dtype of q; 0 for rows with start >= end.

  Raises:
    ValueError: shapes that do not fit together.
  """
  (b, n, kv_heads, s, h), start, end = _check(q, k_cache, v_cache, start,
                                              end)
  if implementation is None:
    implementation = ("pallas" if interpret or can_use_decode_attention(h)
                      else "xla")
    logging.info("decode_attention: using %s", implementation)
  elif implementation == "pallas" and not (interpret or kernel_takes(h)):
    implementation = "xla"
    logging.info("decode_attention: the kernel does not take H=%d; using"
                 " the reference", h)
  if implementation == "xla":
    return decode_attention_reference(q, k_cache, v_cache, start, end)
  cfg = config or DecodeAttentionConfig()
  ns = cfg.num_splits or flash_decoding.default_num_splits(b, kv_heads, s)
  g = n // kv_heads
  gp = max(_MIN_DOT, 1 << max(g - 1, 0).bit_length())
  block_s = min(cfg.block_s, max(_MIN_DOT, 1 << (s.bit_length() - 1)))
  if s < block_s:  # tiny caches only (S < 16): pad the slots
    pad = [(0, 0), (0, block_s - s), (0, 0), (0, 0)]
    k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
  sp = k_cache.shape[1]
  kernel = functools.partial(
      decode_attention_kernel, block_s=block_s, num_splits=ns,
      sm_scale=1.0 / math.sqrt(h), seq_len=s, gp=gp)
  head = lambda *blk: pl.BlockSpec((None, None) + blk,
                                   lambda i, j, t: (i, j) + (0,) * len(blk))
  # [B, S, K, H] read in place: the (row, kv head) slice is [S, H], strided.
  slots = pl.BlockSpec((None, sp, None, h), lambda i, j, t: (i, 0, j, 0))
  per_row = pl.BlockSpec((1,), lambda i, j, t: (i,))
  shared = pl.BlockSpec((1,), lambda i, j, t: (0,))
  part = lambda *blk: pl.BlockSpec((None, None, None) + blk,
                                   lambda i, j, t: (i, j, t) + (0,) * len(
                                       blk))
  out = jax.ShapeDtypeStruct((b, kv_heads, g, h), q.dtype)
  if ns == 1:
    out_specs, out_shape = head(g, h), out
  else:
    # Split axis NSp long (the merge's power-of-two block); splits >= NS
    # are never written.
    nsp = flash_decoding.padded_splits(ns)
    f32 = lambda *shape: jax.ShapeDtypeStruct((b, kv_heads, nsp) + shape,
                                              jnp.float32)
    out_specs = [part(gp, h), part(gp), part(gp)]
    out_shape = [f32(gp, h), f32(gp), f32(gp)]
  params = compat.triton_params(num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages)
  # [B, N, H] -> [B, K, G, H] in the cache dtype; end [] -> [1], shared
  res = pl.pallas_call(
      kernel, grid=(b, kv_heads, ns),
      in_specs=[head(g, h), per_row, per_row if end.ndim else shared,
                slots, slots],
      out_specs=out_specs, out_shape=out_shape, compiler_params=params,
      interpret=interpret, name="decode_attention",
  )(q.reshape(b, kv_heads, g, h).astype(k_cache.dtype), start,
    end.reshape(-1), k_cache, v_cache)
  if ns > 1:
    # [B, K, NSp, Gp, H] -> [B, K, G, H]
    o, m, l = res
    res = flash_decoding.merge(
        (o,), m, l, num_splits=ns, out_shape=out, compiler_params=params,
        interpret=interpret, name="decode_attention_merge")
  # [B, K, G, H] -> [B, N, H]
  return res.reshape(b, n, h)


@jax.jit
def decode_attention_reference(q: jax.Array, k_cache: jax.Array,
                               v_cache: jax.Array, start: jax.Array,
                               end: jax.Array) -> jax.Array:
  """Plain-jnp `decode_attention`: `model.attend`'s arithmetic at T = 1
  (dots in the cache dtype with f32 accumulation, f32 softmax).

  Args:
    q: [B, N, H] queries.
    k_cache: [B, S, K, H] keys.
    v_cache: [B, S, K, H] values.
    start: int32[B] first valid slot.
    end: int32[B] or int32[] one past the last valid slot.

  Returns:
    [B, N, H] in the dtype of q; 0 for rows with start >= end.
  """
  (b, n, kv_heads, s, h), start, end = _check(q, k_cache, v_cache, start,
                                              end)
  hi = (jax.lax.Precision.HIGHEST if k_cache.dtype == jnp.float32
        else jax.lax.Precision.DEFAULT)
  qg = q.reshape(b, kv_heads, n // kv_heads, h).astype(k_cache.dtype)
  scores = jnp.einsum("BKGH,BSKH->BKGS", qg, k_cache, precision=hi,
                      preferred_element_type=jnp.float32) / math.sqrt(h)
  slots = jnp.arange(s, dtype=jnp.int32)
  end = jnp.broadcast_to(end, (b,))
  mask = (slots >= start[:, None]) & (slots < end[:, None])  # [B, S]
  scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
  m = scores.max(axis=-1, keepdims=True)
  p = jnp.where(mask[:, None, None],
                jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  l = p.sum(axis=-1, keepdims=True)
  out = jnp.einsum("BKGS,BSKH->BKGH", (p / jnp.where(l > 0, l, 1.0)).astype(
      v_cache.dtype), v_cache, precision=hi,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, n, h).astype(q.dtype)
