"""Flash-decoding attention over a packed 4-bit KV cache (`kv4_cache.KV4`).

One query token per row (decode), grouped-query attention:
  out[b, n] = Σ_s softmax_s(q[b, n] · k[b, n // G, s] / √H) v[b, n // G, s]
over the slots start[b] <= s < end[b] (left padding before start[b]), with
k, v ≈ (code - zero) * scale as stored by `kv4_cache` (codes
uint8[B, K, S, H // 2] in the int4 packing of `int4_layout.py`: low
nibble = even h; scale f32[B, K, S], zero uint8[B, K, S]). Shape letters as in
`quarot_jax/model.py`: B batch, N query heads, K kv heads, G = N / K,
S slots, H head dim.

Grid (B, K, num_splits). Each program takes the G query heads of one kv
head and one split of that row's valid range [start, end) (the range, not
[0, S), is cut into num_splits runs of whole blocks, so short rows do not
leave programs idle), loops over it in blocks of block_s tokens with an
online softmax. With num_splits = 1 it normalizes and writes the output in
the dtype of q, so the op is one kernel launch (decode is launch-bound);
otherwise it writes an unnormalized partial (o, m, l) and a second Pallas
kernel, `flash_decoding.merge` on grid (B, K, G), merges the splits
(log-sum-exp) and normalizes: one program a real query row, all splits at
once, so the padding rows of the dot path are never read (why, and its
time: `flash_decoding`). No XLA op runs around them
but free reshapes: q is read as [B, K, G, H], the output written as
[B, K, G, H], and start/end are clamped in the kernel.

Two paths, chosen by G (`uses_dot_free_path`):
  * dot path (G > 1): the G heads are loaded as Gp >= 16 rows (the
    smallest Triton dot; rows past G repeat head G - 1 and are never
    written), and q · k and p' · v are tensor-core dots.
  * dot-free path (G = 1, MHA): padding one head to 16 rows would do 16x the
    dot, exp and softmax work per byte of cache read (measured: ~30% of HBM
    bandwidth on an H100). The one query row instead takes elementwise f32
    products with row sums, [1, H/2] * [block_s, H/2] summed over H/2 for
    the scores and p'[block_s, 1] * v[block_s, H/2] summed over block_s for
    the output; the softmax is shared with the dot path. With no dot-size
    constraint its default block_s is larger (256: best of 64/128/256 at
    LLaMA-2-7B heads on an H100, BENCHMARKS.md).
Both compute the same math (below); only the summation order differs.
For bf16 q the dot path can skip the int -> float conversions (`nibbles=
'bits'`: 128 + code straight from the bits, the 128 folded into the zero
points) and, at G = 1, run the softmax on the one real row
(`softmax_rows='one'`); so configured it is the fastest MHA path measured
on an H200 at B = 1 and 16, the default for bf16 q; the dot-free path stays
for f32/f16 q (`default_kv4_decode_attention_config`).

The nibbles are never interleaved and k, v are never dequantized in full.
With lo = low nibbles (even h), hi = high nibbles (odd h), per token t:
  q · k_t = scale_t * (q_even · lo_t + q_odd · hi_t - zero_t * Σ_h q_h)
(the kernel loads q's even and odd columns apart and sums them), and
with p'_t = p_t * scale_v,t:
  o_even = Σ_t p'_t lo_t - Σ_t p'_t zero_t,  o_odd likewise with hi_t,
which the kernel stores interleaved back to [.., H]. The codes 0..15 are
exact in bf16; the dots take q (and p') in the dtype of q with f32
accumulation, as bf16 flash attention does; the zero-point term uses the
same rounded p'. The dot-free path rounds p' to the dtype of q too and then
multiplies in f32, which is exact for bf16/f16 operands, like the dots'
products.

A block that would run past S is shifted back to end at S and its already
seen tokens are masked, so no load leaves the arrays (the cache is never
padded; only S < 16 is). Rows with an empty range (start >= end) give 0,
never NaN. `end` is clamped to S and `start` to 0.

Backend: the Pallas Triton lowering (interpret mode on the CPU). Needs H / 2
a power of two >= 16 on the GPU (H = 32, 64, 128, 256). Not supported: more
than one query token, group scales inside a head, paged caches.
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
from pallas_kernels import kv4_cache as kv4_lib

_MIN_DOT = 16  # smallest M, N, K of a Triton dot


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True, kw_only=True)
class KV4DecodeAttentionConfig:
  """Tiling: tokens per inner block and splits of each row's range.

  Attributes:
    block_s: tokens per inner step (a power of two >= 16); lowered to the
      largest power of two <= S for short caches. The dot-free (G = 1) path
      has no dot-size floor but keeps the same one; it takes larger blocks
      (128, 256) well.
    num_splits: programs per (row, kv head), each over a contiguous run of
      blocks of the row's range.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
    path: 'auto' (`uses_dot_free_path`), 'dot' (tensor-core dots, any G;
      G = 1 pads the one head to 16 rows) or 'dot_free' (G = 1 only).
    nibbles: how the dot path turns codes into bf16 operands: 'convert'
      (int -> float conversions, two per nibble) or 'bits' (bf16 q only:
      the bits 0x4300 | c, which read as 128 + c, built four bytes at a
      time with prmt / shr / lop3 on the GPU; the offset 128 is added to
      the zero points instead, so no subtraction runs).
    softmax_rows: dot path with G = 1 only: 'all' computes the softmax on
      all 16 padded rows of the dot (equal rows), 'one' on the one real
      row (a max over the dot's equal rows picks it), broadcast back to 16
      rows for the p · v dot.
  """

  block_s: int = 64
  num_splits: int = 4
  num_warps: int = 4
  num_stages: int = 2
  path: Literal["auto", "dot", "dot_free"] = "auto"
  nibbles: Literal["convert", "bits"] = "convert"
  softmax_rows: Literal["all", "one"] = "all"

  def __post_init__(self):
    if not _is_pow2(self.block_s) or self.block_s < _MIN_DOT:
      raise ValueError(f"block_s={self.block_s} must be a power of two"
                       f" >= {_MIN_DOT}")
    if self.num_splits < 1:
      raise ValueError(f"num_splits={self.num_splits} must be >= 1")
    if not _is_pow2(self.num_warps):
      raise ValueError(f"num_warps={self.num_warps} must be a power of two")
    if self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages} must be >= 1")
    if self.path not in ("auto", "dot", "dot_free"):
      raise ValueError(f"path={self.path!r} must be 'auto', 'dot' or"
                       " 'dot_free'")
    if self.softmax_rows not in ("all", "one"):
      raise ValueError(f"softmax_rows={self.softmax_rows!r} must be 'all'"
                       " or 'one'")
    if self.nibbles not in ("convert", "bits"):
      raise ValueError(f"nibbles={self.nibbles!r} must be 'convert' or"
                       " 'bits'")


def uses_dot_free_path(query_heads: int, kv_heads: int) -> bool:
  """True where the kernel takes the dot-free path: G = N / K = 1 (MHA).

  Only G = 1: for G >= 2 the elementwise products would need a 3-D
  [G, block_s, H / 2] intermediate (or G passes over each unpacked block),
  G times the CUDA-core multiply-adds per byte read, while the dot path's
  padding waste falls to 16 / G (G = 4 measured 3.3-4.3x faster than bf16
  XLA attention on an H100).

  Args:
    query_heads: N.
    kv_heads: K.

  Returns:
    Whether `kv4_decode_attention` computes without dots.
  """
  return query_heads == kv_heads


def default_kv4_decode_attention_config(
    batch: int, kv_heads: int, max_len: int, head_dim: int,
    *, query_heads: int | None = None, dtype=None,
    num_sms: int = 132) -> KV4DecodeAttentionConfig:
  """Enough splits for ~2 programs per SM, at least 128 slots each; the
  fastest path and tiles measured for the heads.

  H200, LLaMA-2-7B heads (32 x 128, MHA), jax 0.11.2, 2026-12-02 (`bench
  kv4_attention --heads=32x32x128 --batch=16,1 --seq=1088,4160
  --block_s=128,256 --paths=dot,dot_free --nibbles=bits --softmax_rows=one
  --num_stages=2,3,4 ...`, `results/kv4_decode_attention.jsonl`):
  * MHA with bf16 q: the dot path with 'bits' nibbles and the one-row
    softmax, 128-slot blocks, at every batch. B = 16, one split: 3
    pipeline stages, 0.0436 ms at 1088 slots (256-slot blocks, 2 stages:
    0.0548; bf16 flash decoding 0.075) and 0.143 ms at 4160 (0.169; flash
    decoding 0.282). B = 1, 8-9 short splits: 2 stages, 7.7 us at 1088 and
    15.0 at 4160, against 9.0 and 18.1 for the dot-free path (its best).
  * splits: at B = 1, S = 1088, 8 splits took 10.5 us against 18.7 at the
    2 that an old floor of 512 slots a split allowed (2026-12-01); at
    B = 16 one split (already ~4 programs per SM) stays best (2 and 4:
    slower at every tile, 2026-12-02).
  * GQA (32 x 8 heads): the 'bits' nibbles with 128-slot blocks are 1.44x
    the int -> float ones with 64 at B = 16, S = 4160 (0.0475 ms; XLA bf16
    0.240), 1.07x at B = 1; at 1088 slots the default 3 splits, 2 stages
    are the best of 64/128-slot blocks, 3-6 splits, 2-3 stages and 4-8
    warps (0.0152 ms; 2026-12-02).

  Args:
    batch: B.
    kv_heads: K.
    max_len: S.
    head_dim: H.
    query_heads: N (None: the dot path's tiles for GQA).
    dtype: dtype of q; the 'bits' dot path for MHA needs bf16 (None: not
      bf16).
    num_sms: streaming multiprocessors of the GPU (H100/H200 SXM: 132).

  Returns:
    A `KV4DecodeAttentionConfig`.
  """
  del head_dim
  num_splits = flash_decoding.default_num_splits(batch, kv_heads, max_len,
                                                 num_sms)
  per_split = max_len // num_splits
  mha = query_heads is not None and uses_dot_free_path(query_heads, kv_heads)
  if mha and dtype == jnp.bfloat16:
    # Deeper pipelining pays where a program streams long runs of slots.
    return KV4DecodeAttentionConfig(
        block_s=128, num_splits=num_splits, path="dot", nibbles="bits",
        softmax_rows="one", num_stages=3 if per_split >= 1024 else 2)
  # Larger blocks amortize the per-block reductions and loop overhead of the
  # dot-free path; the dot path's [16, block_s] scores favour 64 with
  # int -> float nibbles, 128 with 'bits' (GQA, G = 4, S = 4160: 0.0475 ms
  # against 0.0686 at B = 16, 0.0281 against 0.0301 at B = 1).
  if mha:
    return KV4DecodeAttentionConfig(
        block_s=256 if per_split >= 256 else 128, num_splits=num_splits)
  if dtype == jnp.bfloat16:
    return KV4DecodeAttentionConfig(block_s=128, num_splits=num_splits,
                                    nibbles="bits")
  return KV4DecodeAttentionConfig(block_s=64, num_splits=num_splits)


def kernel_takes(head_dim: int) -> bool:
  """Whether the Pallas kernel takes heads of H (on a GPU): H / 2 = 2^k
  >= 16."""
  return (head_dim % 2 == 0 and _is_pow2(head_dim // 2)
          and head_dim // 2 >= _MIN_DOT)


def can_use_kv4_decode_attention(head_dim: int) -> bool:
  """True where the Pallas kernel compiles: a GPU and `kernel_takes(H)`."""
  return jax.default_backend() == "gpu" and kernel_takes(head_dim)


def _nibbles(codes: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """uint8 [..] bytes -> (low, high) unsigned codes 0..15 in `dtype`.

  Plain int -> float conversions: the exponent trick (OR the code into the
  mantissa of 2^23, subtract 2^23) made the kernel 8% slower in the 7B
  model (H200, B = 16, 4096 cached, 2026-12-01: 7996 vs 7407 µs a step).
  """
  c = codes.astype(jnp.int32)
  return (c & 0xF).astype(dtype), (c >> 4).astype(dtype)


# 0x4300 is bf16 128.0, whose ulp is 1: OR-ing a code c < 16 into its low
# mantissa bits gives exactly 128 + c.
_BF16_128 = 0x4300
_BITS_OFFSET = 128.0

# Four bytes in one 32-bit register ($2, byte i = element i) -> their low
# nibbles ($0: elements 0, 1; $1: 2, 3) as bf16 pairs 128 + c. prmt spreads
# bytes 0, 1 (then 2, 3) to the two 16-bit halves; lop3 0xEA is
# (a & b) | c. The high nibbles: the same after a shift right by 4 (the
# bytes prmt leaves zero shift nothing into the kept bits). One output per
# asm: the Triton lowering of jax 0.11 rejects a multi-result asm inside a
# loop ("2 outvars do not match 1 outvals").
_NIBBLES_ASM = """{{
.reg .b32 t0, t1;
prmt.b32 t0, $2, 0, 0x4140;
prmt.b32 t1, $2, 0, 0x4342;
{shift}
lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xEA;
}}"""


def _nibbles_bits(codes: jax.Array, use_asm: bool
                  ) -> tuple[jax.Array, jax.Array]:
  """uint8 [..] bytes -> (low, high) bf16 128 + code, from bits alone.

  On the GPU each inline-asm instance takes four bytes (four or six
  integer instructions for four values, against two conversions per
  value); interpreted, the same bits from jnp integer ops.
  """
  if use_asm:
    shape = jax.ShapeDtypeStruct(codes.shape, jnp.bfloat16)
    run = lambda shift: plgpu.elementwise_inline_asm(
        _NIBBLES_ASM.format(shift=shift), args=[codes],
        constraints="=r,=r,r", pack=4, result_shape_dtypes=[shape])[0]
    return run(""), run("shr.b32 t0, t0, 4;\nshr.b32 t1, t1, 4;")
  c = codes.astype(jnp.uint16)
  bits = lambda n: jax.lax.bitcast_convert_type(n | _BF16_128, jnp.bfloat16)
  return bits(c & 0xF), bits(c >> 4)


def _head_index(g: int, gp: int, h2: int, odd: int):
  """Index arrays of the [Gp, H // 2] even (odd=0) or odd columns of G rows.

  Rows past G repeat row G - 1 (in bounds; their results are never stored).
  """
  rows = jnp.minimum(jnp.arange(gp, dtype=jnp.int32), g - 1)
  cols = 2 * jnp.arange(h2, dtype=jnp.int32) + odd
  return rows[:, None], cols[None, :]


def _store_heads(o_ref, o_e, o_o, g: int):
  """Writes f32[Gp, H // 2] even / odd columns into o_ref [G, H], rows < G,
  interleaved back to h = 2c, 2c + 1, in the dtype of o_ref."""
  gp, h2 = o_e.shape
  rows = jnp.arange(gp, dtype=jnp.int32)[:, None]
  cols = 2 * jnp.arange(h2, dtype=jnp.int32)[None, :]
  mask = None if gp == g else jnp.broadcast_to(rows < g, (gp, h2))
  for c, o in ((cols, o_e), (cols + 1, o_o)):
    plgpu.store(o_ref.at[rows, c], o.astype(o_ref.dtype), mask=mask)


def _normalize(o_e, o_o, l):
  """o / l over f32[Gp, H // 2] halves; 0 where l = 0 (an empty range)."""
  inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)[:, None]
  return o_e * inv, o_o * inv


def kv4_decode_attention_kernel(
    q_ref, start_ref, end_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref,
    vz_ref, *out_refs, block_s: int, num_splits: int, sm_scale: float,
    dot_free: bool, seq_len: int, gp: int, bits: bool, use_asm: bool,
    one_row: bool):
  """One (row, kv head, split): online softmax over its run of blocks.

  With num_splits = 1 it normalizes and writes the output; otherwise an
  unnormalized partial (o_even, o_odd, m, l) for `flash_decoding.merge`.
  """
  # q_ref: [G, H] the query heads of this kv head (dtype of q)
  # start_ref, end_ref: int32[1] (this row's, or a shared end)
  # kc_ref, vc_ref: uint8[S', H // 2];  ks/vs_ref: f32[S']; kz/vz_ref:
  #   uint8[S'] (S' >= seq_len = S: padded to one block when S < 16)
  # out_refs, num_splits = 1: o_ref [G, H] (dtype of q)
  #   else: oe_ref, oo_ref f32[Gp, H // 2]; m_ref, l_ref f32[Gp] (this
  #   split's slice of the NSp-long split axis)
  # Gp = 1 (G = 1, no padding) when dot_free, else >= 16 rows, of which
  # rows past G repeat row G - 1. bits (dot path, bf16 q): codes read as
  # 128 + c, the 128 moved into the zero points. one_row (dot path, G = 1):
  # the softmax state (m, l) has one row, the dots' 16 equal rows.
  split = pl.program_id(2)
  g, h = q_ref.shape
  h2 = h // 2
  s_len = kc_ref.shape[0]
  dt = q_ref.dtype
  lo_tok, hi_tok, first, last = flash_decoding.split_blocks(
      start_ref[0], end_ref[0], split, seq_len=seq_len, block_s=block_s,
      num_splits=num_splits)
  # Even and odd columns of q, loaded apart (the nibble order of the codes).
  qe = q_ref[_head_index(g, gp, h2, 0)]  # [Gp, H // 2]
  qo = q_ref[_head_index(g, gp, h2, 1)]
  qsum = qe.astype(jnp.float32).sum(axis=1) + qo.astype(jnp.float32).sum(
      axis=1)  # [Gp] Σ_h q_h
  if dot_free:
    # One query row: f32 products (exact for bf16/f16 q and the codes, as in
    # the dots) and row sums; no reshape or transpose, only reductions and
    # broadcasts, which the Triton lowering takes.
    code_dt = jnp.float32
    qe, qo = qe.astype(jnp.float32), qo.astype(jnp.float32)

    def qk(k_lo, k_hi):  # [block_s, H // 2] x2 -> [1, block_s]
      return (k_lo * qe + k_hi * qo).sum(axis=1)[None, :]

    def pv_times(pv, codes):  # [1, block_s] x [block_s, H // 2]
      col = pv.astype(jnp.float32).sum(axis=0)  # [block_s], sum of one row
      return (col[:, None] * codes).sum(axis=0)[None, :]
  else:
    code_dt = dt
    # HIGHEST: f32 operands (tests, CPU models) get IEEE dots, not TF32;
    # bf16 operands are unaffected.
    dot = functools.partial(jax.lax.dot_general,
                            precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
    nt = (((1,), (1,)), ((), ()))
    nn = (((1,), (0,)), ((), ()))

    def qk(k_lo, k_hi):  # -> [Gp, block_s]
      return dot(qe, k_lo, nt) + dot(qo, k_hi, nt)

    def pv_times(pv, codes):  # -> [Gp, H // 2]
      return dot(pv, codes, nn)

  if bits:
    nibbles = lambda c: _nibbles_bits(c, use_asm)
    offset = _BITS_OFFSET
  else:
    nibbles = lambda c: _nibbles(c, code_dt)
    offset = 0.0

  def body(i, carry):
    o_e, o_o, m_prev, l_prev = carry
    off = lo_tok + i * block_s  # first token of this block (< hi_tok)
    at = jnp.minimum(off, s_len - block_s)  # shifted back to end at S'
    pos = at + jnp.arange(block_s, dtype=jnp.int32)
    valid = (pos >= off) & (pos < hi_tok)  # [block_s]
    rows = pl.ds(at, block_s)
    dots = qk(*nibbles(kc_ref[rows, :]))  # [Gp, block_s]
    if one_row:  # [1, block_s]: the rows are equal, so the max is row 0
      dots = dots.max(axis=0, keepdims=True)
    k_zero = kz_ref[rows].astype(jnp.float32) + offset
    k_scale = ks_ref[rows].astype(jnp.float32) * sm_scale
    s = (dots - qs[:, None] * k_zero[None, :]) * k_scale[None, :]
    s = jnp.where(valid[None, :], s, -jnp.inf)  # [R, block_s]
    # Every block holds >= 1 valid token, so m_next is finite.
    m_next = jnp.maximum(m_prev, s.max(axis=1))
    corr = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, None])
    l_next = corr * l_prev + p.sum(axis=1)
    v_scale = jnp.where(valid, vs_ref[rows].astype(jnp.float32), 0.0)
    pv = (p * v_scale[None, :]).astype(dt)  # p' rounded to the dtype of q
    v_lo, v_hi = nibbles(vc_ref[rows, :])
    v_zero = vz_ref[rows].astype(jnp.float32) + offset
    zterm = (pv.astype(jnp.float32) * v_zero[None, :]).sum(axis=1)
    if one_row:
      pv = jnp.broadcast_to(pv, (gp, block_s))
    o_e = corr[:, None] * o_e - zterm[:, None] + pv_times(pv, v_lo)
    o_o = corr[:, None] * o_o - zterm[:, None] + pv_times(pv, v_hi)
    return o_e, o_o, m_next, l_next

  r = 1 if one_row else gp  # rows of the softmax state
  qs = qsum.max(keepdims=True) if one_row else qsum  # [R]
  init = (jnp.zeros((gp, h2), jnp.float32), jnp.zeros((gp, h2), jnp.float32),
          jnp.full((r,), -jnp.inf, jnp.float32),
          jnp.zeros((r,), jnp.float32))
  o_e, o_o, m, l = jax.lax.fori_loop(first, last, body, init)
  m, l = jnp.broadcast_to(m, (gp,)), jnp.broadcast_to(l, (gp,))
  if num_splits == 1:
    (o_ref,) = out_refs
    _store_heads(o_ref, *_normalize(o_e, o_o, l), g)
  else:
    oe_ref, oo_ref, m_ref, l_ref = out_refs
    oe_ref[...] = o_e
    oo_ref[...] = o_o
    m_ref[...] = m
    l_ref[...] = l


def _store_row(o_ref, o_e, o_o):
  """Writes one head's f32[H // 2] even / odd halves into o_ref [H],
  interleaved back to h = 2c, 2c + 1 (the merge's store)."""
  cols = 2 * jnp.arange(o_e.shape[0], dtype=jnp.int32)
  for c, o in ((cols, o_e), (cols + 1, o_o)):
    plgpu.store(o_ref.at[c], o.astype(o_ref.dtype))


def _check(q, k, v, start, end):
  """Shapes and dtypes; returns (B, N, K, S, H) and int32 start[B], end[B]
  or end[] (not clipped)."""
  if q.ndim != 3:
    raise ValueError(f"q must be [B, N, H], got {q.shape=}")
  b, n, h = q.shape
  if h % 2:
    raise ValueError(f"head dim {h=} must be even (two 4-bit codes a byte)")
  for name, c in (("k", k), ("v", v)):
    if c.codes.dtype != jnp.uint8:
      raise ValueError(f"{name}.codes must be uint8 (packed int4), got"
                       f" {c.codes.dtype}")
    if c.codes.ndim != 4 or c.codes.shape[0] != b or (
        c.codes.shape[3] * 2 != h):
      raise ValueError(f"{name}.codes must be [B, K, S, H // 2] with"
                       f" B={b}, H={h}; got {c.codes.shape}")
    if c.scale.shape != c.codes.shape[:3] or (
        c.zero.shape != c.codes.shape[:3]):
      raise ValueError(f"{name}.scale/zero must be [B, K, S]="
                       f"{c.codes.shape[:3]}, got {c.scale.shape=}"
                       f" {c.zero.shape=}")
  if v.codes.shape != k.codes.shape:
    raise ValueError(f"k and v differ: {k.codes.shape=} {v.codes.shape=}")
  _, kv_heads, s, _ = k.codes.shape
  start, end = flash_decoding.check_heads_and_range(b, n, kv_heads, start,
                                                    end)
  return (b, n, kv_heads, s, h), start, end


@functools.partial(jax.jit, static_argnames=(
    "config", "interpret", "debug", "implementation"))
def kv4_decode_attention(
    q: jax.Array, k: kv4_lib.KV4, v: kv4_lib.KV4, start: jax.Array,
    end: jax.Array, *, config: KV4DecodeAttentionConfig | None = None,
    interpret: bool = False, debug: bool = False,
    implementation: Literal["pallas", "xla"] | None = None) -> jax.Array:
  """Decode attention of one query token per row over packed KV4 caches.

  With num_splits = 1 the Pallas path is one kernel launch (the q and output
  reshapes are free); with more splits, two (attention, then the merge).

  Args:
    q: bf16[B, N, H] queries (f16/f32 also work; the dots take this dtype).
    k: `KV4` keys, codes uint8[B, K, S, H // 2], scale f32[B, K, S],
      zero uint8[B, K, S].
    v: `KV4` values, same shapes.
    start: int32[B], first valid slot of each row.
    end: int32[B] or int32[] (shared), one past the last valid slot.
    config: tiling; `default_kv4_decode_attention_config` when None.
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    debug: print the kernel's jaxpr.
    implementation: 'pallas' (the kernel where `kernel_takes` H, else the
      reference), 'xla' (the reference) or None (pallas on a GPU where
      `can_use_kv4_decode_attention`, or when interpret=True; else the
      reference; logged).

  Returns:
    [B, N, H] in the dtype of q; 0 for rows with start >= end.

  Raises:
    ValueError: shapes or dtypes that do not fit together (N not a multiple
      of K, H odd, k/v/start/end shapes).
  """
  (b, n, kv_heads, s, h), start, end = _check(q, k, v, start, end)
  if implementation is None:
    implementation = ("pallas" if interpret
                      or can_use_kv4_decode_attention(h) else "xla")
    logging.info("kv4_decode_attention: using %s", implementation)
  elif implementation == "pallas" and not (interpret or kernel_takes(h)):
    implementation = "xla"
    logging.info("kv4_decode_attention: the kernel does not take H=%d;"
                 " using the reference", h)
  if implementation == "xla":
    return kv4_decode_attention_reference(q, k, v, start, end)
  cfg = config or default_kv4_decode_attention_config(
      b, kv_heads, s, h, query_heads=n, dtype=q.dtype)
  g, h2 = n // kv_heads, h // 2
  dot_free = (uses_dot_free_path(n, kv_heads) if cfg.path == "auto"
              else cfg.path == "dot_free")
  if dot_free and g != 1:
    raise ValueError(f"path='dot_free' takes one query head per kv head,"
                     f" got G={g}")
  gp = 1 if dot_free else max(_MIN_DOT, _next_pow2(g))
  bits = cfg.nibbles == "bits" and not dot_free and q.dtype == jnp.bfloat16
  one_row = cfg.softmax_rows == "one" and not dot_free and g == 1
  block_s = min(cfg.block_s, max(_MIN_DOT, 1 << (s.bit_length() - 1)))
  if s < block_s:  # tiny caches only (S < 16): pad the slots
    pad = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, block_s - s)]
                            + [(0, 0)] * (a.ndim - 3))
    k, v = jax.tree.map(pad, k), jax.tree.map(pad, v)
  sp = k.codes.shape[2]
  ns = cfg.num_splits
  kernel = functools.partial(
      kv4_decode_attention_kernel, block_s=block_s, num_splits=ns,
      sm_scale=1.0 / math.sqrt(h), dot_free=dot_free, seq_len=s, gp=gp,
      bits=bits, use_asm=not interpret, one_row=one_row)
  per_head = lambda *blk: pl.BlockSpec((None, None) + blk,
                                       lambda i, j, t: (i, j) + (0,) * len(
                                           blk))
  per_row = pl.BlockSpec((1,), lambda i, j, t: (i,))
  shared = pl.BlockSpec((1,), lambda i, j, t: (0,))
  part = lambda *blk: pl.BlockSpec((None, None, None) + blk,
                                   lambda i, j, t: (i, j, t) + (0,) * len(
                                       blk))
  # Split axis NSp long (the merge's power-of-two block); splits >= NS are
  # never written.
  nsp = flash_decoding.padded_splits(ns)
  f32 = lambda *shape: jax.ShapeDtypeStruct((b, kv_heads, nsp) + shape,
                                            jnp.float32)
  out = jax.ShapeDtypeStruct((b, kv_heads, g, h), q.dtype)
  if ns == 1:
    out_specs, out_shape = per_head(g, h), out
  else:
    out_specs = [part(gp, h2), part(gp, h2), part(gp), part(gp)]
    out_shape = [f32(gp, h2), f32(gp, h2), f32(gp), f32(gp)]
  params = compat.triton_params(num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages)
  # [B, N, H] -> [B, K, G, H]; end [] -> [1], read by every row
  res = pl.pallas_call(
      kernel,
      grid=(b, kv_heads, ns),
      in_specs=[per_head(g, h), per_row, per_row if end.ndim else shared,
                per_head(sp, h2), per_head(sp), per_head(sp),
                per_head(sp, h2), per_head(sp), per_head(sp)],
      out_specs=out_specs, out_shape=out_shape, compiler_params=params,
      interpret=interpret, debug=debug, name="kv4_decode_attention",
  )(q.reshape(b, kv_heads, g, h), start, end.reshape(-1), k.codes, k.scale,
    k.zero, v.codes, v.scale, v.zero)
  if ns > 1:
    # Merge the splits: [B, K, NSp, Gp, H // 2] x2 -> [B, K, G, H]
    o_e, o_o, m, l = res
    res = flash_decoding.merge(
        (o_e, o_o), m, l, num_splits=ns, out_shape=out, store=_store_row,
        compiler_params=params, interpret=interpret, debug=debug,
        name="kv4_decode_attention_merge")
  # [B, K, G, H] -> [B, N, H]
  return res.reshape(b, n, h)


