"""kv4_cache: the packed 4-bit KV layout, its quantizer and its writes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kv4_cache as kv4_lib
from quarot_jax import quant


def _x(shape, seed=0):
  # Shifted so that min and max differ per head (zero is not always 8).
  x = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  return x + 0.5 * jax.random.normal(jax.random.key(seed + 1),
                                     shape[:-1] + (1,))


def _np(tree):
  """Host copies (numpy): asserts then run no jax ops."""
  return jax.tree.map(np.asarray, tree)


def test_quantize_kv4_is_quant_kv_spec_in_head_major_layout():
  x = _x((2, 5, 3, 64))  # [B, T, K, H]
  c = kv4_lib.quantize_kv4(x)
  assert c.codes.shape == (2, 3, 5, 32) and c.codes.dtype == jnp.uint8
  assert c.scale.shape == c.zero.shape == (2, 3, 5)
  assert c.scale.dtype == jnp.float32 and c.zero.dtype == jnp.uint8
  c = _np(c)
  want = _np(quant.quantize(x, quant.kv_spec(4, clip_ratio=0.95)))
  packed = np.asarray(quant.pack_int4(want.values))
  # Exactly quant.quantize's codes, packed and moved to [B, K, T, H // 2].
  np.testing.assert_array_equal(c.codes, packed.swapaxes(1, 2))
  np.testing.assert_array_equal(c.scale, want.scale[..., 0].swapaxes(1, 2))
  # zero is an integer 0..15: exact in uint8.
  np.testing.assert_array_equal(c.zero, want.zero[..., 0].swapaxes(1, 2))
  assert want.zero.min() >= 0 and want.zero.max() <= 15


def test_dequantize_kv4_is_quant_dequantize_exactly():
  x = _x((2, 7, 2, 128), seed=2)
  c = kv4_lib.dequantize_kv4(kv4_lib.quantize_kv4(x))
  assert c.shape == (2, 2, 7, 128) and c.dtype == jnp.float32
  q = quant.quantize(x, quant.kv_spec(4))
  # The same codes, scale and zero as simulated KV quantization.
  exact = np.asarray(quant.dequantize(q)).swapaxes(1, 2)
  np.testing.assert_array_equal(np.asarray(c), exact)
  # Round trip: |x - deq| <= scale / 2 inside the clipped range, plus the
  # clipped 5% of the range outside it.
  x, scale = np.asarray(x).swapaxes(1, 2), np.asarray(q.scale).swapaxes(1, 2)
  rng = (np.maximum(x.max(-1, keepdims=True), 0)
         - np.minimum(x.min(-1, keepdims=True), 0))
  assert np.all(np.abs(np.asarray(c) - x) <= 0.05 * rng + 0.5 * scale
                + 1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("clip_ratio", [0.95, 1.0])
def test_fake_quantize_kv4_is_the_cache_round_trip_bit_for_bit(dtype,
                                                              clip_ratio):
  x = _x((2, 9, 3, 64), seed=5).astype(dtype)
  x = x.at[1, 4, 2].set(0)  # an all-zero group: scale 1
  got = kv4_lib.fake_quantize_kv4(x, clip_ratio=clip_ratio)
  assert got.shape == x.shape and got.dtype == jnp.float32
  want = kv4_lib.dequantize_kv4(kv4_lib.quantize_kv4(x,
                                                     clip_ratio=clip_ratio))
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(want).swapaxes(1, 2))
  # and the simulated quantizer's values (quant.kv_spec), not just x again
  q = quant.quantize(x, quant.kv_spec(4, clip_ratio=clip_ratio))
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(quant.dequantize(q)))
  assert not np.array_equal(np.asarray(got), np.asarray(x, np.float32))


def test_dequantize_kv4_hand_worked():
  # Head [0.0, 1.5, -0.5, 3.0] with clip 1: min -0.5, max 3 -> scale 3.5/15,
  # zero round(0.5 / scale) = round(2.142..) = 2; codes round(x / scale) + 2
  # = [0 + 2, round(6.43) + 2, round(-2.14) + 2, round(12.86) + 2]
  # = [2, 8, 0, 15]; bytes (2 | 8 << 4, 0 | 15 << 4) = (130, 240).
  x = jnp.array([0.0, 1.5, -0.5, 3.0]).reshape(1, 1, 1, 4)
  c = kv4_lib.quantize_kv4(x, clip_ratio=1.0)
  np.testing.assert_array_equal(c.codes.reshape(-1), [130, 240])
  np.testing.assert_array_equal(c.zero.reshape(-1), [2])
  scale = np.float32(3.5) / np.float32(15)
  np.testing.assert_allclose(c.scale.reshape(-1), [scale], rtol=1e-7)
  np.testing.assert_array_equal(
      kv4_lib.dequantize_kv4(c).reshape(-1),
      np.array([0, 6, -2, 13], np.float32) * np.asarray(c.scale).reshape(-1))


def test_kv4_is_a_frozen_pytree_with_nbytes():
  c = kv4_lib.empty_kv4(2, 3, 10, 64)
  assert len(jax.tree.leaves(c)) == 3
  assert c.codes.shape == (2, 3, 10, 32) and c.codes.dtype == jnp.uint8
  assert c.scale.dtype == jnp.float32 and c.scale.shape == (2, 3, 10)
  assert c.zero.dtype == jnp.uint8
  assert not np.any(kv4_lib.dequantize_kv4(c))
  assert c.nbytes == 2 * 3 * 10 * (32 + 4 + 1)
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.codes = c.codes  # pytype: disable=not-writable
  doubled = jax.tree.map(lambda a: a + 1, c)
  assert isinstance(doubled, kv4_lib.KV4)


@pytest.mark.parametrize("head_dim, ratio", [(64, 0.2890625),
                                             (128, 0.26953125)])
def test_memory_ratio(head_dim, ratio):
  assert kv4_lib.memory_ratio(head_dim) == ratio <= 0.3
  c = kv4_lib.empty_kv4(2, 4, 16, head_dim)
  bf16_bytes = 2 * 4 * 16 * head_dim * 2
  assert c.nbytes / bf16_bytes == ratio


def test_write_kv4_writes_the_quantized_slots_only():
  cache = kv4_lib.empty_kv4(2, 3, 9, 64)
  new = _x((2, 3, 3, 64), seed=4)  # [B, T, K, H]
  part = _np(kv4_lib.quantize_kv4(new))
  got = kv4_lib.write_kv4(cache, new, jnp.int32(4))
  # A second write (traced slot, other clip) keeps the first.
  got2 = _np(jax.jit(lambda c, x, at: kv4_lib.write_kv4(
      c, x, at, clip_ratio=1.0))(got, new, 1))
  got = _np(got)
  for name in ("codes", "scale", "zero"):
    a, p = getattr(got, name), getattr(part, name)
    np.testing.assert_array_equal(a[:, :, 4:7], p)
    assert not np.any(a[:, :, :4]) and not np.any(a[:, :, 7:])
  np.testing.assert_array_equal(got2.codes[:, :, 4:7], part.codes)
  # clip_ratio reaches the quantizer: range 1.0 / 0.95 times wider.
  np.testing.assert_allclose(got2.scale[:, :, 1:4], part.scale / 0.95,
                             rtol=2e-3)


def test_errors():
  with pytest.raises(NotImplementedError, match="group_size=32 must be"):
    kv4_lib.quantize_kv4(jnp.ones((1, 2, 1, 64)), group_size=32)
  with pytest.raises(ValueError, match="must be \\[B, T, K, H\\]"):
    kv4_lib.quantize_kv4(jnp.ones((2, 1, 64)))
  with pytest.raises(ValueError, match="head dim h=5 must be even"):
    kv4_lib.quantize_kv4(jnp.ones((1, 2, 1, 5)))
  with pytest.raises(ValueError, match="head_dim=7 must be even"):
    kv4_lib.empty_kv4(1, 1, 4, 7)
  with pytest.raises(ValueError, match="sizes must be positive"):
    kv4_lib.empty_kv4(1, 1, 0, 8)
  cache = kv4_lib.empty_kv4(1, 2, 4, 8)
  with pytest.raises(ValueError, match="does not fit a cache"):
    kv4_lib.write_kv4(cache, jnp.ones((1, 1, 3, 8)), 0)
  with pytest.raises(ValueError, match="does not fit a cache"):
    kv4_lib.write_kv4(cache, jnp.ones((1, 5, 2, 8)), 0)
  with pytest.raises(NotImplementedError, match="group_size=4 must be"):
    kv4_lib.write_kv4(cache, jnp.ones((1, 1, 2, 8)), 0, group_size=4)
  with pytest.raises(ValueError, match="head_dim=0 must be even"):
    kv4_lib.memory_ratio(0)
