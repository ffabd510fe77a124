"""Flash attention for prefill through `jax.nn.dot_product_attention`.

Shape letters as in `model.py`: B batch, T query positions, S key/value
slots, N query heads, K kv heads (N a multiple of K: GQA), H head dim.

The model's attention mask (`model.forward`): query t of row b sits at cache
slot `end + t` and sees the slots `start[b] <= s <= end + t` (left padding
before `start[b]`, causal after; without a cache, start = end = 0 and S = T).
`model.attend` computes it as an XLA einsum softmax over the whole [T, S]
score matrix; `flash_attention` computes it with cuDNN's fused (flash)
attention, which never writes that matrix and skips the masked-out tiles.

What cuDNN's attention (jax's `implementation='cudnn'`) accepts:
  * `is_causal`: top-left causal, query i sees keys j <= i; tiles above the
    diagonal are skipped.
  * `query_seq_lengths` / `key_value_seq_lengths`: per-row *right* padding
    (PADDING_CAUSAL with is_causal); work past the lengths is skipped.
  * `local_window_size`: a left sliding window shared by every row.
  * `bias` / `mask`: a dense [B | 1, N | 1, T, S] array (a bool mask becomes
    a bias in the query dtype), read by every head of every tile.
  * bf16 / f16 (and fp8) only, H a multiple of 8 and <= 128 (<= 256 on
    Hopper), N a multiple of K.
Left padding is none of the first three, and the dense mask costs a
[B, T, S] bias read per head. So `flash_attention` moves each row's valid
slots to the front, slot `start[b] + i` to index i (a gather of q, k and v
along the sequence), where the model's mask is *exactly* top-left causal
with right padding of length `end + T - start[b]`, runs PADDING_CAUSAL, and
gathers the T outputs back. A query at a pad slot (end + t < start[b]) sees
no key; it gets 0 (`model.attend` gives it the mean of all values; both are
finite and never read by a valid token).

Measured (H200, jax 0.11.2, 2048 tokens, 32 x 128 heads, bf16, B = 1 / 4 /
16; `experiments/bench_attention.py`, results/prefill_attention.jsonl):
plain causal cuDNN 0.120 / 0.319 / 1.106 ms, the shifted formulation with
lengths 0.170 / 0.463 / 1.645, a dense bool mask plus is_causal 0.195 /
0.564 / 2.010, XLA einsum (`model.attend`) 0.770 / 2.961 / 11.48. So the
model runs plain causal whenever no row is padded (see `model.py`).

Not supported here: f32 inputs and other head dims on cuDNN (see
`can_use_cudnn`; the model then falls back to `model.attend`), and
non-causal masks.
"""

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["cudnn", "xla"]


def can_use_cudnn(q: jax.Array, k: jax.Array) -> bool:
  """Whether cuDNN's fused attention takes these queries and keys.

  Args:
    q: [B, T, N, H] queries (only shape and dtype are read).
    k: [B, S, K, H] keys.

  Returns:
    True for bf16/f16 q and k of one dtype, H a multiple of 8 and <= 128,
    and N a multiple of K.
  """
  h = q.shape[-1]
  return (q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype
          and h % 8 == 0 and h <= 128 and q.shape[2] % k.shape[2] == 0)


def _rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[b, index[b, i]] for x [B, S, ...] and int32 index [B, I] in range."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1, mode="clip")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    start: jax.Array | None = None,
                    end: jax.Array | int | None = None,
                    implementation: Implementation = "cudnn") -> jax.Array:
  """Causal grouped-query attention over slots start[b]..end + t.

  With `start` and `end` both None, this is plain causal self-attention
  (T == S, query t sees keys 0..t) and goes to cuDNN as is. Otherwise each
  row is shifted so that slot `start[b]` is index 0 (see the module
  docstring) and cuDNN runs causal attention with per-row lengths.

  Args:
    q: [B, T, N, H] queries; query t of row b sits at slot end + t.
    k: [B, S, K, H] keys of slots 0..S-1 (slots past end + T - 1 are never
      read, so a preallocated cache can be passed whole).
    v: [B, S, K, H] values.
    start: int32[B] first valid slot of each row (left padding), or None
      (0).
    end: int32[] slot of the first query (the cache's `end` before this
      step), or None (0). end + T must be <= S.
    implementation: 'cudnn' (GPU flash attention) or 'xla' (jax's einsum
      formulation of the same call: how CPU tests check this plumbing).

  Returns:
    [B, T, N, H] in the dtype of `q`: softmax(q k^T / sqrt(H)) v over the
    visible slots; 0 for a query that sees none (a pad token).

  Raises:
    ValueError: shapes that do not fit (B, H, N % K, T > S, or T != S with
      neither start nor end).
  """
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  if (k.shape[0], k.shape[3]) != (b, h) or v.shape != k.shape:
    raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} must be"
                     " [B, T, N, H], [B, S, K, H], [B, S, K, H]")
  if n % kv_heads:
    raise ValueError(f"query heads {n=} must be a multiple of kv heads"
                     f" {kv_heads=}")
  if t > s:
    raise ValueError(f"{t=} queries do not fit {s=} key slots")
  if start is None and end is None:
    if t != s:
      raise ValueError(f"plain causal attention needs T == S, got {t=}"
                       f" {s=}; pass start/end for a cache")
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=implementation)
  if start is None:
    start = jnp.zeros((b,), jnp.int32)
  start = jnp.asarray(start, jnp.int32)
  end = jnp.asarray(0 if end is None else end, jnp.int32)
  # Index i of row b holds slot start[b] + i; the last query's slot is
  # end + T - 1, so a row has end + T - start[b] valid slots (at least 1
  # here, so that cuDNN never sees an empty row; such a row is all padding
  # and its outputs are zeroed below).
  length = jnp.clip(end + t - start, 1, s).astype(jnp.int32)  # [B]
  slot = start[:, None] + jnp.arange(s, dtype=jnp.int32)  # [B, S]
  keys = _rows(k, slot)
  values = _rows(v, slot)
  # Index i < end - start[b] holds a slot before this step's queries: its
  # (clipped) query row is computed and thrown away.
  queries = _rows(q, jnp.clip(slot - end, 0, t - 1))  # [B, S, N, H]
  out = jax.nn.dot_product_attention(
      queries, keys, values, is_causal=True, query_seq_lengths=length,
      key_value_seq_lengths=length, implementation=implementation)
  index = end + jnp.arange(t, dtype=jnp.int32) - start[:, None]  # [B, T]
  out = _rows(out, jnp.clip(index, 0, s - 1))  # [B, T, N, H]
  return jnp.where((index >= 0)[:, :, None, None], out,
                   jnp.zeros((), out.dtype)).astype(q.dtype)
