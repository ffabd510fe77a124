"""w4a4_matmul.reference: hand-worked cases, group scales, operand checks."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int4_layout
from pallas_kernels.w4a4_matmul import reference
from tests.pallas_kernels.w4a4_matmul import operands

pack = int4_layout.pack_int4


def test_hand_worked():
  # x = [[1, -2, 7, -8]], w = [[3, 1, -1, 2]]:
  # 1*3 + (-2)*1 + 7*(-1) + (-8)*2 = 3 - 2 - 7 - 16 = -22;
  # times s_x 0.5 and s_w 0.25 -> -2.75.
  xq = pack(jnp.array([[1, -2, 7, -8]], jnp.int8))
  wq = pack(jnp.array([[3, 1, -1, 2]], jnp.int8))
  y = reference.w4a4_matmul_reference(xq, wq, jnp.array([0.5]),
                                      jnp.array([0.25]),
                                      out_dtype=jnp.float32)
  np.testing.assert_array_equal(y, [[-2.75]])


def test_hand_worked_groups():
  # K = 4 in two groups of 2: x = [[1, 2, 3, 4]], w = [[1, 1, 1, -1]];
  # group dots 1 + 2 = 3 and 3 - 4 = -1; s_x = [2, 1], s_w = [1, 0.5]:
  # 3 * 2 * 1 + (-1) * 1 * 0.5 = 5.5.
  xq = pack(jnp.array([[1, 2, 3, 4]], jnp.int8))
  wq = pack(jnp.array([[1, 1, 1, -1]], jnp.int8))
  y = reference.w4a4_matmul_reference(xq, wq, jnp.array([[2.0, 1.0]]),
                                      jnp.array([[1.0, 0.5]]),
                                      out_dtype=jnp.float32)
  np.testing.assert_array_equal(y, [[5.5]])


@pytest.mark.parametrize("which", ["none", "both", "x", "w"])
def test_is_the_float_computation(which):
  m, n, k, group = 12, 20, 256, 64
  x, w, sx, sw = operands.codes(m, n, k, seed=1)
  if which in ("both", "x"):
    sx = operands.group_scales(m, k // group, 2)
  if which in ("both", "w"):
    sw = operands.group_scales(n, k // group, 3)
  got = reference.w4a4_matmul_reference(pack(x), pack(w), sx, sw,
                                        out_dtype=jnp.float32)
  want = operands.dequantized_product(x, w, sx, sw)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5,
                             atol=1e-6 * np.abs(want).max())


def test_int8_codes_equal_packed():
  x, w, sx, sw = operands.codes(24, 40, 96)
  np.testing.assert_array_equal(
      np.asarray(reference.w4a4_matmul_reference(x, pack(w), sx, sw)),
      np.asarray(reference.w4a4_matmul_reference(pack(x), pack(w), sx,
                                                 sw)))


def test_check_operands():
  x, w, sx, sw = operands.codes(16, 32, 64)
  xq, wq = pack(x), pack(w)
  assert reference.check_operands(xq, wq, sx, sw) == (16, 32, 64)
  assert reference.check_operands(x, wq, sx, sw) == (16, 32, 64)
  with pytest.raises(ValueError, match="w_q uint8"):
    reference.check_operands(xq, w, sx, sw)
  with pytest.raises(ValueError, match="K differs"):
    reference.check_operands(xq[:, :8], wq, sx, sw)
  with pytest.raises(ValueError, match="scales must be"):
    reference.check_operands(xq, wq, sx[:3], sw)
  with pytest.raises(ValueError, match="group scales must share G"):
    reference.check_operands(xq, wq, operands.group_scales(16, 2, 0),
                             operands.group_scales(32, 4, 0))
  with pytest.raises(ValueError, match="group scales must share G"):
    reference.check_operands(xq, wq, sx, operands.group_scales(32, 3, 0))
