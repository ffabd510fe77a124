"""Orthogonal parameterizations and losses of learned rotations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quarot_jax import hadamard
from quarot_jax import learned_rotation_core as core
from quarot_jax import quant


def _start(n=24, layers=2, h=8):
  return core.Rotations(
      r1=hadamard.random_hadamard_matrix(n, jax.random.key(0)),
      r2=jnp.stack([hadamard.random_orthogonal_matrix(h, k)
                    for k in jax.random.split(jax.random.key(1), layers)]))


@pytest.mark.parametrize("parameterization", core.PARAMETERIZATIONS)
def test_zero_parameters_give_back_the_start(parameterization):
  r0 = _start()
  rot = jax.jit(core.rotations, static_argnums=2)(core.zero_theta(r0), r0,
                                                  parameterization)
  np.testing.assert_allclose(rot.r1, r0.r1, atol=1e-6, rtol=0)
  np.testing.assert_allclose(rot.r2, r0.r2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("parameterization", core.PARAMETERIZATIONS)
def test_stays_orthogonal_after_optimizer_steps(parameterization):
  # Large Adam steps on a loss that wants a non-orthogonal matrix: the
  # parameterization must keep QᵀQ = I anyway.
  r0 = _start()
  target = jax.random.normal(jax.random.key(2), r0.r1.shape)
  x = jax.random.normal(jax.random.key(3), (64, 24))

  def loss(theta):
    rot = core.rotations(theta, r0, parameterization)
    return (jnp.sum((rot.r1 - target) ** 2) + core.whip_loss(x @ rot.r1)
            + jnp.sum(rot.r2[:, 0]))

  opt = optax.adam(0.05)

  @jax.jit
  def step(theta, state):
    value, grads = jax.value_and_grad(loss)(theta)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(theta, updates), state, value

  theta = core.zero_theta(r0)
  state = opt.init(theta)
  values = []
  for _ in range(20):
    theta, state, value = step(theta, state)
    values.append(float(value))
  rot = jax.jit(core.rotations, static_argnums=2)(theta, r0, parameterization)
  assert values[-1] < values[0]
  assert np.abs(rot.r1 - r0.r1).max() > 0.05  # it really moved
  assert float(core.orthogonality_error(rot.r1)) < 1e-5
  assert float(core.orthogonality_error(rot.r2)) < 1e-5


def test_unknown_parameterization_names_it():
  with pytest.raises(ValueError, match="'householder'"):
    core.orthogonal(jnp.zeros((4, 4)), "householder")


def test_cayley_of_a_hand_worked_rotation():
  # A = [[0, -t], [t, 0]]: (I - A)^-1 (I + A) is the rotation by angle
  # 2·atan(t); t = 1 gives 90 degrees, [[0, -1], [1, 0]].
  a = jnp.array([[0.0, -1.0], [1.0, 0.0]])
  np.testing.assert_allclose(core.cayley(a), [[0, -1], [1, 0]], atol=1e-6)


def test_qr_orthogonal_fixes_signs():
  # QR(diag(-2, 3)) = Q diag(2, 3) with Q = diag(-1, 1), R's diagonal > 0.
  q = core.qr_orthogonal(jnp.diag(jnp.array([-2.0, 3.0])))
  np.testing.assert_allclose(q, [[-1, 0], [0, 1]], atol=1e-6)


def test_whip_loss_hand_worked():
  # rows [0, ln 2] and [ln 4, 0]: (1 + 1/2 + 1/4 + 1) / 2 = 1.375
  x = jnp.array([[0.0, np.log(2)], [-np.log(4), 0.0]], jnp.float32)
  np.testing.assert_allclose(core.whip_loss(x), 1.375, rtol=1e-6)


def test_whip_loss_prefers_a_flat_rotated_outlier():
  # Same norm; the spread-out vector has fewer values near 0.
  x = jnp.zeros((1, 16)).at[0, 3].set(4.0)
  flat = x @ hadamard.random_hadamard_matrix(16, jax.random.key(0))
  assert float(core.whip_loss(flat)) < float(core.whip_loss(x))


def test_quant_error_loss_hand_worked():
  # 2-bit symmetric, absmax 1: scale 1, codes round(x) clipped to [-2, 1]:
  # [1, 0.5, 0.25, 0] -> [1, 0, 0, 0] (0.5 rounds to even), error
  # 0.5² + 0.25² = 0.3125.
  x = jnp.array([[1.0, 0.5, 0.25, 0.0]])
  spec = quant.QuantSpec(bits=2)
  np.testing.assert_allclose(core.quant_error_loss(x, spec), 0.3125,
                             rtol=1e-6)
  assert float(core.quant_error_loss(x, None)) == 0.0


def test_next_token_loss_hand_worked():
  # Uniform logits over V = 4: every next token costs ln 4.
  logits = jnp.zeros((2, 5, 4))
  tokens = jnp.array([[0, 1, 2, 3, 0], [3, 2, 1, 0, 1]], jnp.int32)
  np.testing.assert_allclose(core.next_token_loss(logits, tokens),
                             np.log(4), rtol=1e-6)


def test_kl_loss_hand_worked():
  # Teacher one-hot-ish over V = 2 ([ln 3, 0]: p = [3/4, 1/4]), student
  # uniform: KL = 3/4 ln(3/2) + 1/4 ln(1/2) at every position.
  teacher = jnp.tile(jnp.array([np.log(3.0), 0.0], jnp.float32), (2, 3, 1))
  student = jnp.zeros((2, 3, 2), jnp.float32)
  want = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
  np.testing.assert_allclose(core.kl_loss(student, teacher), want, rtol=1e-6)
  assert float(core.kl_loss(teacher, teacher)) == 0.0


def test_kl_loss_matches_numpy_and_sends_no_gradient_to_the_teacher():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(2, 7, 11)).astype(np.float32)
  teacher = (3 * rng.normal(size=(2, 7, 11))).astype(np.float32)
  log_p = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
  log_q = student - np.log(np.exp(student).sum(-1, keepdims=True))
  want = np.mean((np.exp(log_p) * (log_p - log_q)).sum(-1))
  got = core.kl_loss(jnp.asarray(student), jnp.asarray(teacher))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(got) > 0
  grad_teacher = jax.grad(core.kl_loss, argnums=1)(jnp.asarray(student),
                                                   jnp.asarray(teacher))
  assert not np.any(np.asarray(grad_teacher))
