"""THE packed int4 layout of the project, written and read by every kernel.

Two 4-bit values per uint8 byte along the LAST axis. Byte j holds element 2j
in its LOW nibble (bits 0-3) and element 2j+1 in its HIGH nibble (bits 4-7):

  byte[..., j] = (v[..., 2j] & 0xF) | (v[..., 2j+1] & 0xF) << 4

Signed values (symmetric codes: weights, activations) are two's-complement
nibbles in [-8, 7], so [1, -2] packs to 0xE1; unsigned values (asymmetric
codes: the KV4 cache) are codes in [0, 15] (nibble = code). int[..., K]
packs to uint8[..., K // 2]; K must be even. Packed weights are
uint8[N, K // 2] (K-major, as Hopper's 8-bit wgmma wants both operands).

Because x and w are packed alike along K, a dot product splits into the dot
of the low nibbles plus the dot of the high nibbles, with no re-interleave:
  Σ_k x_k w_k = Σ_j x_lo[j] w_lo[j] + Σ_j x_hi[j] w_hi[j].
XLA's `bitcast_convert_type(uint8[..., J], int4)` splits each byte low
nibble first, so it gives the same element order (`w4a4_matmul.mosaic_gpu`).
"""

import functools

import jax
import jax.numpy as jnp


@jax.jit
def pack_int4(values: jax.Array) -> jax.Array:
  """Packs 4-bit codes two per byte (layout in the module docstring).

  Args:
    values: int[..., K], signed in [-8, 7] or unsigned in [0, 15].

  Returns:
    uint8[..., K // 2]; byte j = low nibble element 2j, high nibble 2j+1.

  Raises:
    ValueError: K is odd.
  """
  k = values.shape[-1]
  if k % 2:
    raise ValueError(f"the last axis K={k} must be even to pack int4")
  v = values.astype(jnp.int32) & 0xF
  # [..., K // 2, 2]
  v = v.reshape(*values.shape[:-1], k // 2, 2)
  return (v[..., 0] | (v[..., 1] << 4)).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames="signed")
def unpack_int4(packed: jax.Array, *, signed: bool) -> jax.Array:
  """Inverse of `pack_int4`.

  Args:
    packed: uint8[..., K // 2].
    signed: read nibbles as two's complement [-8, 7] (else [0, 15]).

  Returns:
    int8[..., K].
  """
  p = packed.astype(jnp.int32)
  if signed:  # shifts sign-extend; a select here compiles ~10x slower on CPU
    lo, hi = (p << 28) >> 28, (p << 24) >> 28
  else:
    lo, hi = p & 0xF, (p >> 4) & 0xF
  # [..., K // 2, 2] -> [..., K]
  v = jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1],
                                            packed.shape[-1] * 2)
  return v.astype(jnp.int8)


def signed_nibbles(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """In-kernel split of packed bytes into (low, high) signed nibbles.

  Args:
    packed: int8[...] packed bytes (the uint8 layout reinterpreted as int8
      by `bitcast_convert_type`, so that the arithmetic shifts sign-extend).

  Returns:
    (low, high): int8[...] each, in [-8, 7]; low holds the even elements.
  """
  low = jnp.right_shift(jnp.left_shift(packed, 4), 4)
  high = jnp.right_shift(packed, 4)
  return low, high
