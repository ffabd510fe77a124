"""Simulated quantization and THE int4 number format of the project.

Quantizers work along the last axis, in groups of `group_size` consecutive
elements (one group over the whole axis by default: per token for
activations, per output channel for weights). Every function returns either
the fake-quantized value (same dtype as its input) or a `QArray` with the
integer values and scales the Pallas kernels consume.

Number format (follows spcl/QuaRot `fake_quant/quant_utils.py`):
  symmetric, b bits:  maxq = 2^(b-1) - 1, scale = clip * absmax / maxq,
                      q = clip(round(x / scale), -(maxq + 1), maxq)
  asymmetric, b bits: maxq = 2^b - 1, scale = clip * (max - min) / maxq,
                      zero = round(-clip * min / scale),
                      q = clip(round(x / scale) + zero, 0, maxq)
  dequantized:        x ≈ (q - zero) * scale   (zero = 0 when symmetric)
  (min/max include 0, as in the reference.)

int4 packing (cited by every kernel in pallas_kernels/): two 4-bit values
per uint8 byte along the LAST axis. Byte j holds element 2j in its low
nibble (bits 0-3) and element 2j+1 in its high nibble (bits 4-7). Signed
(symmetric) values are two's-complement nibbles in [-8, 7]; asymmetric
values are unsigned codes in [0, 15]. int[..., K] packs to uint8[..., K//2].
Packed weights are uint8[N_out, K_in // 2] (K-major, as Hopper's 8-bit wgmma
wants both operands).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """How to quantize one tensor.

  Attributes:
    bits: 2..8, or 16 for "not quantized".
    symmetric: symmetric (signed) or asymmetric (unsigned with a zero point).
    group_size: elements per group along the last axis; None = whole axis.
    clip_ratio: scale the range by this factor (0 < r <= 1).
    mse_clip: search a per-group shrink of the range that minimizes
      |x - q(x)|^2.4 (GPTQ/QuaRot `find_params` with mse=True; weights).
  """

  bits: int
  symmetric: bool = True
  group_size: int | None = None
  clip_ratio: float = 1.0
  mse_clip: bool = False

  def __post_init__(self):
    if self.bits != 16 and not 2 <= self.bits <= 8:
      raise ValueError(f"bits={self.bits} must be in 2..8, or 16 for none")
    if not 0 < self.clip_ratio <= 1:
      raise ValueError(f"clip_ratio={self.clip_ratio} must be in (0, 1]")
    if self.group_size is not None and self.group_size <= 0:
      raise ValueError(f"group_size={self.group_size} must be positive")

  @property
  def enabled(self) -> bool:
    """False when bits == 16 (the tensor stays in float)."""
    return self.bits < 16

  @property
  def maxq(self) -> int:
    return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized tensor: x ≈ (values - zero) * scale, group-wise.

  Attributes:
    values: int8[..., K] codes, or uint8[..., K // 2] when `packed`.
    scale: f32[..., n_groups] per-group scales.
    zero: f32[..., n_groups] zero points, or None when symmetric.
    bits: bit-width (static).
    group_size: group length along the last axis (static).
    packed: values are int4-packed as documented above (static).
  """

  values: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  bits: int = dataclasses.field(metadata=dict(static=True))
  group_size: int = dataclasses.field(metadata=dict(static=True))
  packed: bool = dataclasses.field(default=False,
                                   metadata=dict(static=True))

  @property
  def symmetric(self) -> bool:
    return self.zero is None


def _grouped(x: jax.Array, group_size: int | None) -> jax.Array:
  """[..., K] -> [..., K // g, g]."""
  k = x.shape[-1]
  g = k if group_size is None else group_size
  if k % g:
    raise ValueError(f"group_size={g} must divide the last axis ({k})")
  return x.reshape(*x.shape[:-1], k // g, g)


def _params(xg: jax.Array, spec: QuantSpec, shrink: jax.Array | float = 1.0):
  """Scale and zero of f32[..., n, g] groups (keepdims on the last axis)."""
  maxq = spec.maxq
  if spec.symmetric:
    absmax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True) * (
        spec.clip_ratio * shrink)
    scale = absmax / maxq
    scale = jnp.where(scale > 0, scale, 1.0)
    return scale, None
  xmin = jnp.minimum(jnp.min(xg, axis=-1, keepdims=True), 0) * (
      spec.clip_ratio * shrink)
  xmax = jnp.maximum(jnp.max(xg, axis=-1, keepdims=True), 0) * (
      spec.clip_ratio * shrink)
  scale = (xmax - xmin) / maxq
  scale = jnp.where(scale > 0, scale, 1.0)
  zero = jnp.round(-xmin / scale)
  return scale, zero


def _codes(xg, scale, zero, spec: QuantSpec):
  if spec.symmetric:
    return jnp.clip(jnp.round(xg / scale), -(spec.maxq + 1), spec.maxq)
  return jnp.clip(jnp.round(xg / scale) + zero, 0, spec.maxq)


