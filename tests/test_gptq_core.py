"""GPTQ on one matrix: it must beat RTN on the Hessian-weighted loss."""

import jax.numpy as jnp
import numpy as np
import pytest

from quarot_jax import gptq_core
from quarot_jax import quant


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  W = jnp.asarray(rng.normal(size=(32, 128)), jnp.float32)
  # Correlated inputs: a low-rank signal plus noise.
  X = (rng.normal(size=(1024, 16)) @ rng.normal(size=(16, 128))
       + 0.1 * rng.normal(size=(1024, 128)))
  H, n = gptq_core.accumulate_hessian(jnp.zeros((128, 128)), jnp.int32(0),
                                      jnp.asarray(X[:500], jnp.float32))
  H, n = gptq_core.accumulate_hessian(H, n, jnp.asarray(X[500:], jnp.float32))
  return W, H, X


def _loss(W, Q, H):
  return float(jnp.trace((W - Q) @ H @ (W - Q).T))


def test_accumulate_hessian_matches_the_formula(problem):
  _, H, X = problem
  np.testing.assert_allclose(H, 2 * X.T @ X / X.shape[0], rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize("spec, act_order", [
    (quant.QuantSpec(bits=4), False),
    (quant.QuantSpec(bits=4), True),
    (quant.QuantSpec(bits=4, group_size=32), False),
    (quant.QuantSpec(bits=4, group_size=32), True),
    (quant.QuantSpec(bits=3, symmetric=False, group_size=64), False),
])
def test_gptq_beats_rtn_and_its_qarray_is_exact(problem, spec, act_order):
  W, H, _ = problem
  Q, qarray = gptq_core.gptq_quantize(W, H, spec, blocksize=32,
                                      act_order=act_order)
  assert _loss(W, Q, H) < 0.5 * _loss(W, quant.fake_quant(W, spec), H)
  np.testing.assert_array_equal(quant.dequantize(qarray), Q)
  assert int(qarray.values.max()) <= spec.maxq


def test_gptq_equals_rtn_when_inputs_are_uncorrelated():
  # H diagonal: no error can be compensated by other columns, so each
  # column is just rounded (damping does not change that).
  rng = np.random.default_rng(1)
  W = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
  H = jnp.diag(jnp.asarray(rng.uniform(0.5, 2.0, size=64), jnp.float32))
  spec = quant.QuantSpec(bits=4)
  Q, _ = gptq_core.gptq_quantize(W, H, spec, blocksize=16)
  np.testing.assert_allclose(Q, quant.fake_quant(W, spec), atol=1e-6)


def test_dead_inputs_are_zeroed():
  rng = np.random.default_rng(2)
  W = jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)
  X = rng.normal(size=(256, 32))
  X[:, 5] = 0
  H, _ = gptq_core.accumulate_hessian(jnp.zeros((32, 32)), jnp.int32(0),
                                      jnp.asarray(X, jnp.float32))
  Q, _ = gptq_core.gptq_quantize(W, H, quant.QuantSpec(bits=4), blocksize=16)
  np.testing.assert_array_equal(Q[:, 5], 0)


def test_group_size_must_divide():
  with pytest.raises(ValueError, match="group_size=48 must divide"):
    gptq_core.gptq_quantize(jnp.ones((4, 64)), jnp.eye(64),
                            quant.QuantSpec(bits=4, group_size=48))
