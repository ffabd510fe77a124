"""w4a16_matmul (Pallas Triton, interpret mode on the CPU) against its
reference, the reference by hand, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int4_layout
from pallas_kernels import w4a16_matmul as w4a16


def _operands(m, n, k, dtype, seed):
  """Random x [M, K], packed int4 w_q [N, K // 2] and scales s_w [N]."""
  kx, kw, ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
  w = jax.random.randint(kw, (n, k), -8, 8, jnp.int32).astype(jnp.int8)
  # Scales in [0.5, 2): dropping or doubling them moves y far off.
  s_w = jax.random.uniform(ks, (n,), jnp.float32, 0.5, 2.0)
  return x, int4_layout.pack_int4(w), s_w


def _config(split_k):
  # block_k = 32 bytes = 64 K values, so K = 512 gives 2 steps per split
  # at split_k = 4.
  return w4a16.W4A16MatmulConfig(block_m=16, block_n=32, block_k=32,
                                 split_k=split_k)


def _check(x, w_q, s_w, cfg, interpret):
  got = w4a16.w4a16_matmul(x, w_q, s_w, config=cfg, interpret=interpret)
  assert got.shape == (x.shape[0], w_q.shape[0]) and got.dtype == x.dtype
  # The f32 value the kernel rounds (x upcast exactly).
  want = w4a16.w4a16_matmul_reference(x.astype(jnp.float32), w_q, s_w)
  atol = 1e-5 * float(jnp.abs(want).max())  # f32 sums in another order.
  # bf16 y: one rounding of the f32 value, at most 2^-8 relative.
  rtol = 1e-5 if x.dtype == jnp.float32 else 2.0**-8
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want),
                             rtol=rtol, atol=atol)


@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_decode_m_matches_reference(m, split_k, interpret):
  x, w_q, s_w = _operands(m, 64, 512, jnp.float32, seed=m + 10 * split_k)
  _check(x, w_q, s_w, _config(split_k), interpret)


# M, N and K all need padding: M 3 -> 16, N 100 -> 128, K / 2 = 192 bytes
# -> a multiple of block_k * split_k (256 bytes at split_k 2 and 4).
# bf16 at split_k 1 and 4 only, to keep the interpret-mode time down.
@pytest.mark.parametrize("split_k, dtype", [
    (1, jnp.float32), (2, jnp.float32), (4, jnp.float32),
    (1, jnp.bfloat16), (4, jnp.bfloat16)])
def test_padded_shape_matches_reference(split_k, dtype, interpret):
  x, w_q, s_w = _operands(3, 100, 384, dtype, seed=split_k)
  _check(x, w_q, s_w, _config(split_k), interpret)


def test_reference_hand_worked():
  # w = [[3, 1, -1, 2]] * 0.5 = [[1.5, 0.5, -0.5, 1]];
  # x = [[2, 4, 6, 8]] -> 3 + 2 - 3 + 8 = 10.
  wq = int4_layout.pack_int4(jnp.array([[3, 1, -1, 2]], jnp.int8))
  y = w4a16.w4a16_matmul_reference(jnp.array([[2.0, 4.0, 6.0, 8.0]]), wq,
                                   jnp.array([0.5]))
  np.testing.assert_array_equal(y, [[10.0]])


def test_pallas_really_runs():
  x, w_q, s_w = _operands(4, 32, 64, jnp.float32, seed=0)
  jaxpr = str(jax.make_jaxpr(lambda a: w4a16.w4a16_matmul(
      a, w_q, s_w, config=_config(1), interpret=True))(x))
  assert "pallas_call" in jaxpr and "w4a16_matmul" in jaxpr


def test_errors():
  x, w_q, s_w = _operands(4, 32, 64, jnp.float32, seed=0)
  with pytest.raises(ValueError, match="packs K=64"):
    w4a16.w4a16_matmul(x[:, :32], w_q, s_w)
  with pytest.raises(ValueError, match="w_q must be uint8"):
    w4a16.w4a16_matmul(x, w_q.astype(jnp.int8), s_w)
  with pytest.raises(ValueError, match=r"s_w must be \[N\]=\[32\]"):
    w4a16.w4a16_matmul(x, w_q, s_w[:3])
  with pytest.raises(ValueError, match="split_k=0 must be at least 1"):
    w4a16.W4A16MatmulConfig(split_k=0)


@pytest.mark.gpu
def test_lowers_to_the_named_gpu_kernel():
  x, w_q, s_w = _operands(4, 256, 512, jnp.bfloat16, seed=1)
  fn = jax.jit(w4a16.w4a16_matmul)
  assert "w4a16_matmul" in fn.lower(x, w_q, s_w).as_text()
  _check(x, w_q, s_w, None, interpret=False)
