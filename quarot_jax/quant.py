"""Simulated quantization and THE int4 number format of the project.

Quantizers work along the LAST axis, in groups of `group_size` consecutive
elements (one group over the whole axis by default: per token for
activations, per output channel for weights). Every function computes in f32
and returns either the fake-quantized value (same dtype as its input) or a
`QArray` with the integer codes and scales the Pallas kernels consume.

Number format (follows spcl/QuaRot `fake_quant/quant_utils.py`):
  symmetric, b bits:  maxq = 2^(b-1) - 1, scale = clip * absmax / maxq,
                      q = clip(round(x / scale), -(maxq + 1), maxq)
  asymmetric, b bits: maxq = 2^b - 1, scale = clip * (max - min) / maxq,
                      zero = round(-clip * min / scale),
                      q = clip(round(x / scale) + zero, 0, maxq)
  dequantized:        x ≈ (q - zero) * scale   (zero = 0 when symmetric)
  (min/max include 0, as in the reference; a group of zeros gets scale 1.)
  Rounding is round-half-to-even (jnp.round, like torch.round).

int4 packing: the kernels own it (`pallas_kernels/int4_layout.py`: two
4-bit values per byte along the LAST axis, element 2j in the LOW nibble);
`pack_int4`/`unpack_int4` here are that module's. Symmetric codes pack as
signed nibbles, asymmetric ones as unsigned; packed weights are
uint8[N_out, K_in // 2] (K-major).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import int4_layout

# The packed layout of the kernels (re-exported: `quant.pack_int4`).
pack_int4 = int4_layout.pack_int4
unpack_int4 = int4_layout.unpack_int4

# MSE clip search of GPTQ/QuaRot `find_params(..., mse=True)`.
MSE_NORM = 2.4
MSE_GRID = 100
MSE_MAXSHRINK = 0.8
_MSE_BATCH = 10  # shrink factors evaluated at once (bounds the memory)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """How to quantize one tensor.

  Attributes:
    bits: 2..8, or 16 for "not quantized".
    symmetric: symmetric (signed codes) or asymmetric (unsigned codes with a
      zero point).
    group_size: elements per group along the last axis; None = one group
      over the whole axis (per channel for weights, per token for
      activations).
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
    if (not isinstance(self.bits, int) or isinstance(self.bits, bool)
        or (self.bits != 16 and not 2 <= self.bits <= 8)):
      raise ValueError(f"bits={self.bits!r} must be in 2..8, or 16 for none")
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
    """Largest code: 2^(b-1) - 1 if symmetric, else 2^b - 1."""
    return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class QArray:
  """A quantized tensor: x ≈ (values - zero) * scale, group-wise.

  Element [..., k] belongs to group k // group_size along `axis` (always the
  last axis, -1); `scale[..., k // group_size]` is its scale.

  Attributes:
    values: int8[..., K] codes (uint8 for 8-bit asymmetric), or
      uint8[..., K // 2] when `packed` (`pallas_kernels/int4_layout.py`).
    scale: f32[..., K // group_size] per-group scales.
    zero: f32[..., K // group_size] zero points (integers), or None when
      symmetric.
    bits: bit-width (static).
    group_size: group length along the last axis (static).
    symmetric: signed codes without zero point (static).
    packed: values are int4-packed (static; bits == 4 only).
    axis: the quantized axis (static; always -1).
  """

  values: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  bits: int = dataclasses.field(metadata=dict(static=True))
  group_size: int = dataclasses.field(metadata=dict(static=True))
  symmetric: bool = dataclasses.field(default=True,
                                      metadata=dict(static=True))
  packed: bool = dataclasses.field(default=False,
                                   metadata=dict(static=True))
  axis: int = dataclasses.field(default=-1, metadata=dict(static=True))


