"""W4A4 matmul: runs the backend it is told to (tokamax's api.py).

  y[M, N] = (x_q[M, K] · w_q[N, K]ᵀ) * s_x[M, 1] * s_w[1, N]

Backends (the `implementation` argument):
  'mosaic'  Mosaic GPU, Hopper only. int8 codes (what
            `hadamard_quant(..., packed=False)` writes) run
            `mosaic_gpu.w4a4_matmul_mosaic_wt`: the int4 weights are
            wgmma's register operand, widened in registers, the codes come
            from shared memory, and the kernel transposes its yᵀ tiles in
            registers before storing y (1.22-1.31x `w4a4_matmul_mosaic`
            and 0.82-1.08x XLA int8 on the LLaMA-2 7B/13B shapes,
            BENCHMARKS.md).
            Group scales (128G) run the same kernel, one K group per
            pipeline step (packed x is widened to int8 codes by XLA
            first). Packed x with per-token scales runs
            `mosaic_gpu.w4a4_matmul_mosaic` (x widened in registers, the
            weights through shared memory).
  'triton'  `triton.w4a4_matmul_triton` (any GPU, or interpret mode): int8
            codes are packed first.
  'xla'     `reference.w4a4_matmul_reference`: int4 unpacked to int8 and
            XLA's int8 dot (cuBLAS on a GPU).
  None      for direct users: 'mosaic' on a Hopper GPU, 'triton' on other
            GPUs or under `interpret`, else 'xla' (logged). The model never
            passes None: `quarot_jax.kernels.resolve` decided once.
"""

import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import int4_layout
from pallas_kernels.w4a4_matmul import mosaic_gpu
from pallas_kernels.w4a4_matmul import reference
from pallas_kernels.w4a4_matmul import triton

Implementation = Literal["mosaic", "triton", "xla"]
IMPLEMENTATIONS = ("mosaic", "triton", "xla")


def default_implementation(*, interpret: bool = False) -> Implementation:
  """The backend `w4a4_matmul` runs for implementation=None."""
  if not interpret and mosaic_gpu.can_use_w4a4_mosaic():
    return "mosaic"
  if interpret or triton.can_use_w4a4_triton():
    return "triton"
  return "xla"


@functools.partial(jax.jit, static_argnames=(
    "out_dtype", "implementation", "interpret"))
def w4a4_matmul(x_q: jax.Array, w_q: jax.Array, s_x: jax.Array,
                s_w: jax.Array, *, out_dtype=jnp.bfloat16,
                implementation: Implementation | None = None,
                interpret: bool = False,
                residual: jax.Array | None = None) -> jax.Array:
  """y = (x_q · w_qᵀ) * s_x * s_w (+ residual) with the given backend.

  Args:
    x_q: uint8[M, K // 2] packed int4 activations (`int4_layout`), or
      int8[M, K] codes in [-8, 7] (what the Mosaic kernel reads fastest;
      packed here for Triton).
    w_q: uint8[N, K // 2] packed int4 weights.
    s_x: f32[M] per-token scales, or f32[M, G] group scales (one per
      K / G consecutive K values; 'mosaic' needs K / G a multiple of 128).
    s_w: f32[N] per-output-channel scales, or f32[N, G].
    out_dtype: dtype of y.
    implementation: 'mosaic', 'triton', 'xla', or None (see the module
      docstring).
    interpret: run the Triton kernel in interpret mode (CPU tests).
    residual: `out_dtype`[M, N] to add to y (a decoder layer's residual
      stream), or None. 'mosaic' with int8 codes adds it in the epilogue
      (no pass of its own); the others add it after, as XLA's `y +
      residual`: the same numbers for 16-bit outputs (for f32 ones XLA may
      contract the last scale product and the add into an FMA).

  Returns:
    y: [M, N] in `out_dtype` (plus the residual).

  Raises:
    ValueError: an unknown implementation, 'mosaic' with `interpret`, or
      operands that do not fit together.
  """
  if implementation is None:
    implementation = default_implementation(interpret=interpret)
    logging.info("w4a4_matmul: using %s", implementation)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} must be one of"
                     f" {IMPLEMENTATIONS} or None")
  if residual is not None and (
      residual.shape != (x_q.shape[0], w_q.shape[0])
      or residual.dtype != jnp.dtype(out_dtype)):
    raise ValueError(f"residual must be {jnp.dtype(out_dtype).name}"
                     f"{[x_q.shape[0], w_q.shape[0]]} (y's shape and dtype),"
                     f" got {residual.dtype.name}{list(residual.shape)}")
  if implementation == "mosaic":
    if interpret:
      raise ValueError("implementation='mosaic' has no interpret mode; use"
                       " 'triton'")
    if x_q.dtype == jnp.int8 or s_x.ndim == 2 or s_w.ndim == 2:
      return mosaic_gpu.w4a4_matmul_mosaic_wt(x_q, w_q, s_x, s_w,
                                              out_dtype=out_dtype,
                                              residual=residual)
    y = mosaic_gpu.w4a4_matmul_mosaic(x_q, w_q, s_x, s_w,
                                      out_dtype=out_dtype)
  else:
    reference.check_operands(x_q, w_q, s_x, s_w)
    if implementation == "xla":
      y = reference.w4a4_matmul_reference(x_q, w_q, s_x, s_w,
                                          out_dtype=out_dtype)
    else:
      if x_q.dtype == jnp.int8:
        x_q = int4_layout.pack_int4(x_q)
      y = triton.w4a4_matmul_triton(x_q, w_q, s_x, s_w, out_dtype=out_dtype,
                                    interpret=interpret)
  return y if residual is None else y + residual