@jax.jit
def kv4_decode_attention_reference(q: jax.Array, k: kv4_lib.KV4,
                                   v: kv4_lib.KV4, start: jax.Array,
                                   end: jax.Array) -> jax.Array:
  """Plain-jnp `kv4_decode_attention`: f32 softmax over `dequantize_kv4`.

  Args:
    q: [B, N, H] queries.
    k: `KV4` keys, codes [B, K, S, H // 2].
    v: `KV4` values.
    start: int32[B] first valid slot.
    end: int32[B] or int32[] one past the last valid slot.

  Returns:
    [B, N, H] in the dtype of q; 0 for rows with start >= end.

  Raises:
    ValueError: shapes that do not fit together.
  """
  (b, n, kv_heads, s, h), start, end = _check(q, k, v, start, end)
  end = jnp.broadcast_to(end, (b,))
  hi = jax.lax.Precision.HIGHEST
  keys = kv4_lib.dequantize_kv4(k)  # f32[B, K, S, H]
  values = kv4_lib.dequantize_kv4(v)
  # [B, N, H] -> [B, K, G, H]
  qg = q.astype(jnp.float32).reshape(b, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("BKGH,BKSH->BKGS", qg, keys, precision=hi,
                      preferred_element_type=jnp.float32) / math.sqrt(h)
  slots = jnp.arange(s, dtype=jnp.int32)
  mask = (slots >= start[:, None]) & (slots < end[:, None])  # [B, S]
  mask = mask[:, None, None, :]
  scores = jnp.where(mask, scores, -jnp.inf)
  m = scores.max(axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)),
                0.0)
  l = p.sum(axis=-1, keepdims=True)
  out = jnp.einsum("BKGS,BKSH->BKGH", p, values, precision=hi,
                   preferred_element_type=jnp.float32)
  out = jnp.where(l > 0, out / jnp.where(l > 0, l, 1.0), 0.0)
  return out.reshape(b, n, h).astype(q.dtype)


