"""Quantizers: hand-worked cases, packing layout, bounds, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int4_layout
from quarot_jax import quant


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_symmetric_4bit_hand_worked():
  # maxq = 2^3 - 1 = 7; absmax 1.4 -> scale 1.4 / 7 = 0.2;
  # x / scale = [7, -3.5, 0.5, 2.2]; round half to even -> [7, -4, 0, 2];
  # dequantized [1.4, -0.8, 0, 0.4].
  x = jnp.array([[1.4, -0.7, 0.1, 0.44]])
  q = quant.quantize(x, quant.QuantSpec(bits=4))
  np.testing.assert_allclose(q.scale, [[0.2]], rtol=1e-6)
  assert q.zero is None and q.symmetric and q.values.dtype == jnp.int8
  np.testing.assert_array_equal(q.values, [[7, -4, 0, 2]])
  np.testing.assert_allclose(quant.dequantize(q), [[1.4, -0.8, 0, 0.4]],
                             rtol=1e-6)


def test_symmetric_clip_uses_the_extra_negative_code():
  # clip 0.7: scale = 0.7 * 1.0 / 7 = 0.1; x / scale = [10, -10, 5, -3];
  # clipped to [-8, 7] -> [7, -8, 5, -3]; dequantized [0.7, -0.8, 0.5, -0.3].
  x = jnp.array([[1.0, -1.0, 0.5, -0.3]])
  q = quant.quantize(x, quant.QuantSpec(bits=4, clip_ratio=0.7))
  np.testing.assert_allclose(q.scale, [[0.1]], rtol=1e-6)
  np.testing.assert_array_equal(q.values, [[7, -8, 5, -3]])
  np.testing.assert_allclose(quant.dequantize(q), [[0.7, -0.8, 0.5, -0.3]],
                             rtol=1e-5)


def test_asymmetric_4bit_hand_worked():
  # maxq = 15; min -0.5, max 1.0 -> scale 1.5 / 15 = 0.1,
  # zero = round(0.5 / 0.1) = 5; codes round(x / 0.1) + 5 = [0, 15, 7, 8]
  # (2.6 -> 3); dequantized (code - 5) * 0.1 = [-0.5, 1.0, 0.2, 0.3].
  x = jnp.array([[-0.5, 1.0, 0.2, 0.26]])
  q = quant.quantize(x, quant.QuantSpec(bits=4, symmetric=False))
  np.testing.assert_allclose(q.scale, [[0.1]], rtol=1e-6)
  np.testing.assert_allclose(q.zero, [[5.0]])
  np.testing.assert_array_equal(q.values, [[0, 15, 7, 8]])
  np.testing.assert_allclose(quant.dequantize(q), [[-0.5, 1.0, 0.2, 0.3]],
                             atol=1e-6)


def test_asymmetric_range_includes_zero():
  # All positive: min is taken as 0, so zero = 0 and scale = 3.0 / 15 = 0.2;
  # codes round([1, 3, 2.2] / 0.2) = [5, 15, 11] -> [1.0, 3.0, 2.2].
  x = jnp.array([[1.0, 3.0, 2.2, 3.0]])
  q = quant.quantize(x, quant.QuantSpec(bits=4, symmetric=False))
  np.testing.assert_allclose(q.scale, [[0.2]], rtol=1e-6)
  np.testing.assert_array_equal(q.zero, [[0.0]])
  np.testing.assert_array_equal(q.values, [[5, 15, 11, 15]])


def test_pack_is_the_kernels_layout():
  # The layout itself is tested in tests/pallas_kernels/test_int4_layout.py.
  assert quant.pack_int4 is int4_layout.pack_int4
  assert quant.unpack_int4 is int4_layout.unpack_int4


@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_round_trip_of_qarrays(symmetric):
  spec = quant.QuantSpec(bits=4, symmetric=symmetric, group_size=16)
  q = quant.quantize(_x((3, 64)), spec)
  packed = quant.pack(q)
  assert packed.packed and packed.values.shape == (3, 32)
  assert packed.values.dtype == jnp.uint8
  np.testing.assert_array_equal(quant.unpack(packed).values, q.values)
  np.testing.assert_array_equal(quant.dequantize(packed), quant.dequantize(q))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_at_most_half_a_step(bits, symmetric):
  x = _x((8, 128), seed=bits)
  spec = quant.QuantSpec(bits=bits, symmetric=symmetric, group_size=32)
  q = quant.quantize(x, spec)
  assert q.values.shape == (8, 128) and q.scale.shape == (8, 4)
  err = np.abs(np.asarray(quant.dequantize(q)) - np.asarray(x))
  step = np.asarray(q.scale)[..., None]
  # Without clipping every element is in range (the symmetric -absmax maps
  # to -maxq; the asymmetric ends are off by at most half a step).
  assert (err.reshape(8, 4, 32) <= step / 2 * (1 + 1e-5)).all()
  values = np.asarray(q.values)
  lo = -(spec.maxq + 1) if symmetric else 0
  assert values.min() >= lo and values.max() <= spec.maxq
  # The top code is reached, so the bits are all used.
  assert values.max() == spec.maxq


def test_error_shrinks_with_bits():
  x = _x((16, 64))
  errs = [np.mean((np.asarray(quant.fake_quant(x, quant.QuantSpec(bits=b)))
                   - np.asarray(x)) ** 2) for b in range(2, 9)]
  assert all(a > 2 * b for a, b in zip(errs, errs[1:]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_ratio(symmetric):
  x = _x((4, 64))
  full = quant.quantize(x, quant.QuantSpec(bits=4, symmetric=symmetric))
  spec = quant.QuantSpec(bits=4, symmetric=symmetric, clip_ratio=0.8)
  clipped = quant.quantize(x, spec)
  np.testing.assert_allclose(clipped.scale, 0.8 * full.scale, rtol=1e-6)
  deq = np.asarray(quant.dequantize(clipped))
  x, step = np.asarray(x), np.asarray(clipped.scale)
  zero = 0.0 if symmetric else np.asarray(clipped.zero)
  lo = ((-(spec.maxq + 1) if symmetric else 0) - zero) * step
  hi = (spec.maxq - zero) * step
  inside = (x >= lo - step / 2) & (x <= hi + step / 2)
  assert not inside.all()  # some elements really are clipped
  err = np.abs(deq - x)
  assert (err <= step / 2 * (1 + 1e-5))[inside].all()
  # Clipped elements land on the ends of the range.
  lo, hi = np.broadcast_to(lo, x.shape), np.broadcast_to(hi, x.shape)
  ends = np.isclose(deq, lo, rtol=1e-5) | np.isclose(deq, hi, rtol=1e-5)
  assert ends[~inside].all()


def _mse_reference(w, bits, symmetric):
  """The reference's find_params(mse=True), written as a plain loop."""
  maxq = 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1
  xmin = np.minimum(w.min(1), 0)
  xmax = np.maximum(w.max(1), 0)
  if symmetric:
    xmax = np.maximum(-xmin, xmax)
  best = np.full(w.shape[0], np.inf)
  best_scale = np.zeros(w.shape[0])
  for i in range(80):
    p = 1 - i / 100
    if symmetric:
      s = p * xmax / maxq
      q = np.clip(np.round(w / s[:, None]), -(maxq + 1), maxq) * s[:, None]
    else:
      s = p * (xmax - xmin) / maxq
      z = np.round(-p * xmin / s)
      q = (np.clip(np.round(w / s[:, None]) + z[:, None], 0, maxq)
           - z[:, None]) * s[:, None]
    err = np.sum(np.abs(q - w) ** 2.4, axis=1)
    better = err < best
    best[better], best_scale[better] = err[better], s[better]
  return best_scale, best


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clip_matches_the_grid_search_and_beats_rtn(symmetric):
  w = _x((128, 16)) ** 3  # [in, out], heavy tails: clipping pays off
  spec = quant.QuantSpec(bits=3, symmetric=symmetric, mse_clip=True)
  q = quant.quantize_weight(w, spec)
  ref_scale, ref_err = _mse_reference(np.asarray(w, np.float64).T, 3,
                                      symmetric)
  np.testing.assert_allclose(q.scale[:, 0], ref_scale, rtol=1e-5)
  mse = quant.fake_quant_weight(w, spec)
  plain = quant.fake_quant_weight(
      w, quant.QuantSpec(bits=3, symmetric=symmetric))
  err = lambda a: np.sum(np.abs(np.asarray(a - w, np.float64)) ** 2.4,
                         axis=0)  # per output channel
  np.testing.assert_allclose(err(mse), ref_err, rtol=1e-4)
  assert (err(mse) <= err(plain) * (1 + 1e-6)).all()
  assert err(mse).sum() < 0.9 * err(plain).sum()


