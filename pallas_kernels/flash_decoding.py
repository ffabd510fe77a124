"""What the two flash-decoding kernels share: the valid range of a row, its
split into runs of whole blocks, how many splits, the argument checks, and
the merge of the splits.

`decode_attention` (float cache) and `kv4_decode_attention` (packed KV4
cache) both run a grid (B, K, num_splits): program (b, k, split) attends
over one contiguous run of blocks of row b's valid slots [start, end) and,
with several splits, writes an unnormalized partial o f32[B, K, NSp, Gp, X]
(X = H, or the KV4 kernel's two halves of H / 2) with its running max and
sum m, l f32[B, K, NSp, Gp]. NSp is num_splits rounded up to a power of
two, so that the merge's block over splits is a Triton tensor; splits past
num_splits are never written.

`merge` runs a grid (B, K, G): one program a real query row (the Gp - G
padding rows of the dot path are never read), which loads all NSp splits of
its row at once (the unwritten ones masked) and reduces over them with
vector ops. Why: the former merge ran B * K programs that each looped over
the splits on all Gp padded rows; H200, LLaMA-3-8B heads (K = 8, G = 4,
H = 128), B = 1, 1024 slots, 8 splits: 6.3 us a layer, over a third of the
attention. The row-parallel merge: 1.8 us a layer (H200, same model step,
2026-12-01).
"""