def _mse_shrink(xg: jax.Array, spec: QuantSpec, *, grid: int = 100,
                maxshrink: float = 0.8, norm: float = 2.4) -> jax.Array:
  """Best shrink factor f32[..., n, 1] of each group's range."""
  shrinks = 1.0 - jnp.arange(int(maxshrink * grid), dtype=jnp.float32) / grid

  def err(p):
    scale, zero = _params(xg, spec, p)
    q = _codes(xg, scale, zero, spec)
    deq = (q - (0 if zero is None else zero)) * scale
    return jnp.sum(jnp.abs(deq - xg) ** norm, axis=-1, keepdims=True)

  errs = jax.lax.map(err, shrinks)  # [grid', ..., n, 1]
  return shrinks[jnp.argmin(errs, axis=0)]


def quantize(x: jax.Array, spec: QuantSpec) -> QArray:
  """Quantizes `x` [..., K] along its last axis.

  Args:
    x: float array [..., K].
    spec: how (bits < 16).

  Returns:
    A `QArray` with int8 values [..., K] and scales [..., K // group].

  Raises:
    ValueError: bits == 16, or group_size does not divide K.
  """
  if not spec.enabled:
    raise ValueError("quantize needs bits < 16")
  xg = _grouped(x.astype(jnp.float32), spec.group_size)
  shrink = _mse_shrink(xg, spec) if spec.mse_clip else 1.0
  scale, zero = _params(xg, spec, shrink)
  q = _codes(xg, scale, zero, spec).astype(jnp.int8 if spec.symmetric
                                           or spec.bits < 8 else jnp.uint8)
  group = xg.shape[-1]
  return QArray(values=q.reshape(x.shape), scale=scale[..., 0],
                zero=None if zero is None else zero[..., 0],
                bits=spec.bits, group_size=group)


def dequantize(q: QArray) -> jax.Array:
  """f32 values of a `QArray` (unpacking first if packed)."""
  if q.packed:
    q = unpack(q)
  vg = _grouped(q.values.astype(jnp.float32), q.group_size)
  zero = 0.0 if q.zero is None else q.zero[..., None]
  return ((vg - zero) * q.scale[..., None]).reshape(q.values.shape)


def fake_quant(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """`dequantize(quantize(x))` in the dtype of `x`; identity at 16 bits."""
  if not spec.enabled:
    return x
  return dequantize(quantize(x, spec)).astype(x.dtype)


def quantize_weight(kernel: jax.Array, spec: QuantSpec) -> QArray:
  """Quantizes a float kernel [in, out] per output channel (and group).

  Returns:
    A `QArray` in the kernels' K-major layout: values [out, in], scales
    [out, in // group].
  """
  return quantize(kernel.T, spec)


def fake_quant_weight(kernel: jax.Array, spec: QuantSpec) -> jax.Array:
  """Fake-quantized kernel [in, out] (groups along `in`), same dtype."""
  if not spec.enabled:
    return kernel
  return dequantize(quantize_weight(kernel, spec)).T.astype(kernel.dtype)


def pack_int4(values: jax.Array) -> jax.Array:
  """Packs int codes [..., K] (signed [-8, 7] or unsigned [0, 15]) to
  uint8[..., K // 2], low nibble = even index.

  Raises:
    ValueError: K is odd.
  """
  k = values.shape[-1]
  if k % 2:
    raise ValueError(f"the last axis ({k}) must be even to pack int4")
  v = values.astype(jnp.int32) & 0xF
  v = v.reshape(*values.shape[:-1], k // 2, 2)
  return (v[..., 0] | (v[..., 1] << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array, *, signed: bool) -> jax.Array:
  """Inverse of `pack_int4`: int8[..., 2 * K2] from uint8[..., K2]."""
  p = packed.astype(jnp.int32)
  lo, hi = p & 0xF, (p >> 4) & 0xF
  v = jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1],
                                            packed.shape[-1] * 2)
  if signed:
    v = jnp.where(v >= 8, v - 16, v)
  return v.astype(jnp.int8)


def pack(q: QArray) -> QArray:
  """A 4-bit `QArray` with int4-packed values."""
  if q.bits != 4:
    raise NotImplementedError(f"packing needs bits=4, got bits={q.bits}")
  if q.packed:
    return q
  return dataclasses.replace(q, values=pack_int4(q.values), packed=True)


def unpack(q: QArray) -> QArray:
  """A `QArray` with int8 values (no-op if not packed)."""
  if not q.packed:
    return q
  return dataclasses.replace(
      q, values=unpack_int4(q.values, signed=q.symmetric), packed=False)


def activation_spec(bits: int, clip_ratio: float = 0.9) -> QuantSpec:
  """QuaRot's activation quantizer: symmetric, per token, clipped."""
  return QuantSpec(bits=bits, clip_ratio=clip_ratio)


def kv_spec(bits: int, head_dim: int, clip_ratio: float = 0.95
            ) -> QuantSpec:
  """QuaRot's KV cache quantizer: asymmetric, one group per head."""
  return QuantSpec(bits=bits, symmetric=False, group_size=head_dim,
                   clip_ratio=clip_ratio)


def describe(spec: Any) -> dict | None:
  """A JSON-serializable dict of a spec (None stays None)."""
  return None if spec is None else dataclasses.asdict(spec)