def test_mse_clip_groupwise_is_no_worse_than_rtn():
  w = _x((128, 8), seed=3) ** 3
  err = lambda spec: np.sum(
      np.abs(np.asarray(quant.fake_quant_weight(w, spec) - w)) ** 2.4)
  assert (err(quant.QuantSpec(bits=4, group_size=32, mse_clip=True))
          < err(quant.QuantSpec(bits=4, group_size=32)))


def test_weight_layout_is_k_major():
  w = _x((64, 16))  # [in, out]
  spec = quant.QuantSpec(bits=4, group_size=32)
  q = quant.quantize_weight(w, spec)
  assert q.values.shape == (16, 64) and q.scale.shape == (16, 2)
  np.testing.assert_array_equal(q.values, quant.quantize(w.T, spec).values)
  np.testing.assert_allclose(quant.dequantize(q).T,
                             quant.fake_quant_weight(w, spec))


def test_activation_and_kv_specs():
  x = _x((2, 3, 64))  # [B, T, D]
  a = quant.quantize(x, quant.activation_spec(4))
  assert a.scale.shape == (2, 3, 1) and a.symmetric
  xn = np.asarray(x)
  np.testing.assert_allclose(
      a.scale[..., 0], 0.9 * np.abs(xn).max(-1) / 7, rtol=1e-6)
  kv = _x((2, 5, 4, 32))  # [B, S, K, H]
  k = quant.quantize(kv, quant.kv_spec(4))
  assert k.scale.shape == k.zero.shape == (2, 5, 4, 1) and not k.symmetric
  kvn = np.asarray(kv)
  span = np.maximum(kvn.max(-1), 0) - np.minimum(kvn.min(-1), 0)
  np.testing.assert_allclose(k.scale[..., 0], 0.95 * span / 15, rtol=1e-6)
  k2 = quant.quantize(kv, quant.kv_spec(4, group_size=16))
  assert k2.scale.shape == (2, 5, 4, 2)


