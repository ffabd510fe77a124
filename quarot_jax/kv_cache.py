"""A preallocated, static-shape KV cache for the functional model.

Slots are shared by the whole batch: every row writes its new tokens at the
same slot `end`. Prompts of different lengths are left-padded, and row `b`
ignores the pad slots before `start[b]`. RoPE positions are `slot - start`,
so a padded row sees the same positions as an unpadded one.
"""

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer.

  Attributes:
    k: [L, B, S, K, H] keys (after RoPE and any rotation).
    v: [L, B, S, K, H] values.
    start: int32[B], first valid slot of each row (left padding before it).
    end: int32[], number of slots written so far (same for every row).
  """

  k: jax.Array
  v: jax.Array
  start: jax.Array
  end: jax.Array

  @property
  def max_len(self) -> int:
    """S, the number of slots."""
    return self.k.shape[2]


def init_cache(*, num_layers: int, batch: int, max_len: int, kv_heads: int,
               head_dim: int, dtype=jnp.float32,
               start: jax.Array | None = None) -> KVCache:
  """An empty cache.

  Args:
    num_layers: L.
    batch: B.
    max_len: S, slots to allocate (prompt plus generated tokens).
    kv_heads: K.
    head_dim: H.
    dtype: storage dtype of keys and values.
    start: int32[B] left-padding per row, zeros if None.

  Returns:
    A `KVCache` with `end == 0`.
  """
  if max_len <= 0:
    raise ValueError(f"{max_len=} must be positive")
  shape = (num_layers, batch, max_len, kv_heads, head_dim)
  if start is None:
    start = jnp.zeros((batch,), jnp.int32)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 start=jnp.asarray(start, jnp.int32),
                 end=jnp.zeros((), jnp.int32))


def cache_for(config, batch: int, max_len: int, *, dtype=jnp.float32,
              start: jax.Array | None = None) -> KVCache:
  """`init_cache` with the sizes of a `LlamaConfig`."""
  return init_cache(num_layers=config.num_hidden_layers, batch=batch,
                    max_len=max_len, kv_heads=config.num_key_value_heads,
                    head_dim=config.head_dim, dtype=dtype, start=start)