from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def default_num_splits(batch: int, kv_heads: int, max_len: int,
                       num_sms: int = 132) -> int:
  """~2 programs per SM, at least 128 slots a split, at most 64 splits.

  H200, LLaMA-2-7B heads at B = 1, 1088 slots: 8 splits took 10.5 us
  against 18.7 at the 2 an older floor of 512 slots a split allowed
  (`kv4_decode_attention`, 2026-12-01).
  """
  want = -(-2 * num_sms // max(batch * kv_heads, 1))
  return max(1, min(want, max(max_len // 128, 1), 64))


def split_blocks(start: jax.Array, end: jax.Array, split: jax.Array, *,
                 seq_len: int, block_s: int, num_splits: int):
  """Inside a kernel: this split's slots and blocks of one row.

  Args:
    start, end: int32[] the row's valid range (clamped to [0, seq_len]).
    split: the program's split index.
    seq_len: S.
    block_s: slots a block.
    num_splits: splits a row.

  Returns:
    (lo, hi, first, last): the clamped range [lo, hi) and the blocks
    [first, last) of this split (block i covers slots from lo + i block_s).
  """
  lo = jnp.clip(start, 0, seq_len)
  hi = jnp.clip(end, 0, seq_len)
  n_blocks = jnp.maximum(pl.cdiv(hi - lo, block_s), 0)
  per_split = pl.cdiv(n_blocks, num_splits)
  first = split * per_split
  return lo, hi, first, jnp.minimum(first + per_split, n_blocks)


def check_heads_and_range(b: int, n: int, kv_heads: int, start, end
                          ) -> tuple[jax.Array, jax.Array]:
  """N a multiple of K, start [B], end [] or [B]; returns them as int32.

  Raises:
    ValueError: naming the bad value.
  """
  if n % kv_heads:
    raise ValueError(f"query heads {n=} must be a multiple of kv heads"
                     f" {kv_heads=}")
  start, end = jnp.asarray(start), jnp.asarray(end)
  if start.shape != (b,):
    raise ValueError(f"start must be [B]=[{b}], got {start.shape=}")
  if end.shape not in ((), (b,)):
    raise ValueError(f"end must be [] or [B]=[{b}], got {end.shape=}")
  return start.astype(jnp.int32), end.astype(jnp.int32)


def padded_splits(num_splits: int) -> int:
  """NSp: num_splits rounded up to a power of two.

  The partials' split axis is allocated NSp long so that the merge's block
  over it is a power of two (Triton tensors must be); the attention grid
  writes splits < num_splits only, and the merge masks the rest.
  """
  return 1 << max(num_splits - 1, 0).bit_length()


def merge_row(o_refs, m_ref, l_ref, *, num_splits: int) -> list[jax.Array]:
  """Inside a merge kernel: one query row's splits, combined (log-sum-exp)
  and normalized with vector ops over the split axis.

  Args:
    o_refs: refs f32[NSp, X], the row's unnormalized partial outputs (one,
      or the KV4 kernel's even and odd halves).
    m_ref, l_ref: f32[NSp] the splits' running max and sum.
    num_splits: NS; splits NS..NSp were never written and are loaded
      masked (m = -inf, l = 0, o = 0), never read.

  Returns:
    f32[X] per o_ref: Σ_t w_t o_t / Σ_t w_t l_t with w_t =
    exp(m_t - max_t m_t) (0 for an empty split, l_t = 0), 0 where every
    split is empty.
  """
  nsp = m_ref.shape[0]
  real = jnp.arange(nsp, dtype=jnp.int32) < num_splits  # [NSp]

  def load(ref, other):  # f32[NSp] or f32[NSp, X]
    if nsp == num_splits:
      return ref[...]
    mask = real if ref.ndim == 1 else jnp.broadcast_to(real[:, None],
                                                       ref.shape)
    return plgpu.load(ref.at[...], mask=mask, other=other)

  m = load(m_ref, -jnp.inf)
  l = load(l_ref, 0.0)
  m_all = m.max()
  m_all = jnp.where(m_all > -jnp.inf, m_all, 0.0)  # all splits empty
  w = jnp.where(l > 0, jnp.exp(m - m_all), 0.0)  # [NSp]
  l_sum = (w * l).sum()
  inv = jnp.where(l_sum > 0, 1.0 / jnp.where(l_sum > 0, l_sum, 1.0), 0.0)
  return [(w[:, None] * load(r, 0.0)).sum(axis=0) * inv for r in o_refs]


def _store(o_ref, o):
  o_ref[...] = o.astype(o_ref.dtype)


def merge(parts, m: jax.Array, l: jax.Array, *, num_splits: int,
          out_shape: jax.ShapeDtypeStruct,
          store: Callable[..., None] = _store, compiler_params=None,
          interpret: bool = False, debug: bool = False,
          name: str = "flash_decoding_merge") -> jax.Array:
  """The merge launch: grid (B, K, G), one program a real query row.

  Each program loads the NSp splits of its row at once and reduces over
  them (`merge_row`); the padding rows Gp > G of the dot path are never
  read.

  Args:
    parts: f32[B, K, NSp, Gp, X] arrays, the unnormalized partial outputs.
    m, l: f32[B, K, NSp, Gp] the splits' running max and sum.
    num_splits: NS, the splits written (< NSp = `padded_splits(NS)`).
    out_shape: [B, K, G, H] and the dtype of the output.
    store: store(o_ref, *outs) writes the f32[X] results (one per part)
      into the row's o_ref [H] (default: the one part, cast).
    compiler_params: Pallas compiler params.
    interpret: interpret mode (CPU).
    debug: print the kernel's jaxpr.
    name: the kernel's name.

  Returns:
    The merged output, `out_shape`.
  """
  b, kv_heads, g, h = out_shape.shape
  nsp = m.shape[2]

  def kernel(*refs):
    *o_refs, m_ref, l_ref, out_ref = refs
    store(out_ref, *merge_row(o_refs, m_ref, l_ref, num_splits=num_splits))

  # [NSp, X] of row (i, j, r); Gp squeezed at the row's index.
  part = lambda x: pl.BlockSpec((None, None, nsp, None, x),
                                lambda i, j, r: (i, j, 0, r, 0))
  stat = pl.BlockSpec((None, None, nsp, None), lambda i, j, r: (i, j, 0, r))
  return pl.pallas_call(
      kernel, grid=(b, kv_heads, g),
      in_specs=[part(p.shape[-1]) for p in parts] + [stat, stat],
      out_specs=pl.BlockSpec((None, None, None, h),
                             lambda i, j, r: (i, j, r, 0)),
      out_shape=out_shape, compiler_params=compiler_params,
      interpret=interpret, debug=debug, name=name)(*parts, m, l)