def test_16_bits_is_identity():
  x = _x((2, 8)).astype(jnp.bfloat16)
  assert quant.fake_quant(x, quant.QuantSpec(bits=16)) is x
  assert quant.fake_quant_weight(x, quant.QuantSpec(bits=16)) is x
  assert not quant.QuantSpec(bits=16).enabled
  assert quant.QuantSpec(bits=8).enabled


def test_dtype_is_kept():
  x = _x((2, 8)).astype(jnp.bfloat16)
  assert quant.fake_quant(x, quant.QuantSpec(bits=4)).dtype == jnp.bfloat16


def test_jit_and_qarray_pytree():
  x = _x((4, 32))
  spec = quant.QuantSpec(bits=4, symmetric=False, group_size=8)
  np.testing.assert_array_equal(
      jax.jit(quant.fake_quant, static_argnums=1)(x, spec),
      quant.fake_quant(x, spec))
  q = jax.jit(quant.quantize, static_argnums=1)(x, spec)
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 3  # values, scale, zero; the rest is static
  q2 = jax.tree.unflatten(treedef, leaves)
  assert (q2.bits, q2.group_size, q2.symmetric, q2.packed, q2.axis) == (
      4, 8, False, False, -1)
  np.testing.assert_array_equal(jax.jit(quant.dequantize)(quant.pack(q)),
                                quant.dequantize(q))


