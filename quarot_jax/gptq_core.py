"""GPTQ on one weight matrix: the pure math.

Follows Algorithm 1 of GPTQ (Frantar et al., https://arxiv.org/abs/2210.17323)
as written in spcl/QuaRot `fake_quant/gptq_utils.py` (`GPTQ.fasterquant`,
https://github.com/spcl/QuaRot/blob/main/fake_quant/gptq_utils.py), keeping
its names: W [rows=out, columns=in], H the input Hessian, Hinv the upper
Cholesky factor of H^-1, Q the quantized weights, Err1 the scaled errors of a
block, blocksize, percdamp/damp, perm/invperm, static_groups.

Same semantics as the reference, including its details:
- per-row parameters (no groups) come from W before dead columns are zeroed;
- dead inputs (H[i, i] == 0) get H[i, i] = 1 and W[:, i] = 0;
- dynamic groups re-fit their parameters when a column index is a multiple
  of group_size, from W as it stood at the start of the current block (the
  reference reads `W`, not the in-block copy `W1`);
- static groups fit parameters on contiguous groups of the original columns
  before the act_order permutation.

Differences, all of form, not of result:
- blocks and columns are both `lax.fori_loop`s (static shapes): W and Hinv
  are padded to a multiple of blocksize (the padding is uncoupled: zero
  weights, identity Hinv) and the lazy batch update multiplies the block's
  errors by full-width Hinv rows masked to the later columns;
- all matmuls use Precision.HIGHEST, so GPUs do not drop to TF32;
- the result is a `quant.QArray`; for act_order with dynamic groups the
  groups are not contiguous in the original column order, so the QArray
  carries one scale per element (group_size=1) instead of the reference's
  g_idx. Use static_groups=True for a contiguous-group QArray (kernels).
"""

import functools

import jax
import jax.numpy as jnp

from quarot_jax import quant

_HIGHEST = jax.lax.Precision.HIGHEST


