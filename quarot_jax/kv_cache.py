"""A preallocated, static-shape KV cache for the functional model.

Slots are shared by the whole batch: every row writes its new tokens at the
same slot `end`. Prompts of different lengths are left-padded, and row `b`
ignores the pad slots before `start[b]`. RoPE positions are `slot - start`,
so a padded row sees the same positions as an unpadded one.

Keys and values are either float arrays [L, B, S, K, H] or, for QuaRot's
real KV4 path, packed `pallas_kernels.kv4_cache.KV4` pytrees stacked over
layers (codes uint8[L, B, K, S, H // 2], scale/zero f16[L, B, K, S]).
"""

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import kv4_cache as kv4_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer.

  Attributes:
    k: [L, B, S, K, H] keys (after RoPE and any rotation), or a stacked
      packed `KV4`.
    v: [L, B, S, K, H] values, or a stacked packed `KV4`.
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
    if isinstance(self.k, kv4_lib.KV4):
      return self.k.codes.shape[-2]
    return self.k.shape[2]

  @property
  def packed(self) -> bool:
    """Whether keys and values are packed 4-bit."""
    return isinstance(self.k, kv4_lib.KV4)


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


def init_kv4_cache(*, num_layers: int, batch: int, max_len: int,
                   kv_heads: int, head_dim: int,
                   start: jax.Array | None = None) -> KVCache:
  """An empty cache of packed 4-bit keys and values (see `kv4_cache`)."""
  if max_len <= 0:
    raise ValueError(f"{max_len=} must be positive")
  one = kv4_lib.empty_kv4(batch, kv_heads, max_len, head_dim)
  stacked = jax.tree.map(
      lambda a: jnp.zeros((num_layers,) + a.shape, a.dtype), one)
  if start is None:
    start = jnp.zeros((batch,), jnp.int32)
  return KVCache(k=stacked, v=stacked, start=jnp.asarray(start, jnp.int32),
                 end=jnp.zeros((), jnp.int32))


def cache_for(config, batch: int, max_len: int, *, dtype=jnp.float32,
              start: jax.Array | None = None,
              packed: bool = False) -> KVCache:
  """`init_cache` (or `init_kv4_cache` if `packed`) sized for a config."""
  if packed:
    return init_kv4_cache(num_layers=config.num_hidden_layers, batch=batch,
                          max_len=max_len,
                          kv_heads=config.num_key_value_heads,
                          head_dim=config.head_dim, start=start)
  return init_cache(num_layers=config.num_hidden_layers, batch=batch,
                    max_len=max_len, kv_heads=config.num_key_value_heads,
                    head_dim=config.head_dim, dtype=dtype, start=start)
