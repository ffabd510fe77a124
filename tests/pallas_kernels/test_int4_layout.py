"""int4_layout: the packed int4 layout (nibble order, round trips, errors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int4_layout


def test_pack_layout_low_nibble_is_even_index():
  # 1 -> 0x1 in the low nibble, -2 -> 0xE in the high nibble: 0xE1;
  # 7 -> 0x7 low, -8 -> 0x8 high: 0x87.
  packed = int4_layout.pack_int4(jnp.array([[1, -2, 7, -8]], jnp.int8))
  assert packed.dtype == jnp.uint8
  np.testing.assert_array_equal(packed, [[0xE1, 0x87]])
  np.testing.assert_array_equal(int4_layout.unpack_int4(packed, signed=True),
                                [[1, -2, 7, -8]])
  # Unsigned codes: 3 low, 12 high -> 0xC3.
  np.testing.assert_array_equal(
      int4_layout.pack_int4(jnp.array([3, 12], jnp.int8)), [0xC3])
  np.testing.assert_array_equal(
      int4_layout.unpack_int4(jnp.array([0xC3], jnp.uint8), signed=False),
      [3, 12])


@pytest.mark.parametrize("signed", [True, False])
def test_pack_round_trip_all_codes(signed):
  rng = np.random.default_rng(0)
  lo, hi = (-8, 7) if signed else (0, 15)
  codes = jnp.asarray(rng.integers(lo, hi + 1, size=(3, 5, 64)), jnp.int8)
  packed = int4_layout.pack_int4(codes)
  assert packed.shape == (3, 5, 32)
  np.testing.assert_array_equal(
      int4_layout.unpack_int4(packed, signed=signed), codes)


def test_signed_nibbles_read_the_layout():
  # The in-kernel split of bytes (as int8) gives the even elements (low
  # nibbles) and the odd ones (high nibbles), sign-extended.
  codes = jnp.array([[1, -2, 7, -8, 0, -1]], jnp.int8)
  packed = jax.lax.bitcast_convert_type(int4_layout.pack_int4(codes),
                                        jnp.int8)
  low, high = int4_layout.signed_nibbles(packed)
  np.testing.assert_array_equal(low, [[1, 7, 0]])
  np.testing.assert_array_equal(high, [[-2, -8, -1]])


def test_odd_k_is_an_error():
  with pytest.raises(ValueError, match="K=3 must be even"):
    int4_layout.pack_int4(jnp.ones((2, 3), jnp.int8))


def test_unpack_every_byte():
  byte = np.arange(256, dtype=np.uint8)[None]
  lo, hi = byte & 0xF, byte >> 4
  for signed in (False, True):
    want = np.stack([lo, hi], -1).reshape(1, 512).astype(np.int16)
    if signed:
      want = np.where(want >= 8, want - 16, want)
    np.testing.assert_array_equal(
        int4_layout.unpack_int4(jnp.asarray(byte), signed=signed), want)
