"""Quantizers: hand-worked cases, packing layout, bounds, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarot_jax import quant


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_symmetric_4bit_hand_worked():
  # absmax 1.4 -> scale 1.4 / 7 = 0.2; x / scale = [7, -3.5, 0.5, 2.2]
  # round half to even -> [7, -4, 0, 2]; dequantized [1.4, -0.8, 0, 0.4].
  x = jnp.array([[1.4, -0.7, 0.1, 0.44]])
  q = quant.quantize(x, quant.QuantSpec(bits=4))
  np.testing.assert_allclose(q.scale, [[0.2]], rtol=1e-6)
  np.testing.assert_array_equal(q.values, [[7, -4, 0, 2]])
  np.testing.assert_allclose(quant.dequantize(q), [[1.4, -0.8, 0, 0.4]],
                             rtol=1e-6)


def test_asymmetric_4bit_hand_worked():
  # min -0.5, max 1.0 -> scale 1.5 / 15 = 0.1, zero = round(0.5 / 0.1) = 5;
  # codes round(x / 0.1) + 5 = [0, 15, 7, 8]; dequantized (code - 5) * 0.1.
  x = jnp.array([[-0.5, 1.0, 0.2, 0.26]])
  q = quant.quantize(x, quant.QuantSpec(bits=4, symmetric=False))
  np.testing.assert_allclose(q.scale, [[0.1]], rtol=1e-6)
  np.testing.assert_allclose(q.zero, [[5.0]])
  np.testing.assert_array_equal(q.values, [[0, 15, 7, 8]])
  np.testing.assert_allclose(quant.dequantize(q), [[-0.5, 1.0, 0.2, 0.3]],
                             atol=1e-6)


def test_pack_layout_low_nibble_is_even_index():
  # 1 -> 0x1 in the low nibble, -2 -> 0xE in the high nibble: 0xE1.
  packed = quant.pack_int4(jnp.array([[1, -2, 7, -8]], jnp.int8))
  np.testing.assert_array_equal(packed, [[0xE1, 0x87]])
  np.testing.assert_array_equal(quant.unpack_int4(packed, signed=True),
                                [[1, -2, 7, -8]])
  codes = jnp.array([[0, 15, 9, 3]], jnp.int8)
  np.testing.assert_array_equal(
      quant.unpack_int4(quant.pack_int4(codes), signed=False), codes)


@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_round_trip_of_qarrays(symmetric):
  spec = quant.QuantSpec(bits=4, symmetric=symmetric, group_size=16)
  q = quant.quantize(_x((3, 64)), spec)
  packed = quant.pack(q)
  assert packed.values.shape == (3, 32) and packed.values.dtype == jnp.uint8
  np.testing.assert_array_equal(quant.dequantize(packed), quant.dequantize(q))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_at_most_half_a_step(bits, symmetric):
  x = _x((8, 128), seed=bits)
  spec = quant.QuantSpec(bits=bits, symmetric=symmetric, group_size=32)
  q = quant.quantize(x, spec)
  err = jnp.abs(quant.dequantize(q) - x).reshape(8, 4, 32)
  step = q.scale[..., None]
  # Symmetric: -absmax maps to -maxq (inside the range), so every element
  # is within half a step.
  assert bool(jnp.all(err <= step / 2 + 1e-6))
  lo = -(spec.maxq + 1) if symmetric else 0
  assert int(q.values.min()) >= lo and int(q.values.max()) <= spec.maxq


def test_clip_ratio_shrinks_the_scale():
  x = _x((4, 64))
  full = quant.quantize(x, quant.QuantSpec(bits=4))
  clipped = quant.quantize(x, quant.QuantSpec(bits=4, clip_ratio=0.9))
  np.testing.assert_allclose(clipped.scale, 0.9 * full.scale, rtol=1e-6)


def test_mse_clip_is_no_worse_than_rtn():
  w = _x((256, 32)) ** 3  # heavy tails: clipping pays off
  plain = quant.fake_quant_weight(w, quant.QuantSpec(bits=3))
  mse = quant.fake_quant_weight(w, quant.QuantSpec(bits=3, mse_clip=True))
  err = lambda a: float(jnp.sum(jnp.abs(a - w) ** 2.4))
  assert err(mse) < err(plain)


def test_weight_layout_is_k_major():
  w = _x((64, 16))  # [in, out]
  q = quant.quantize_weight(w, quant.QuantSpec(bits=4, group_size=32))
  assert q.values.shape == (16, 64) and q.scale.shape == (16, 2)
  np.testing.assert_allclose(quant.dequantize(q).T,
                             quant.fake_quant_weight(w, quant.QuantSpec(
                                 bits=4, group_size=32)))


def test_16_bits_is_identity_and_jit_works():
  x = _x((2, 8))
  assert quant.fake_quant(x, quant.QuantSpec(bits=16)) is x
  spec = quant.QuantSpec(bits=4)
  np.testing.assert_array_equal(jax.jit(quant.fake_quant, static_argnums=1)(
      x, spec), quant.fake_quant(x, spec))


def test_zero_rows_give_zeros_not_nan():
  out = quant.fake_quant(jnp.zeros((2, 8)), quant.QuantSpec(bits=4))
  assert bool(jnp.all(out == 0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=1), "bits=1"), (dict(bits=12), "bits=12"),
    (dict(bits=4, clip_ratio=1.5), "clip_ratio=1.5"),
    (dict(bits=4, group_size=0), "group_size=0"),
])
def test_spec_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    quant.QuantSpec(**kwargs)


def test_shape_errors():
  with pytest.raises(ValueError, match="must be even"):
    quant.pack_int4(jnp.zeros((2, 3), jnp.int8))
  with pytest.raises(ValueError, match="group_size=5 must divide"):
    quant.quantize(_x((2, 8)), quant.QuantSpec(bits=4, group_size=5))
  with pytest.raises(NotImplementedError, match="bits=8"):
    quant.pack(quant.quantize(_x((2, 8)), quant.QuantSpec(bits=8)))
