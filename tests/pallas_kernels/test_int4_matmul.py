"""int4_matmul (W4A4) and w4a16_matmul against their references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int4_matmul as w4a4
from pallas_kernels import w4a16_matmul as w4a16
from quarot_jax import quant

_SMALL = w4a4.Int4MatmulConfig(block_m=16, block_n=32, block_k=32)


def _operands(m, n, k, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.integers(-8, 8, (m, k)), jnp.int8)
  w = jnp.asarray(rng.integers(-8, 8, (n, k)), jnp.int8)
  sx = jnp.asarray(rng.uniform(0.01, 0.1, m), jnp.float32)
  sw = jnp.asarray(rng.uniform(0.01, 0.1, n), jnp.float32)
  return x, w, sx, sw


# Not block multiples on purpose (M 40 vs 16, N 72 vs 32, K 320 vs 64).
@pytest.mark.parametrize("m, n, k", [(40, 72, 320), (16, 32, 64), (1, 8, 6)])
def test_w4a4_kernel_matches_reference_exactly(m, n, k, interpret):
  x, w, sx, sw = _operands(m, n, k)
  xq, wq = quant.pack_int4(x), quant.pack_int4(w)
  got = w4a4.int4_matmul(xq, wq, sx, sw, out_dtype=jnp.float32,
                         config=_SMALL, interpret=interpret)
  want = w4a4.int4_matmul_reference(xq, wq, sx, sw, out_dtype=jnp.float32)
  # int32 accumulation is exact; the epilogue is the same two f32 products.
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_w4a4_reference_hand_worked():
  # x = [[1, -2, 7, -8]], w = [[3, 1, -1, 2]]:
  # 1*3 + (-2)*1 + 7*(-1) + (-8)*2 = 3 - 2 - 7 - 16 = -22;
  # times s_x 0.5 and s_w 0.25 -> -2.75.
  xq = quant.pack_int4(jnp.array([[1, -2, 7, -8]], jnp.int8))
  wq = quant.pack_int4(jnp.array([[3, 1, -1, 2]], jnp.int8))
  y = w4a4.int4_matmul_reference(xq, wq, jnp.array([0.5]),
                                 jnp.array([0.25]), out_dtype=jnp.float32)
  np.testing.assert_array_equal(y, [[-2.75]])


def test_w4a4_bf16_output_and_quantized_inputs(interpret):
  key = jax.random.key(0)
  x = jax.random.normal(key, (24, 128))
  w = jax.random.normal(jax.random.key(1), (48, 128))
  qx = quant.quantize(x, quant.QuantSpec(bits=4))
  qw = quant.quantize(w, quant.QuantSpec(bits=4))
  args = (quant.pack_int4(qx.values), quant.pack_int4(qw.values),
          qx.scale[:, 0], qw.scale[:, 0])
  got = w4a4.int4_matmul(*args, config=_SMALL, interpret=interpret)
  want = w4a4.int4_matmul_reference(*args)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))
  # And it is the product of the dequantized operands.
  deq = quant.dequantize(qx) @ quant.dequantize(qw).T
  np.testing.assert_allclose(np.asarray(got, np.float32), deq, rtol=1e-2,
                             atol=1e-2 * float(jnp.abs(deq).max()))


def test_w4a4_pallas_really_runs():
  x, w, sx, sw = _operands(16, 32, 64)
  jaxpr = jax.make_jaxpr(lambda *a: w4a4.int4_matmul(
      *a, config=_SMALL, interpret=True))(quant.pack_int4(x),
                                          quant.pack_int4(w), sx, sw)
  assert "pallas_call" in str(jaxpr)


def _group_scales(rows, groups, seed):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(0.01, 0.1, (rows, groups)), jnp.float32)


# K 512 in groups of 128 (the 128G mode) and of 64; M, N not tile multiples.
@pytest.mark.parametrize("m, n, k, group", [(40, 72, 512, 128),
                                            (16, 32, 256, 64)])
@pytest.mark.parametrize("which", ["both", "x", "w"])
def test_w4a4_group_scales_match_reference(m, n, k, group, which, interpret):
  x, w, sx, sw = _operands(m, n, k, seed=k + group)
  xq, wq = quant.pack_int4(x), quant.pack_int4(w)
  if which in ("both", "x"):
    sx = _group_scales(m, k // group, 1)
  if which in ("both", "w"):
    sw = _group_scales(n, k // group, 2)
  got = w4a4.int4_matmul(xq, wq, sx, sw, out_dtype=jnp.float32,
                         config=_SMALL, interpret=interpret)
  want = w4a4.int4_matmul_reference(xq, wq, sx, sw, out_dtype=jnp.float32)
  # Same exact int32 group dots, scaled and summed over G in the same order;
  # only f32 rounding of those few terms may differ (FMA contraction).
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6,
                             atol=1e-6 * float(jnp.abs(want).max()))
  # The reference is the float computation it stands for.
  sxg = np.broadcast_to(np.asarray(sx).reshape(m, -1), (m, k // group))
  swg = np.broadcast_to(np.asarray(sw).reshape(n, -1), (n, k // group))
  xd = np.asarray(x, np.float64) * np.repeat(sxg, group, axis=1)
  wd = np.asarray(w, np.float64) * np.repeat(swg, group, axis=1)
  np.testing.assert_allclose(np.asarray(want), xd @ wd.T, rtol=1e-5,
                             atol=1e-6 * float(np.abs(xd @ wd.T).max()))


def test_w4a4_group_scale_errors():
  x, w, sx, sw = _operands(16, 32, 256)
  xq, wq = quant.pack_int4(x), quant.pack_int4(w)
  with pytest.raises(ValueError, match="group scales must share G"):
    w4a4.int4_matmul(xq, wq, _group_scales(16, 2, 0), _group_scales(32, 4, 0))
  with pytest.raises(ValueError, match="group scales must share G"):
    w4a4.int4_matmul(xq, wq, sx, _group_scales(32, 3, 0))  # 256 % 3


def test_w4a4_errors():
  x, w, sx, sw = _operands(16, 32, 64)
  xq, wq = quant.pack_int4(x), quant.pack_int4(w)
  with pytest.raises(ValueError, match="must be uint8"):
    w4a4.int4_matmul(x, wq, sx, sw)
  with pytest.raises(ValueError, match="packed K differs"):
    w4a4.int4_matmul(xq[:, :8], wq, sx, sw)
  with pytest.raises(ValueError, match="scales must be"):
    w4a4.int4_matmul(xq, wq, sx[:3], sw)


@pytest.mark.parametrize("m, n, k, split_k", [(3, 72, 320, 1),
                                              (16, 64, 512, 1),
                                              (3, 72, 320, 3)])
def test_w4a16_kernel_matches_reference(m, n, k, split_k, interpret):
  _, w, _, sw = _operands(m, n, k, seed=2)
  x = jax.random.normal(jax.random.key(3), (m, k), jnp.float32)
  wq = quant.pack_int4(w)
  cfg = w4a16.W4A16MatmulConfig(block_m=16, block_n=32, block_k=32,
                                split_k=split_k)
  got = w4a16.w4a16_matmul(x, wq, sw, config=cfg, interpret=interpret)
  want = w4a16.w4a16_matmul_reference(x, wq, sw)
  # f32 sums in another order: tolerance scaled by sqrt(K).
  tol = 1e-6 * np.sqrt(k) * float(jnp.abs(want).max())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol)


def test_w4a16_reference_hand_worked():
  # w = [[3, 1, -1, 2]] * 0.5 = [[1.5, 0.5, -0.5, 1]];
  # x = [[2, 4, 6, 8]] -> 3 + 2 - 3 + 8 = 10.
  wq = quant.pack_int4(jnp.array([[3, 1, -1, 2]], jnp.int8))
  y = w4a16.w4a16_matmul_reference(jnp.array([[2.0, 4.0, 6.0, 8.0]]), wq,
                                   jnp.array([0.5]))
  np.testing.assert_array_equal(y, [[10.0]])


def test_w4a16_pallas_really_runs_and_errors():
  _, w, _, sw = _operands(16, 32, 64)
  wq = quant.pack_int4(w)
  x = jnp.ones((4, 64))
  cfg = w4a16.W4A16MatmulConfig(block_m=16, block_n=32, block_k=32)
  jaxpr = jax.make_jaxpr(lambda a: w4a16.w4a16_matmul(
      a, wq, sw, config=cfg, interpret=True))(x)
  assert "pallas_call" in str(jaxpr)
  with pytest.raises(ValueError, match="packs K=64"):
    w4a16.w4a16_matmul(jnp.ones((4, 32)), wq, sw)


@pytest.mark.gpu
def test_kernels_lower_to_named_gpu_kernels():
  x, w, sx, sw = _operands(256, 256, 512)
  xq, wq = quant.pack_int4(x), quant.pack_int4(w)
  hlo = jax.jit(lambda *a: w4a4.int4_matmul(*a)).lower(
      xq, wq, sx, sw).as_text()
  assert "int4_matmul" in hlo
  xb = jnp.ones((4, 512), jnp.bfloat16)
  hlo = jax.jit(lambda a: w4a16.w4a16_matmul(a, wq, sw)).lower(xb).as_text()
  assert "w4a16_matmul" in hlo
