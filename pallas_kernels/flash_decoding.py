"""What the two flash-decoding kernels share: the valid range of a row, its
split into runs of whole blocks, how many splits, and the argument checks.

`decode_attention` (float cache) and `kv4_decode_attention` (packed KV4
cache) both run a grid (B, K, num_splits): program (b, k, split) attends
over one contiguous run of blocks of row b's valid slots [start, end).
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


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


def merge_splits(o_refs, m_ref, l_ref) -> list[jax.Array]:
  """Inside a merge kernel: the splits' partials of one (row, kv head),
  combined (log-sum-exp) and normalized, one split at a time.

  Args:
    o_refs: refs f32[NS, Gp, X], unnormalized partial outputs (one, or the
      KV4 kernel's even and odd halves).
    m_ref, l_ref: f32[NS, Gp] the splits' running max and sum.

  Returns:
    f32[Gp, X] per o_ref: Σ_t w_t o_t / Σ_t w_t l_t with w_t =
    exp(m_t - max_t m_t) (0 for an empty split), 0 where every split is
    empty.
  """
  ns, gp = m_ref.shape
  m_all = jax.lax.fori_loop(
      0, ns, lambda t, m: jnp.maximum(m, m_ref[t, :]),
      jnp.full((gp,), -jnp.inf, jnp.float32))
  m_all = jnp.where(m_all > -jnp.inf, m_all, 0.0)  # all splits empty

  def add(t, carry):
    *os_, l = carry
    l_t = l_ref[t, :]
    w = jnp.where(l_t > 0, jnp.exp(m_ref[t, :] - m_all), 0.0)  # [Gp]
    return (*(o + w[:, None] * r[t, :, :] for o, r in zip(os_, o_refs)),
            l + w * l_t)

  init = (*(jnp.zeros(r.shape[1:], jnp.float32) for r in o_refs),
          jnp.zeros((gp,), jnp.float32))
  *outs, l_sum = jax.lax.fori_loop(0, ns, add, init)
  inv = jnp.where(l_sum > 0, 1.0 / jnp.where(l_sum > 0, l_sum, 1.0), 0.0)
  return [o * inv[:, None] for o in outs]
