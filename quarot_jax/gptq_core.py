"""GPTQ on one weight matrix: the pure math.

Follows Algorithm 1 of GPTQ (Frantar et al., arXiv 2210.17323) as written in
spcl/QuaRot `fake_quant/gptq_utils.py` (`GPTQ.fasterquant`), keeping its
names: W [rows=out, columns=in], H the input Hessian, Hinv the upper Cholesky
factor of H⁻¹, Q the quantized weights, Err1 the scaled errors of a block.

Differences from the reference, both for a layout the kernels can use:
- with `act_order` and a `group_size`, groups are static (the reference's
  `static_groups=True`): scales come from contiguous groups of the original
  columns, so the result is an ordinary groupwise `QArray`;
- the column loop is a `lax.fori_loop` inside a Python loop over blocks.
"""

import functools

import jax
import jax.numpy as jnp

from quarot_jax import quant


def accumulate_hessian(H: jax.Array, n_seen: jax.Array, x: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """Running H = 2/n Σ xᵀx over all rows seen so far.

  Args:
    H: f32[in, in] current estimate.
    n_seen: int32[] rows folded in so far.
    x: [..., in] new inputs (every leading index is one row).

  Returns:
    (H, n_seen) updated.
  """
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  n_new = x.shape[0]
  total = n_seen + n_new
  H = H * (n_seen / total)
  x = jnp.sqrt(2.0 / total) * x
  return H + x.T @ x, total


def _col_params(w: jax.Array, spec: quant.QuantSpec):
  """Scale, zero f32[rows] for the columns block w [rows, g]."""
  xg = w[:, None, :]
  shrink = quant._mse_shrink(xg, spec) if spec.mse_clip else 1.0  # pylint: disable=protected-access
  scale, zero = quant._params(xg, spec, shrink)  # pylint: disable=protected-access
  zero = jnp.zeros_like(scale) if zero is None else zero
  return scale[:, 0, 0], zero[:, 0, 0]


def _fq(w, scale, zero, spec: quant.QuantSpec):
  """Fake-quantizes a column w [rows] with scale/zero [rows, 1]."""
  w = w[:, None]
  if spec.symmetric:
    q = jnp.clip(jnp.round(w / scale), -(spec.maxq + 1), spec.maxq)
  else:
    q = jnp.clip(jnp.round(w / scale) + zero, 0, spec.maxq)
  return ((q - zero) * scale)[:, 0]


@functools.partial(jax.jit, static_argnames=("spec", "blocksize",
                                             "act_order"))
def gptq_quantize(W: jax.Array, H: jax.Array, spec: quant.QuantSpec, *,
                  percdamp: float = 0.01, blocksize: int = 128,
                  act_order: bool = False
                  ) -> tuple[jax.Array, quant.QArray]:
  """Quantizes W with GPTQ.

  Args:
    W: f32[out, in] weights (`kernel.T` in our layout).
    H: f32[in, in] Hessian of the layer inputs (`accumulate_hessian`).
    spec: the weight quantizer (bits, symmetric, group_size, mse_clip).
    percdamp: dampening as a fraction of the mean diagonal of H.
    blocksize: columns per lazy-update block.
    act_order: process columns by decreasing H diagonal.

  Returns:
    (Q f32[out, in] fake-quantized weights, the same as a `QArray` with
    values [out, in] and scales [out, in // group]).

  Raises:
    ValueError: group_size does not divide `in`.
  """
  W = W.astype(jnp.float32)
  H = H.astype(jnp.float32)
  rows, columns = W.shape
  g = columns if spec.group_size is None else spec.group_size
  if columns % g:
    raise ValueError(f"group_size={g} must divide the input width {columns}")
  n_groups = columns // g

  dead = jnp.diag(H) == 0
  H = H + jnp.diag(dead.astype(jnp.float32))
  W = jnp.where(dead[None, :], 0.0, W)

  # Static parameters: per row from all of W (no groups), or per original
  # contiguous group (act_order with groups).
  static_scale, static_zero = jax.vmap(
      lambda wg: _col_params(wg, spec), in_axes=1, out_axes=1)(
          W.reshape(rows, n_groups, g))  # [rows, n_groups]
  dynamic_groups = spec.group_size is not None and not act_order

  perm = jnp.arange(columns)
  if act_order:
    perm = jnp.argsort(-jnp.diag(H))
    W = W[:, perm]
    H = H[perm][:, perm]
  invperm = jnp.argsort(perm)

  damp = percdamp * jnp.mean(jnp.diag(H))
  H = H + damp * jnp.eye(columns, dtype=jnp.float32)
  L = jnp.linalg.cholesky(H)
  Hinv = jnp.linalg.inv(L).T @ jnp.linalg.inv(L)  # H⁻¹
  Hinv = jnp.linalg.cholesky(Hinv).T  # upper factor, as the reference

  Q = jnp.zeros_like(W)
  scales, zeros = static_scale, static_zero
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    count = i2 - i1
    W_block_start = W  # the reference reads group params from this W
    Hinv1 = Hinv[i1:i2, i1:i2]

    def column(i, carry, i1=i1, Hinv1=Hinv1, W_start=W_block_start):
      W1, Q1, Err1, scales, zeros = carry
      col = i1 + i
      if dynamic_groups:
        def refit(sz):
          s, z = _col_params(
              jax.lax.dynamic_slice_in_dim(W_start, col, g, axis=1), spec)
          return (sz[0].at[:, col // g].set(s), sz[1].at[:, col // g].set(z))
        scales, zeros = jax.lax.cond(col % g == 0, refit, lambda sz: sz,
                                     (scales, zeros))
      group = perm[col] // g
      s, z = scales[:, group][:, None], zeros[:, group][:, None]
      w = W1[:, i]
      d = Hinv1[i, i]
      q = _fq(w, s, z, spec)
      err1 = (w - q) / d
      # Only columns >= i change: Hinv1 is upper triangular.
      W1 = W1 - err1[:, None] * Hinv1[i][None, :]
      return (W1, Q1.at[:, i].set(q), Err1.at[:, i].set(err1), scales,
              zeros)

    init = (W[:, i1:i2], jnp.zeros((rows, count)), jnp.zeros((rows, count)),
            scales, zeros)
    W1, Q1, Err1, scales, zeros = jax.lax.fori_loop(0, count, column, init)
    Q = Q.at[:, i1:i2].set(Q1)
    W = W.at[:, i2:].add(-Err1 @ Hinv[i1:i2, i2:])
    del W1

  Q = Q[:, invperm]
  qz = zeros if not spec.symmetric else jnp.zeros_like(scales)
  codes = jnp.round(Q.reshape(rows, n_groups, g) / scales[..., None]
                    + qz[..., None]).reshape(rows, columns)
  qarray = quant.QArray(
      values=codes.astype(jnp.int8 if spec.symmetric or spec.bits < 8
                          else jnp.uint8),
      scale=scales, zero=None if spec.symmetric else zeros,
      bits=spec.bits, group_size=g)
  return Q, qarray
