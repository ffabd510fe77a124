"""A preallocated, static-shape KV cache for the functional model.

Slots are shared by the whole batch: every row writes its new tokens at the
same slot `end`. Prompts of different lengths are left-padded, and row `b`
ignores the pad slots before `start[b]`. RoPE positions are `slot - start`,
so a padded row sees the same positions as an unpadded one.

Keys and values are either float arrays [L, B, S, K, H] or, for QuaRot's
real KV4 path, packed `pallas_kernels.kv4_cache.KV4` pytrees stacked over
layers (codes uint8[L, B, K, S, H // 2], scale/zero [L, B, K, S]). For
decoding (`per_layer=True`, with `run_layout.unstack_layers` params) they are
tuples of L per-layer arrays instead, so that each layer's cache is updated
and read in place, never sliced out of a stack.
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
      packed `KV4`; or a tuple of L such per-layer arrays ([B, S, K, H] or
      `KV4`).
    v: values, like `k`.
    start: int32[B], first valid slot of each row (left padding before it).
    end: int32[], number of slots written so far (same for every row).
  """

  k: jax.Array
  v: jax.Array
  start: jax.Array
  end: jax.Array

  @property
  def per_layer(self) -> bool:
    """Whether `k` and `v` are tuples of per-layer arrays."""
    return isinstance(self.k, (list, tuple))

  @property
  def _first(self):
    return self.k[0] if self.per_layer else self.k

  @property
  def max_len(self) -> int:
    """S, the number of slots."""
    first = self._first
    if isinstance(first, kv4_lib.KV4):
      return first.codes.shape[-2]
    return first.shape[-3]

  @property
  def packed(self) -> bool:
    """Whether keys and values are packed 4-bit."""
    return isinstance(self._first, kv4_lib.KV4)


def _over_layers(one, num_layers: int, per_layer: bool):
  """Zeros like `one` (an array or `KV4`) for every layer: stacked on a
  leading L axis, or a tuple of L separate buffers."""
  zeros = lambda a: jnp.zeros(a.shape, a.dtype)
  if per_layer:
    return tuple(jax.tree.map(zeros, one) for _ in range(num_layers))
  return jax.tree.map(lambda a: jnp.zeros((num_layers,) + a.shape, a.dtype),
                      one)


def init_cache(*, num_layers: int, batch: int, max_len: int, kv_heads: int,
               head_dim: int, dtype=jnp.float32,
               start: jax.Array | None = None,
               per_layer: bool = False) -> KVCache:
  """An empty cache.

  Args:
    num_layers: L.
    batch: B.
    max_len: S, slots to allocate (prompt plus generated tokens).
    kv_heads: K.
    head_dim: H.
    dtype: storage dtype of keys and values.
    start: int32[B] left-padding per row, zeros if None.
    per_layer: a tuple of L per-layer buffers (for `run_layout.unstack_layers`
      params) instead of one stacked [L, ...] array.

  Returns:
    A `KVCache` with `end == 0`.
  """
  if max_len <= 0:
    raise ValueError(f"{max_len=} must be positive")
  one = jax.ShapeDtypeStruct((batch, max_len, kv_heads, head_dim), dtype)
  if start is None:
    start = jnp.zeros((batch,), jnp.int32)
  return KVCache(k=_over_layers(one, num_layers, per_layer),
                 v=_over_layers(one, num_layers, per_layer),
                 start=jnp.asarray(start, jnp.int32),
                 end=jnp.zeros((), jnp.int32))


def init_kv4_cache(*, num_layers: int, batch: int, max_len: int,
                   kv_heads: int, head_dim: int,
                   start: jax.Array | None = None,
                   per_layer: bool = False) -> KVCache:
  """An empty cache of packed 4-bit keys and values (see `kv4_cache`);
  arguments as for `init_cache`."""
  if max_len <= 0:
    raise ValueError(f"{max_len=} must be positive")
  one = jax.eval_shape(
      lambda: kv4_lib.empty_kv4(batch, kv_heads, max_len, head_dim))
  if start is None:
    start = jnp.zeros((batch,), jnp.int32)
  return KVCache(k=_over_layers(one, num_layers, per_layer),
                 v=_over_layers(one, num_layers, per_layer),
                 start=jnp.asarray(start, jnp.int32),
                 end=jnp.zeros((), jnp.int32))


def cache_for(config, batch: int, max_len: int, *, dtype=jnp.float32,
              start: jax.Array | None = None,
              packed: bool = False, per_layer: bool = False) -> KVCache:
  """`init_cache` (or `init_kv4_cache` if `packed`) sized for a config."""
  if packed:
    return init_kv4_cache(num_layers=config.num_hidden_layers, batch=batch,
                          max_len=max_len,
                          kv_heads=config.num_key_value_heads,
                          head_dim=config.head_dim, start=start,
                          per_layer=per_layer)
  return init_cache(num_layers=config.num_hidden_layers, batch=batch,
                    max_len=max_len, kv_heads=config.num_key_value_heads,
                    head_dim=config.head_dim, dtype=dtype, start=start,
                    per_layer=per_layer)