def accumulate_hessian(H: jax.Array, n_seen: jax.Array, x: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """Running update of H = 2/n Σ x xᵀ over all rows seen so far.

  As the reference's `add_batch`: H *= n / (n + m); x *= sqrt(2 / (n + m));
  H += xᵀ x.

  Args:
    H: f32[in, in] current estimate (zeros to start).
    n_seen: int32[] rows folded in so far (0 to start).
    x: float[..., in] new inputs; every leading index is one row.

  Returns:
    (H f32[in, in], n_seen int32[]) updated.
  """
  # [rows, in]
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  total = n_seen + x.shape[0]
  H = H * (n_seen / total).astype(jnp.float32)
  x = jnp.sqrt(2.0 / total).astype(jnp.float32) * x
  return H + jnp.matmul(x.T, x, precision=_HIGHEST), total


def _upper_cholesky_of_inverse(H: jax.Array) -> jax.Array:
  """U upper with H⁻¹ = Uᵀ U (torch: cholesky, cholesky_inverse, upper)."""
  L = jnp.linalg.cholesky(H)
  eye = jnp.eye(H.shape[0], dtype=H.dtype)
  Hinv = jax.scipy.linalg.cho_solve((L, True), eye)
  return jnp.linalg.cholesky(Hinv).T


@functools.partial(jax.jit, static_argnames=("spec", "blocksize",
                                             "act_order", "static_groups"))
def gptq_quantize(W: jax.Array, H: jax.Array, spec: quant.QuantSpec, *,
                  percdamp: float = 0.01, blocksize: int = 128,
                  act_order: bool = False, static_groups: bool = False
                  ) -> tuple[jax.Array, quant.QArray]:
  """Quantizes W with GPTQ (the OBQ error feedback, lazily batched).

  Args:
    W: float[out, in] weights (`kernel.T` in the params layout).
    H: float[in, in] Hessian of the layer inputs (`accumulate_hessian`);
      must be positive definite after dead-column fixing and damping
      (otherwise the result is NaN: no exception under jit).
    spec: the weight quantizer (bits, symmetric, group_size, mse_clip;
      clip_ratio also applies).
    percdamp: dampening as a fraction of the mean diagonal of H.
    blocksize: columns per lazy-update block.
    act_order: process columns by decreasing H diagonal.
    static_groups: with a group_size, fit group parameters once on the
      original W instead of at each group start during the sweep.

  Returns:
    (Q f32[out, in] fake-quantized weights, the same as a `QArray` with
    values [out, in] and scales [out, in // group], or [out, in] with
    group_size=1 for act_order with dynamic groups). Q equals
    `quant.dequantize` of the QArray exactly.

  Raises:
    ValueError: bits == 16, shapes disagree, blocksize < 1, or group_size
      does not divide `in`.
  """
  if not spec.enabled:
    raise ValueError(f"GPTQ needs bits < 16, got bits={spec.bits}")
  rows, columns = W.shape
  if H.shape != (columns, columns):
    raise ValueError(f"H.shape={H.shape} must be ({columns}, {columns}) for"
                     f" W.shape={W.shape}")
  if blocksize < 1:
    raise ValueError(f"blocksize={blocksize} must be positive")
  groupsize = columns if spec.group_size is None else spec.group_size
  if columns % groupsize:
    raise ValueError(f"group_size={groupsize} must divide the input width"
                     f" {columns}")
  n_groups = columns // groupsize
  dynamic = spec.group_size is not None and not static_groups
  W = W.astype(jnp.float32)
  H = H.astype(jnp.float32)

  if spec.group_size is None:
    # [rows, 1]: per-row params from W before dead columns are zeroed.
    scales, zeros = quant.find_params(W, spec)

  dead = jnp.diag(H) == 0
  H = H + jnp.diag(dead.astype(jnp.float32))
  W = jnp.where(dead[None, :], 0.0, W)

  if dynamic:
    # [rows, n_groups], filled in by the sweep at each group start.
    scales = jnp.ones((rows, n_groups), jnp.float32)
    zeros = jnp.zeros((rows, n_groups), jnp.float32)
  elif spec.group_size is not None:
    # [rows, n_groups, 1] on the original contiguous groups (static).
    scales, zeros = quant.find_params(
        W.reshape(rows, n_groups, groupsize), spec)
    scales = scales[..., 0]
    zeros = None if zeros is None else zeros[..., 0]
  if zeros is None:
    zeros = jnp.zeros_like(scales)

  perm = jnp.arange(columns)
  if act_order:
    perm = jnp.argsort(-jnp.diag(H), stable=True)
    W = W[:, perm]
    H = H[perm][:, perm]
  invperm = jnp.argsort(perm)

  damp = percdamp * jnp.mean(jnp.diag(H))
  H = H + damp * jnp.eye(columns, dtype=jnp.float32)
  Hinv = _upper_cholesky_of_inverse(H)

  # Pad to whole blocks with uncoupled columns (zero weight, unit Hinv):
  # upper-triangular Hinv never carries their errors back to real columns.
  blocksize = min(blocksize, columns)
  n_blocks = -(-columns // blocksize)
  padded = n_blocks * blocksize
  pad = padded - columns
  W = jnp.pad(W, ((0, 0), (0, pad)))
  Hinv = jnp.pad(Hinv, ((0, pad), (0, pad)))
  Hinv = Hinv + jnp.diag((jnp.arange(padded) >= columns).astype(jnp.float32))
  perm_padded = jnp.pad(perm, (0, pad))

  def block(b, carry):
    W, codes, scales, zeros = carry
    i1 = b * blocksize
    W1 = jax.lax.dynamic_slice_in_dim(W, i1, blocksize, axis=1)
    Hinv1 = jax.lax.dynamic_slice(Hinv, (i1, i1), (blocksize, blocksize))

    def column(i, carry):
      W1, Q1, Err1, scales, zeros = carry
      col = i1 + i
      if dynamic:
        def refit(sz):
          s, z = quant.find_params(
              jax.lax.dynamic_slice_in_dim(W, col, groupsize, axis=1), spec)
          z = jnp.zeros_like(s) if z is None else z
          return (sz[0].at[:, col // groupsize].set(s[:, 0]),
                  sz[1].at[:, col // groupsize].set(z[:, 0]))
        scales, zeros = jax.lax.cond(
            (col % groupsize == 0) & (col < columns), refit, lambda sz: sz,
            (scales, zeros))
        group = jnp.minimum(col // groupsize, n_groups - 1)
      else:
        group = perm_padded[col] // groupsize
      s, z = scales[:, group], zeros[:, group]
      w = W1[:, i]
      d = Hinv1[i, i]
      code = quant.quantize_codes(w, s, z, spec)
      q = (code - z) * s
      err1 = (w - q) / d
      # Hinv1 is upper triangular: only columns >= i change.
      W1 = W1 - err1[:, None] * Hinv1[i][None, :]
      return (W1, Q1.at[:, i].set(code), Err1.at[:, i].set(err1), scales,
              zeros)

    init = (W1, jnp.zeros_like(W1), jnp.zeros_like(W1), scales, zeros)
    _, Q1, Err1, scales, zeros = jax.lax.fori_loop(0, blocksize, column, init)
    codes = jax.lax.dynamic_update_slice_in_dim(codes, Q1, i1, axis=1)
    # W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:], on full-width masked rows.
    i2 = i1 + blocksize
    Hrows = jax.lax.dynamic_slice_in_dim(Hinv, i1, blocksize, axis=0)
    Hrows = jnp.where(jnp.arange(padded)[None, :] >= i2, Hrows, 0.0)
    W = W - jnp.matmul(Err1, Hrows, precision=_HIGHEST)
    return W, codes, scales, zeros

  init = (W, jnp.zeros_like(W), scales, zeros)
  _, codes, scales, zeros = jax.lax.fori_loop(0, n_blocks, block, init)

  codes = codes[:, :columns][:, invperm]
  group_size = groupsize
  if dynamic and act_order:
    # Column c sat at position invperm[c] of the sweep.
    scales = scales[:, invperm // groupsize]
    zeros = zeros[:, invperm // groupsize]
    group_size = 1
  dtype = jnp.uint8 if not spec.symmetric and spec.bits == 8 else jnp.int8
  qarray = quant.QArray(
      values=codes.astype(dtype), scale=scales,
      zero=None if spec.symmetric else zeros, bits=spec.bits,
      group_size=group_size, symmetric=spec.symmetric)
  return quant.dequantize(qarray), qarray
