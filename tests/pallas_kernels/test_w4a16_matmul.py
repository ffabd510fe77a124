"""w4a16_matmul's K-split reductions ('partials', 'atomic') vs the reference.

The older W4A16 tests (hand-worked reference, errors, GPU lowering) live in
test_int4_matmul.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import w4a16_matmul as w4a16
from quarot_jax import quant

_REDUCTIONS = ("partials", "atomic")


def _operands(m, n, k, dtype, seed):
  """Random x [M, K], packed int4 w_q [N, K // 2] and scales s_w [N]."""
  kx, kw, ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
  w = jax.random.randint(kw, (n, k), -8, 8, jnp.int32).astype(jnp.int8)
  # Scales in [0.5, 2): dropping or doubling them moves y far off.
  s_w = jax.random.uniform(ks, (n,), jnp.float32, 0.5, 2.0)
  return x, quant.pack_int4(w), s_w


def _config(split_k, reduction):
  # block_k = 32 bytes = 64 K values, so K = 512 gives 2 steps per split
  # at split_k = 4.
  return w4a16.W4A16MatmulConfig(block_m=16, block_n=32, block_k=32,
                                 split_k=split_k, reduction=reduction)


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


@pytest.mark.parametrize("reduction", _REDUCTIONS)
@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_decode_m_matches_reference(m, split_k, reduction, interpret):
  x, w_q, s_w = _operands(m, 64, 512, jnp.float32, seed=m + 10 * split_k)
  _check(x, w_q, s_w, _config(split_k, reduction), interpret)


# M, N and K all need padding: M 3 -> 16, N 100 -> 128, K / 2 = 192 bytes
# -> a multiple of block_k * split_k (256 bytes at split_k 2 and 4).
# bf16 at split_k 1 and 4 only, to keep the interpret-mode time down.
@pytest.mark.parametrize("split_k, reduction, dtype", [
    (s, r, d) for r in _REDUCTIONS for s, d in
    [(1, jnp.float32), (2, jnp.float32), (4, jnp.float32),
     (1, jnp.bfloat16), (4, jnp.bfloat16)]])
def test_padded_shape_matches_reference(split_k, reduction, dtype, interpret):
  x, w_q, s_w = _operands(3, 100, 384, dtype, seed=split_k)
  _check(x, w_q, s_w, _config(split_k, reduction), interpret)


@pytest.mark.parametrize("split_k, reduction, atomics", [
    (1, "partials", False), (4, "partials", False),
    (1, "atomic", False),  # One split: a plain store, in the dtype of x.
    (4, "atomic", True)])
def test_atomic_reduction_really_uses_atomics(split_k, reduction, atomics):
  x, w_q, s_w = _operands(4, 64, 512, jnp.bfloat16, seed=0)
  jaxpr = str(jax.make_jaxpr(lambda a: w4a16.w4a16_matmul(
      a, w_q, s_w, config=_config(split_k, reduction), interpret=True))(x))
  assert "pallas_call" in jaxpr
  assert ("atomic_rmw" in jaxpr) == atomics


def test_config_errors():
  with pytest.raises(ValueError, match="reduction='tree' must be"):
    w4a16.W4A16MatmulConfig(reduction="tree")
  with pytest.raises(ValueError, match="split_k=0 must be at least 1"):
    w4a16.W4A16MatmulConfig(split_k=0)
