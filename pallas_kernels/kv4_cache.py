"""QuaRot's packed 4-bit KV cache: layout, quantize, dequantize, write.

Shape letters as in `quarot_jax/model.py`: B batch, T new tokens, S slots,
K kv heads, H head dim.

Quantizer (QuaRot's KV quantizer, `quarot_jax.quant.kv_spec(4,
clip_ratio=0.95)`, the same arithmetic step for step): asymmetric 4 bits,
one group per (token, head) over the whole head dim H,
  scale = clip * (max - min) / 15,  zero = round(-clip * min / scale),
  code = clip(round(x / scale) + zero, 0, 15),  x ≈ (code - zero) * scale
(min/max include 0; a group of zeros gets scale 1). Scale is stored in f32
and zero (an integer in 0..15) in uint8, so `dequantize_kv4` equals
`quant.dequantize` of the same codes exactly and the packed cache computes
what simulated KV quantization computes. (An f16 scale would save a byte but
moves every dequantized value by up to 2^-11 relative, which a 4-bit model
amplifies: measured in BENCHMARKS.md.)

Layout of one layer, head-major so that a kernel reads contiguous tokens of
one head:
  codes uint8[B, K, S, H // 2]  the int4 packing of `int4_layout.py`
                                (byte j: low nibble = element 2j, high
                                nibble = element 2j + 1; unsigned codes)
  scale f32[B, K, S]
  zero  uint8[B, K, S]
One token-head takes H / 2 + 5 bytes against 2 H in bf16: `memory_ratio` is
0.289 for H = 64 and 0.270 for H = 128 (<= 0.3 for both).

Not supported: groups smaller than the head dim (NotImplementedError), bits
other than 4, symmetric codes.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import int4_layout

_MAXQ = 15  # largest 4-bit unsigned code


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class KV4:
  """Packed 4-bit keys or values of one layer: x ≈ (code - zero) * scale.

  Attributes:
    codes: uint8[B, K, S, H // 2] packed codes in 0..15 (packing of
      `int4_layout.py`: low nibble = even h).
    scale: f32[B, K, S] per (token, head) scale.
    zero: uint8[B, K, S] per (token, head) integer zero point in 0..15.
  """

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array

  @property
  def nbytes(self) -> int:
    """Bytes of codes, scales and zeros together."""
    return sum(a.size * jnp.dtype(a.dtype).itemsize
               for a in (self.codes, self.scale, self.zero))


def _check_x(x: jax.Array, group_size: int | None) -> None:
  if x.ndim != 4:
    raise ValueError(f"keys/values must be [B, T, K, H], got {x.shape=}")
  h = x.shape[-1]
  if h % 2:
    raise ValueError(f"head dim {h=} must be even (two 4-bit codes a byte)")
  if group_size not in (None, h):
    raise NotImplementedError(
        f"KV4 stores one group per head: {group_size=} must be None or the"
        f" head dim {h}")


@functools.partial(jax.jit, static_argnames=("clip_ratio", "group_size"))
def quantize_kv4(x: jax.Array, *, clip_ratio: float = 0.95,
                 group_size: int | None = None) -> KV4:
  """Quantizes keys or values per (token, head) and packs them.

  Args:
    x: float[B, T, K, H] keys or values (the model's layout).
    clip_ratio: range clip of the quantizer (QuaRot: 0.95).
    group_size: None or H (smaller groups are not supported).

  Returns:
    A `KV4` in the head-major layout: codes uint8[B, K, T, H // 2],
    scale f32[B, K, T] and zero uint8[B, K, T].

  Raises:
    ValueError: x is not 4-D or H is odd.
    NotImplementedError: group_size is neither None nor H.
  """
  _check_x(x, group_size)
  codes, scale, zero = _quantize_rows(x, clip_ratio)
  codes = codes.astype(jnp.int8)
  # [B, T, K, H // 2] -> [B, K, T, H // 2]
  codes = jnp.swapaxes(int4_layout.pack_int4(codes), 1, 2)
  # [B, T, K, 1] -> [B, K, T]
  scale = jnp.swapaxes(scale[..., 0], 1, 2)
  zero = jnp.swapaxes(zero[..., 0], 1, 2).astype(jnp.uint8)
  return KV4(codes=codes, scale=scale, zero=zero)


def _quantize_rows(x: jax.Array, clip_ratio: float):
  """(codes, scale, zero) in f32 of x [B, T, K, H]: codes [B, T, K, H] in
  0..15, scale and zero [B, T, K, 1] (zero an integer in 0..15)."""
  x = x.astype(jnp.float32)
  # [B, T, K, 1] ranges, 0 included.
  xmin = jnp.minimum(jnp.min(x, axis=-1, keepdims=True), 0) * clip_ratio
  xmax = jnp.maximum(jnp.max(x, axis=-1, keepdims=True), 0) * clip_ratio
  scale = (xmax - xmin) / _MAXQ
  scale = jnp.where(scale > 0, scale, 1.0)
  zero = jnp.round(-xmin / scale)
  codes = jnp.clip(jnp.round(x / scale) + zero, 0, _MAXQ)
  return codes, scale, zero


@functools.partial(jax.jit, static_argnames=("clip_ratio",))
def fake_quantize_kv4(x: jax.Array, *, clip_ratio: float = 0.95
                      ) -> jax.Array:
  """What the cache holds for x, in x's layout: `dequantize_kv4` of
  `quantize_kv4(x)` transposed back, bit for bit (the same f32 codes, zero
  and scale; uint8 and int8 hold them exactly), without packing, unpacking
  or transposing (prefill attends over it while the codes go to the cache).

  Args:
    x: float[B, T, K, H] keys or values.
    clip_ratio: range clip of the quantizer.

  Returns:
    f32[B, T, K, H].

  Raises:
    ValueError: x is not 4-D or H is odd.
  """
  _check_x(x, None)
  codes, scale, zero = _quantize_rows(x, clip_ratio)
  return (codes - zero) * scale


@jax.jit
def dequantize_kv4(c: KV4) -> jax.Array:
  """(code - zero) * scale in f32, with the stored scale and zero.

  Args:
    c: a `KV4` with codes [B, K, S, H // 2].

  Returns:
    f32[B, K, S, H].
  """
  codes = int4_layout.unpack_int4(c.codes, signed=False).astype(
      jnp.float32)
  zero = c.zero.astype(jnp.float32)[..., None]
  return (codes - zero) * c.scale.astype(jnp.float32)[..., None]


def empty_kv4(batch: int, kv_heads: int, max_len: int,
              head_dim: int) -> KV4:
  """An all-zero cache (codes, scales and zeros 0: dequantizes to 0).

  Args:
    batch: B.
    kv_heads: K.
    max_len: S, the number of slots.
    head_dim: H (even).

  Returns:
    A `KV4` with codes uint8[B, K, S, H // 2], scale f32[B, K, S] and zero
    uint8[B, K, S].

  Raises:
    ValueError: head_dim is odd or a size is not positive.
  """
  if head_dim % 2:
    raise ValueError(f"{head_dim=} must be even (two 4-bit codes a byte)")
  if min(batch, kv_heads, max_len, head_dim) <= 0:
    raise ValueError(f"sizes must be positive, got {batch=} {kv_heads=}"
                     f" {max_len=} {head_dim=}")
  return KV4(codes=jnp.zeros((batch, kv_heads, max_len, head_dim // 2),
                             jnp.uint8),
             scale=jnp.zeros((batch, kv_heads, max_len), jnp.float32),
             zero=jnp.zeros((batch, kv_heads, max_len), jnp.uint8))


@functools.partial(jax.jit, static_argnames=("clip_ratio", "group_size"))
def write_kv4(cache: KV4, new: jax.Array, at: jax.Array, *,
              clip_ratio: float = 0.95,
              group_size: int | None = None) -> KV4:
  """Quantizes `new` and writes it into slots [at, at + T) of every row.

  Args:
    cache: a `KV4` with codes [B, K, S, H // 2].
    new: float[B, T, K, H] new keys or values.
    at: int32[] first slot (shared by the batch; clamped by
      `dynamic_update_slice` so that the T slots fit).
    clip_ratio: range clip of the quantizer.
    group_size: None or H.

  Returns:
    The updated `KV4` (a new pytree; `cache` is not mutated).

  Raises:
    ValueError: B, K or H of `new` differ from the cache's, or T > S.
    NotImplementedError: group_size is neither None nor H.
  """
  _check_x(new, group_size)
  b, kv, s, h2 = cache.codes.shape
  nb, t, nk, nh = new.shape
  if (nb, nk, nh) != (b, kv, 2 * h2) or t > s:
    raise ValueError(f"new [B, T, K, H]={new.shape} does not fit a cache of"
                     f" codes [B, K, S, H // 2]={cache.codes.shape}")
  part = quantize_kv4(new, clip_ratio=clip_ratio)
  at = jnp.asarray(at, jnp.int32)
  return KV4(
      codes=jax.lax.dynamic_update_slice_in_dim(cache.codes, part.codes, at,
                                                axis=2),
      scale=jax.lax.dynamic_update_slice_in_dim(cache.scale, part.scale, at,
                                                axis=2),
      zero=jax.lax.dynamic_update_slice_in_dim(cache.zero, part.zero, at,
                                               axis=2))


def memory_ratio(head_dim: int) -> float:
  """Bytes of one KV4 token-head over its bf16 bytes: (H/2 + 5) / (2 H).

  0.2890625 for H = 64 and 0.26953125 for H = 128 (the goal is <= 0.3).

  Args:
    head_dim: H (even).

  Returns:
    The ratio as a float.

  Raises:
    ValueError: head_dim is odd or not positive.
  """
  if head_dim <= 0 or head_dim % 2:
    raise ValueError(f"{head_dim=} must be even and positive")
  kv4 = head_dim // 2 + 4 + 1  # codes, f32 scale, uint8 zero
  return kv4 / (2 * head_dim)
