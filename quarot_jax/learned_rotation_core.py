"""Learned rotations, the pure math: orthogonal parameterizations and losses.

Two ways to learn QuaRot's rotations R1 (residual stream, [D, D]) and R2
(per head on the value/output path, [L, H, H]) instead of fixing them to
randomized Hadamards:

* DartQuant (NeurIPS 2025, "rotational distribution calibration"): each
  rotation is calibrated on its own cached input activations with the Whip
  loss `mean_tokens(sum_i exp(-|x_i|))`, which pushes the rotated values
  away from zero; with the norm of every token fixed by the rotation, that
  flattens the distribution towards a uniform one and shrinks the outliers
  that set the quantization step. Orthogonality is kept by a QR
  parameterization (their "QR-Orth"): R = QR(Z).Q with the signs fixed.
  A variant with the same machinery minimizes the quantization error of the
  rotated inputs themselves (`quant_error_loss`), clipping included.
* SpinQuant (arXiv 2405.16406, facebookresearch/SpinQuant
  `train_utils/optimizer.py`): the rotations minimize the quantized
  network's next-token loss, rounding passed straight through; SpinQuant
  moves R on the Stiefel manifold by Cayley SGD. We use the Cayley
  parameterization R = R0 (I - A)^-1 (I + A), A = W - Wᵀ, and a plain optax
  optimizer on W, which keeps R orthogonal by construction.

Both parameterizations are written as `R = R0 @ P(W / sqrt(n))` with
P(0) = I, so the unlearned start is exactly the randomized Hadamard R0. The
1 / sqrt(n) makes a learning rate mean the same rotation per step for every
order n: an Adam step moves each entry of W by about the learning rate, and
a matrix of n x n such entries with random signs has norm about sqrt(n).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from quarot_jax import quant

PARAMETERIZATIONS = ("cayley", "qr")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Rotations:
  """The learnable rotations of a model.

  Attributes:
    r1: f32[D, D], the residual rotation (x -> x @ r1).
    r2: f32[L, H, H], each layer's rotation of every value head
      (v_h -> v_h @ r2[l]); its transpose is folded into o_proj.
    scales: f32[L, 2, D] positive channel scales of each layer's attention
      input (0) and MLP input (1), in the rotated basis (OSTQuant's
      learnable scaling): the norm's output is divided by them and the
      rows of q/k/v (0) or gate/up (1) multiplied
      (`rotation.scale_norm_outputs`); None: no scaling.
  """

  r1: jax.Array
  r2: jax.Array
  scales: jax.Array | None = None


def skew(w: jax.Array) -> jax.Array:
  """W - Wᵀ over the last two axes of f32[..., n, n]."""
  return w - jnp.swapaxes(w, -1, -2)


def cayley(a: jax.Array) -> jax.Array:
  """The Cayley transform (I - A)^-1 (I + A) of skew-symmetric A [..., n, n].

  Orthogonal for every skew A; (I - A) has eigenvalues 1 - iλ, |·| >= 1, so
  the solve is well conditioned.
  """
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  return jnp.linalg.solve(eye - a, jnp.broadcast_to(eye + a, a.shape))


def qr_orthogonal(z: jax.Array) -> jax.Array:
  """Q of the QR decomposition of f32[..., n, n], signs fixed (diag R > 0).

  The sign fix makes the map continuous and QR(orthogonal Q) = Q.
  """
  q, r = jnp.linalg.qr(z)
  signs = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
  return q * signs.astype(q.dtype)[..., None, :]


def orthogonal(w: jax.Array, parameterization: str) -> jax.Array:
  """P(W), orthogonal f32[..., n, n] with P(0) = I.

  Args:
    w: f32[..., n, n] unconstrained parameters.
    parameterization: 'cayley' (cayley(W - Wᵀ)) or 'qr' (QR(I + W).Q).

  Returns:
    f32[..., n, n], orthogonal.

  Raises:
    ValueError: unknown parameterization.
  """
  if parameterization == "cayley":
    return cayley(skew(w))
  if parameterization == "qr":
    return qr_orthogonal(jnp.eye(w.shape[-1], dtype=w.dtype) + w)
  raise ValueError(f"{parameterization=} must be one of {PARAMETERIZATIONS}")


def rotations(theta: dict[str, jax.Array], r0: Rotations,
              parameterization: str) -> Rotations:
  """R0 @ P(W / sqrt(n)) for theta = {'r1': W1, 'r2': W2}, and with r0's
  scales, scales0 * exp(theta['log_scales']).

  Args:
    theta: {'r1': f32[D, D], 'r2': f32[L, H, H]} (`zero_theta`), plus
      'log_scales' f32[L, 2, D] when r0 has scales.
    r0: the starting rotations.
    parameterization: see `orthogonal`.

  Returns:
    `Rotations`, equal to r0 when theta is zero.
  """
  p = {name: orthogonal(theta[name] / math.sqrt(theta[name].shape[-1]),
                        parameterization) for name in ("r1", "r2")}
  scales = (None if r0.scales is None
            else r0.scales * jnp.exp(theta["log_scales"]))
  return Rotations(r1=r0.r1 @ p["r1"],
                   r2=jnp.einsum("LHI,LIJ->LHJ", r0.r2, p["r2"]),
                   scales=scales)


def zero_theta(r0: Rotations) -> dict[str, jax.Array]:
  """Parameters that give back `r0` (all zeros; 'log_scales' when r0 has
  scales)."""
  theta = {"r1": jnp.zeros_like(r0.r1), "r2": jnp.zeros_like(r0.r2)}
  if r0.scales is not None:
    theta["log_scales"] = jnp.zeros_like(r0.scales)
  return theta


def orthogonality_error(q: jax.Array) -> jax.Array:
  """max |QᵀQ - I| over f32[..., n, n]."""
  eye = jnp.eye(q.shape[-1], dtype=jnp.float32)
  gram = jnp.einsum("...ij,...ik->...jk", q, q,
                    precision=jax.lax.Precision.HIGHEST)
  return jnp.max(jnp.abs(gram - eye))


def rms_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / rms(x) along the last axis (rotation-invariant rescaling)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def whip_loss(x: jax.Array) -> jax.Array:
  """DartQuant's Whip loss: mean over rows of sum_i exp(-|x_i|).

  Args:
    x: f32[..., n] rotated activations (rows of unit rms).

  Returns:
    f32 scalar.
  """
  return jnp.mean(jnp.sum(jnp.exp(-jnp.abs(x)), axis=-1))


def quant_error_loss(x: jax.Array, spec) -> jax.Array:
  """Mean over rows of |fake_quant(x) - x|² (straight-through gradient).

  Through the straight-through estimator only the clipped values and each
  group's scale (its range) pass a gradient, so this lowers exactly what
  makes the quantization step and the clipping error large.

  Args:
    x: f32[..., n] rotated activations.
    spec: the `quant.QuantSpec` they are quantized with, or None (then 0).

  Returns:
    f32 scalar.
  """
  if spec is None or not spec.enabled:
    return jnp.zeros((), jnp.float32)
  return jnp.mean(jnp.sum((quant.fake_quant(x, spec) - x) ** 2, axis=-1))


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy.

  Args:
    logits: f32[B, T, V].
    tokens: int32[B, T].

  Returns:
    f32 scalar: mean over B and the T - 1 predicted positions.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.mean(nll)


def kl_loss(logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Mean KL(teacher ‖ model) of the next-token distributions.

  The e2e objective's alternative to `next_token_loss` (OSTQuant's choice):
  the quantized network matches the float network's whole distribution at
  every position instead of one sampled next token, a denser signal from
  few calibration windows. No gradient flows into the teacher.

  Args:
    logits: f32[B, T, V] of the network being learned.
    teacher_logits: f32[B, T, V] of the float network on the same tokens.

  Returns:
    f32 scalar: sum over V of p (log p - log q), mean over B and T.
  """
  log_p = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))