@jax.jit
def bf16_decode_attention(q: jax.Array, k_cache: jax.Array,
                          v_cache: jax.Array, start: jax.Array,
                          end: jax.Array) -> jax.Array:
  """The XLA baseline: decode attention over a float cache (model layout).

  Computes like `model.attend` with T = 1: dots in the cache dtype with f32
  accumulation, f32 softmax.

  Args:
    q: bf16[B, N, H] queries.
    k_cache: bf16[B, S, K, H] keys.
    v_cache: bf16[B, S, K, H] values.
    start: int32[B] first valid slot.
    end: int32[B] or int32[] one past the last valid slot.

  Returns:
    [B, N, H] in the dtype of q (rows with start >= end average every
    slot, as `model.attend` does).
  """
  b, n, h = q.shape
  s, kv_heads = k_cache.shape[1:3]
  # [B, N, H] -> [B, K, G, H]
  qg = q.reshape(b, kv_heads, n // kv_heads, h).astype(k_cache.dtype)
  scores = jnp.einsum("BKGH,BSKH->BKGS", qg, k_cache,
                      preferred_element_type=jnp.float32) / math.sqrt(h)
  slots = jnp.arange(s, dtype=jnp.int32)
  end = jnp.broadcast_to(end, (b,))
  mask = (slots >= start[:, None]) & (slots < end[:, None])  # [B, S]
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
  out = jnp.einsum("BKGS,BSKH->BKGH", probs, v_cache,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, n, h).astype(q.dtype)