def _grouped(x: jax.Array, group_size: int | None) -> jax.Array:
  """[..., K] -> [..., K // g, g]."""
  k = x.shape[-1]
  g = k if group_size is None else group_size
  if k % g:
    raise ValueError(f"group_size={g} must divide the last axis ({k})")
  # [..., K // g, g]
  return x.reshape(*x.shape[:-1], k // g, g)


def _range_params(x: jax.Array, spec: QuantSpec,
                  shrink: jax.Array | float = 1.0):
  """Scale, zero f32[..., 1] of groups x [..., g] with the range shrunk."""
  ratio = spec.clip_ratio * shrink
  if spec.symmetric:
    absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    if isinstance(ratio, (int, float)):
      # One multiply by one f32 constant: XLA folds `absmax * r / q` into
      # that anyway, while a Triton kernel would multiply, then divide
      # (1 ulp apart; `pallas_kernels.hadamard_quant` writes it so too).
      scale = absmax * np.float32(ratio / spec.maxq)
    else:
      scale = absmax * ratio / spec.maxq
    return jnp.where(scale > 0, scale, 1.0), None
  xmin = jnp.minimum(jnp.min(x, axis=-1, keepdims=True), 0) * ratio
  xmax = jnp.maximum(jnp.max(x, axis=-1, keepdims=True), 0) * ratio
  scale = (xmax - xmin) / spec.maxq
  scale = jnp.where(scale > 0, scale, 1.0)
  return scale, jnp.round(-xmin / scale)


def quantize_codes(x: jax.Array, scale: jax.Array, zero: jax.Array | None,
                   spec: QuantSpec) -> jax.Array:
  """Integer codes (as f32) of x with given, broadcastable scale and zero.

  Args:
    x: f32[...] values.
    scale: f32 scales broadcastable to x.
    zero: f32 zero points broadcastable to x (ignored when symmetric).
    spec: the bit-width and symmetry.

  Returns:
    f32[...] codes, in [-(maxq + 1), maxq] or [0, maxq].
  """
  if spec.symmetric:
    return jnp.clip(jnp.round(x / scale), -(spec.maxq + 1), spec.maxq)
  return jnp.clip(jnp.round(x / scale) + zero, 0, spec.maxq)


def _mse_shrink(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """Best shrink factor f32[..., 1] of each group x [..., g]."""
  shrinks = 1.0 - jnp.arange(int(MSE_MAXSHRINK * MSE_GRID),
                             dtype=jnp.float32) / MSE_GRID

  def err(p):
    scale, zero = _range_params(x, spec, p)
    q = quantize_codes(x, scale, zero, spec)
    deq = (q - (0.0 if zero is None else zero)) * scale
    return jnp.sum(jnp.abs(deq - x) ** MSE_NORM, axis=-1, keepdims=True)

  # [grid, ..., 1], evaluated _MSE_BATCH shrinks at a time (vmapped).
  errs = jax.lax.map(err, shrinks, batch_size=_MSE_BATCH)
  # argmin takes the first minimum, as the reference's strict `err < best`.
  return shrinks[jnp.argmin(errs, axis=0)]


def find_params(x: jax.Array, spec: QuantSpec
                ) -> tuple[jax.Array, jax.Array | None]:
  """Scale and zero point of each group x [..., g] (its last axis).

  Args:
    x: f32[..., g], one group per leading index.
    spec: the quantizer; `mse_clip` runs the shrink-grid search.

  Returns:
    (scale f32[..., 1], zero f32[..., 1] or None when symmetric).
  """
  x = x.astype(jnp.float32)
  shrink = _mse_shrink(x, spec) if spec.mse_clip else 1.0
  return _range_params(x, spec, shrink)


def _check_enabled(spec: QuantSpec):
  if not spec.enabled:
    raise ValueError(f"quantize needs bits < 16, got bits={spec.bits}")


@functools.partial(jax.jit, static_argnames="spec")
def quantize(x: jax.Array, spec: QuantSpec) -> QArray:
  """Quantizes `x` along its last axis, group-wise.

  Args:
    x: float[..., K].
    spec: how (bits < 16).

  Returns:
    A `QArray` with int8[..., K] values (uint8 for 8-bit asymmetric) and
    f32[..., K // group] scales (and zeros if asymmetric).

  Raises:
    ValueError: bits == 16, or group_size does not divide K.
  """
  _check_enabled(spec)
  xg = _grouped(x.astype(jnp.float32), spec.group_size)
  scale, zero = find_params(xg, spec)
  q = quantize_codes(xg, scale, zero, spec)
  dtype = jnp.uint8 if not spec.symmetric and spec.bits == 8 else jnp.int8
  return QArray(values=q.astype(dtype).reshape(x.shape),
                scale=scale[..., 0],
                zero=None if zero is None else zero[..., 0],
                bits=spec.bits, group_size=xg.shape[-1],
                symmetric=spec.symmetric)


@jax.jit
def dequantize(q: QArray) -> jax.Array:
  """The f32 values (values - zero) * scale of a `QArray` (packed or not).

  Args:
    q: a `QArray` with values [..., K] (or packed [..., K // 2]).

  Returns:
    f32[..., K].
  """
  q = unpack(q)
  vg = _grouped(q.values.astype(jnp.float32), q.group_size)
  zero = 0.0 if q.zero is None else q.zero[..., None]
  return ((vg - zero) * q.scale[..., None]).reshape(q.values.shape)


def fake_quant(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """`dequantize(quantize(x, spec))`, or `x` itself when bits == 16.

  Differentiable by a straight-through estimator (SpinQuant's, for learned
  rotations): rounding passes gradients unchanged, while the clipping and
  the scale's dependence on the range (max/min of each group) keep theirs;
  an MSE-clip shrink is held constant. The value is exactly the
  non-differentiable `dequantize(quantize(x, spec))`.

  Args:
    x: float[..., K].
    spec: how.

  Returns:
    Same shape and dtype as `x`.

  Raises:
    ValueError: group_size does not divide K.
  """
  if not spec.enabled:
    return x
  return _fake_quant_ste(x, spec)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _fake_quant_ste(x: jax.Array, spec: QuantSpec) -> jax.Array:
  return dequantize(quantize(x, spec)).astype(x.dtype)


def _round_ste(x: jax.Array) -> jax.Array:
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _fake_quant_surrogate(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """fake_quant in float with `_round_ste`: its derivative is the STE's."""
  xg = _grouped(x.astype(jnp.float32), spec.group_size)
  shrink = (jax.lax.stop_gradient(_mse_shrink(xg, spec)) if spec.mse_clip
            else 1.0)
  scale, _ = _range_params(xg, spec, shrink)
  if spec.symmetric:
    q = jnp.clip(_round_ste(xg / scale), -(spec.maxq + 1), spec.maxq)
    return (q * scale).reshape(x.shape)
  ratio = spec.clip_ratio * shrink
  zero = _round_ste(-jnp.minimum(jnp.min(xg, axis=-1, keepdims=True), 0)
                    * ratio / scale)
  q = jnp.clip(_round_ste(xg / scale) + zero, 0, spec.maxq)
  return ((q - zero) * scale).reshape(x.shape)


@_fake_quant_ste.defjvp
def _fake_quant_ste_jvp(spec, primals, tangents):
  (x,), (dx,) = primals, tangents
  _, dy = jax.jvp(lambda v: _fake_quant_surrogate(v, spec), (x,), (dx,))
  return _fake_quant_ste(x, spec), dy.astype(x.dtype)


def quantize_weight(kernel: jax.Array, spec: QuantSpec) -> QArray:
  """Quantizes a float kernel per output channel (groups along `in`).

  Args:
    kernel: float[in, out] (y = x @ kernel).
    spec: how (bits < 16); `mse_clip` searches each channel's/group's range.

  Returns:
    A `QArray` in the kernels' K-major layout: values int8[out, in],
    scales f32[out, in // group].

  Raises:
    ValueError: bits == 16, or group_size does not divide `in`.
  """
  return quantize(kernel.T, spec)


def fake_quant_weight(kernel: jax.Array, spec: QuantSpec) -> jax.Array:
  """The fake-quantized kernel (RTN, per output channel and group).

  Args:
    kernel: float[in, out].
    spec: how; bits == 16 returns `kernel`.

  Returns:
    Same shape [in, out] and dtype as `kernel`.

  Raises:
    ValueError: group_size does not divide `in`.
  """
  if not spec.enabled:
    return kernel
  return dequantize(quantize_weight(kernel, spec)).T.astype(kernel.dtype)


def activation_spec(bits: int, *, clip_ratio: float = 0.9,
                    group_size: int | None = None) -> QuantSpec:
  """QuaRot's activation quantizer: symmetric, per token, clip 0.9."""
  return QuantSpec(bits=bits, group_size=group_size, clip_ratio=clip_ratio)


def kv_spec(bits: int, *, group_size: int | None = None,
            clip_ratio: float = 0.95) -> QuantSpec:
  """QuaRot's KV cache quantizer: asymmetric, per head (group), clip 0.95."""
  return QuantSpec(bits=bits, symmetric=False, group_size=group_size,
                   clip_ratio=clip_ratio)


def pack(q: QArray) -> QArray:
  """The same `QArray` with int4-packed values (no-op if packed; layout of
  `pallas_kernels/int4_layout.py`).

  Raises:
    NotImplementedError: bits != 4.
    ValueError: the last axis is odd.
  """
  if q.packed:
    return q
  if q.bits != 4:
    raise NotImplementedError(f"packing needs bits=4, got bits={q.bits}")
  return dataclasses.replace(q, values=pack_int4(q.values), packed=True)


def unpack(q: QArray) -> QArray:
  """The same `QArray` with int8 values (no-op if not packed)."""
  if not q.packed:
    return q
  return dataclasses.replace(
      q, values=unpack_int4(q.values, signed=q.symmetric), packed=False)



def quantize_layers(kernels: jax.Array, spec: QuantSpec) -> QArray:
  """`quantize_weight` of layer-stacked kernels, one layer at a time.

  The MSE clip search holds ~20 copies of the tensor it quantizes, so all
  layers at once would hold ~20 copies of the whole stack (31 GB for Qwen
  1.5B's gate_proj); `lax.map` bounds it to one layer's.

  Args:
    kernels: float[L, in, out].
    spec: as for `quantize_weight`.

  Returns:
    A `QArray` stacked over L: values int8[L, out, in], scales
    f32[L, out, in // group].
  """
  return jax.lax.map(lambda k: quantize_weight(k, spec), kernels)


def fake_quant_layers(kernels: jax.Array, spec: QuantSpec) -> jax.Array:
  """`fake_quant_weight` of layer-stacked kernels float[L, in, out], one
  layer at a time (see `quantize_layers`); same shape and dtype."""
  return jax.lax.map(lambda k: fake_quant_weight(k, spec), kernels)