def test_zero_rows_give_zeros_not_nan():
  x = jnp.zeros((2, 8)).at[1].set(_x((8,)))
  for symmetric in (True, False):
    spec = quant.QuantSpec(bits=4, symmetric=symmetric, mse_clip=True)
    out = quant.fake_quant(x, spec)
    assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(out[0] == 0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=1), "bits=1"), (dict(bits=12), "bits=12"),
    (dict(bits=4.0), "bits=4.0"), (dict(bits=32), "bits=32"),
    (dict(bits=4, clip_ratio=1.5), "clip_ratio=1.5"),
    (dict(bits=4, clip_ratio=0.0), "clip_ratio=0.0"),
    (dict(bits=4, group_size=0), "group_size=0"),
])
def test_spec_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    quant.QuantSpec(**kwargs)


def test_shape_errors():
  with pytest.raises(ValueError, match="K=3 must be even"):
    quant.pack_int4(jnp.ones((2, 3), jnp.int8))
  with pytest.raises(ValueError, match="group_size=5 must divide"):
    quant.quantize(_x((2, 8)), quant.QuantSpec(bits=4, group_size=5))
  with pytest.raises(ValueError, match="group_size=48 must divide"):
    quant.fake_quant_weight(_x((64, 4)),
                            quant.QuantSpec(bits=4, group_size=48))
  with pytest.raises(ValueError, match="bits=16"):
    quant.quantize(_x((2, 8)), quant.QuantSpec(bits=16))
  with pytest.raises(NotImplementedError, match="bits=8"):
    quant.pack(quant.quantize(_x((2, 8)), quant.QuantSpec(bits=8)))


@pytest.mark.parametrize("fn", ["fake_quant_layers", "quantize_layers"])
def test_layer_stacked_weights_quantize_one_layer_at_a_time(fn):
  """The MSE clip search holds ~20 copies of what it quantizes; over all
  layers at once that was 31 GB for Qwen 1.5B's gate_proj (OOM on a 24 GB
  CPU). The working memory must not grow with the layer count."""
  spec = quant.QuantSpec(bits=4, symmetric=True, mse_clip=True)
  quantize = jax.jit(getattr(quant, fn), static_argnames="spec")

  def temp_bytes(layers):
    kernels = jax.ShapeDtypeStruct((layers, 256, 128), jnp.float32)
    return quantize.lower(kernels, spec=spec).compile().memory_analysis(
        ).temp_size_in_bytes

  assert temp_bytes(16) < 1.5 * temp_bytes(2), (temp_bytes(16),
                                                temp_bytes(2))


def test_layer_stacked_quantization_equals_each_layer():
  spec = quant.QuantSpec(bits=4, symmetric=True, mse_clip=True)
  kernels = jax.random.normal(jax.random.key(3), (3, 64, 32), jnp.float32)
  got = quant.fake_quant_layers(kernels, spec=spec)
  q = quant.quantize_layers(kernels, spec=spec)
  for i in range(3):  # the same codes; values up to XLA's fusion (1 ulp)
    want = quant.quantize_weight(kernels[i], spec)
    np.testing.assert_array_equal(q.values[i], want.values)
    np.testing.assert_allclose(q.scale[i], want.scale, rtol=2e-7)
    np.testing.assert_allclose(
        got[i], quant.fake_quant_weight(kernels[i], spec), rtol=2e-7,
        atol=0)
