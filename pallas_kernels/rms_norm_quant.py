"""RMS norm fused with per-token int4 quantization, in one launch.

  n[m, k] = dtype(dtype(x[m, k] * rsqrt(sum_k x[m, k]² * (1 / K) + eps))
                  * w[k])                      (f32 math, cast to x's dtype)
  s_x[m] = max_k |n[m, k]| * f32(clip_ratio / 7)   (1 where that is 0)
  x_q[m, k] = clip(round_half_even(n[m, k] / s_x[m]), -8, 7)

The norm is `quarot_jax.layers.rms_norm` op for op (x in f32, normalized,
cast to x's dtype, times the weight in f32, cast again; XLA rewrites its
mean's `/ K` as `* f32(1 / K)`, written so here), and the quantizer is
`hadamard_quant`'s without a Hadamard (`quantize_kernel`, QuaRot's symmetric
per-token activation quantizer). The codes come one per int8 byte ([M, K],
what `decode_matmul` takes) or packed (`packed=True`, uint8[M, K // 2] in the
layout of `int4_layout.py`). Matmul-style axes: M rows (tokens), K the
normalized axis (the model's D).

Why: at decode each pre-norm of a layer is two XLA launches (the sum of
squares, then the scaling), each ~3 us, before the quantize launch; this is
one. With `out_rows` the codes also come already padded to the rows
`decode_matmul` pads to (zero codes, scale 1), which saves its pad. The
packed linears run it at prefill too (`qlinear.linears`).

Numerics: equal bit for bit to the unfused path in interpret mode. On the
GPU the sum of squares is added in Triton's order, not XLA's, so
sum_k x² may differ in the last f32 bit; the products are `mul.rn.f32`
(inline PTX) so that no product is contracted into an FMA with the
following add, which XLA's own kernels do not do either.

Measured on the GPU (H200, jax 0.11.2, kernel time from a trace): with a
one-step sum over the flattened row, one row per program took ~210 us (K =
4096; 666 us at 11008) against 4.4 us at two rows, and padding rows came
out as -8 codes when eps = 0 (0 * rsqrt(0) is NaN). With the two-step sum
and padding zeroed after the norm (2026-12-01): 2.4 us at one row (2.8
with 16 output rows; 6.2 at K = 11008), and every GPU setting of `Kernels`
runs it (CI: 'interpret'). Later that day 5 of its GPU tests failed: codes
moved at ties because the scale was multiplied, then divided by 7 (1 ulp
off XLA's folded constant); scales are now `absmax * f32(clip / 7)` as in
`hadamard_quant`, and the GPU tests pass (H200, 2026-12-01, with the
reference's roundings kept, `_round_to`).

Backend: the Pallas Triton lowering, a block of rows per program, each row
viewed as [a, r] like `hadamard_quant.quantize_kernel` (interpret mode on
the CPU). Not supported: bits other than 4 (NotImplementedError), a
Hadamard transform (use `hadamard_quant` after the norm), group scales.
"""

import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import numpy as np

from pallas_kernels import compat
from pallas_kernels import hadamard_quant as hq_lib

RmsNormQuantConfig = hq_lib.HadamardQuantConfig  # num_warps, block_elements


def kernel_takes(k: int) -> bool:
  """Whether the Pallas kernel takes rows of K on a GPU: K even."""
  return k % 2 == 0


def can_use_rms_norm_quant(k: int) -> bool:
  """True where the Pallas kernel compiles: a GPU and `kernel_takes(K)`."""
  return jax.default_backend() == "gpu" and kernel_takes(k)


def _mul(exact: bool):
  """f32 product: `mul.rn.f32` on the GPU (never an FMA), else `*`."""
  if not exact:
    return lambda a, b: a * b

  def mul(a, b):
    a, b = jnp.broadcast_arrays(a, b)
    [out] = plgpu.elementwise_inline_asm(
        "mul.rn.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return out

  return mul


def rms_norm_quant_kernel(x_ref, w_ref, q_ref, s_ref, *, rows: int, ap: int,
                          eps: float, packed: bool, clip_ratio: float,
                          exact: bool):
  """A block of rows: norm, absmax, codes (packed bytes or int8)."""
  # x_ref: [rows_per_program, a, r] (x's dtype); w_ref: [a, r] the norm
  # weight; q_ref: int8[rows_per_program, a, r] or uint8[..., a, r // 2]
  # (packed); s_ref: f32[rows_per_program]. ap = a rounded up to a power
  # of two, its padded rows masked. Rows at or past `rows` (the padding up
  # to `out_rows`) are zero: codes 0, scale 1.
  n_rows, a, r = x_ref.shape
  dtype = x_ref.dtype
  mul = _mul(exact)
  x, mask = hq_lib.load_rows(x_ref, ap)
  w = plgpu.load(w_ref.at[pl.ds(0, ap), :],
                 **({} if ap == a else dict(
                     mask=jnp.broadcast_to((jnp.arange(ap) < a)[:, None],
                                           (ap, r)), other=0)))
  first = pl.program_id(0) * n_rows
  real = (first + jnp.arange(n_rows)) < rows  # [rows_per_program]
  x = jnp.where(real[:, None, None], x, 0.0)
  # layers.rms_norm: mean(x²) (XLA: sum * f32(1 / K)), rsqrt, two casts.
  # [rows_per_program]: the sum over the row (padding adds zeros). On the
  # GPU in two steps, as the absmax of `store_quantized_rows`: one sum over
  # the row flattened took ~210 us at one row per program (K = 4096, H200;
  # 4.4 us at two rows). Interpreted, one sum: XLA's order, bit-exact.
  sq = mul(x, x)
  ss = (jnp.sum(jnp.sum(sq, axis=2), axis=1) if exact
        else jnp.sum(sq.reshape(n_rows, ap * r), axis=1))
  inv_k = jnp.full(ss.shape, np.float32(1) / np.float32(x_ref.shape[1] * r),
                   jnp.float32)
  inv = jax.lax.rsqrt(mul(ss, inv_k) + eps)
  normed = mul(x, jnp.broadcast_to(inv[:, None, None], x.shape))
  # Interpreted on a GPU the body is XLA ops, which drop a convert pair
  # inside a fusion (see `_round_to`); the barrier keeps the rounding.
  rounded = ((lambda v: v.astype(dtype).astype(jnp.float32)) if exact
             else lambda v: _round_to(v, dtype))
  normed = rounded(normed)
  y = mul(jnp.broadcast_to(w.astype(jnp.float32)[None], x.shape), normed)
  # Padding rows are zero after the norm too, as the reference pads its
  # output: with eps = 0 their 0 * rsqrt(0) is NaN, whose clip is -8 on a
  # GPU (0 on a CPU, where XLA converts NaN to 0).
  y = jnp.where(real[:, None, None], rounded(y), 0.0)
  hq_lib.store_quantized_rows(y, q_ref, s_ref, packed=packed,
                              clip_ratio=clip_ratio, mask=mask)


def _check(x: jax.Array, weight: jax.Array, clip_ratio: float, bits: int,
           out_rows: int | None) -> None:
  k = x.shape[-1]
  if bits != 4:
    raise NotImplementedError(f"rms_norm_quant packs int4 only, got {bits=}")
  if x.ndim != 2:
    raise ValueError(f"x must be [M, K], got shape {x.shape}")
  if k % 2:
    raise ValueError(f"K={k} must be even to quantize to int4")
  if weight.shape != (k,):
    raise ValueError(f"weight must be [K]=[{k}], got {weight.shape}")
  if not 0 < clip_ratio <= 1:
    raise ValueError(f"{clip_ratio=} must be in (0, 1]")
  if out_rows is not None and out_rows < x.shape[0]:
    raise ValueError(f"{out_rows=} must be at least M={x.shape[0]}")


@functools.partial(jax.jit, static_argnames=(
    "eps", "clip_ratio", "bits", "packed", "out_rows", "config", "interpret",
    "debug", "implementation"))
def rms_norm_quant(x: jax.Array, weight: jax.Array, *, eps: float,
                   clip_ratio: float = 0.9, bits: int = 4,
                   packed: bool = False, out_rows: int | None = None,
                   config: RmsNormQuantConfig | None = None,
                   interpret: bool = False, debug: bool = False,
                   implementation: Literal["pallas", "xla"] | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """RMS norm, then per-token symmetric int4 quantization, in one launch.

  Args:
    x: float[M, K] un-normalized rows (bf16, f16 or f32); K even.
    weight: float[K] the norm's weight (multiplied in as `rms_norm` does,
      also when it is all ones).
    eps: added to the mean square.
    clip_ratio: fraction of each row's absmax mapped to code 7.
    bits: 4 (the only width the int4 kernels take).
    packed: two codes per byte (uint8[M, K // 2]); False (the default)
      writes one int8 code per element (int8[M, K], `decode_matmul`'s x).
    out_rows: rows of the outputs, >= M (None: M). Rows past M hold zero
      codes and scale 1: the padding `decode_matmul` adds itself.
    config: launch parameters (`num_warps`, `num_stages`,
      `block_elements`).
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    debug: print the kernel's jaxpr.
    implementation: 'pallas', 'xla' (the reference), or None (pallas where
      `can_use_rms_norm_quant` or `interpret`, else the reference; logged).

  Returns:
    (x_q int8[out_rows, K] codes (uint8[out_rows, K // 2] when `packed`),
    s_x f32[out_rows] per-row scales).

  Raises:
    ValueError: x not [M, K], K odd, a weight that is not [K], clip_ratio
      outside (0, 1], or out_rows < M.
    NotImplementedError: bits != 4.
  """
  _check(x, weight, clip_ratio, bits, out_rows)
  m, k = x.shape
  out_rows = m if out_rows is None else out_rows
  if implementation is None:
    implementation = ("pallas" if interpret or can_use_rms_norm_quant(k)
                      else "xla")
    logging.info("rms_norm_quant: using %s", implementation)
  if implementation == "xla" or m == 0:
    return rms_norm_quant_reference(x, weight, eps=eps,
                                    clip_ratio=clip_ratio, packed=packed,
                                    out_rows=out_rows)
  cfg = config or RmsNormQuantConfig()
  a, r = hq_lib._quantize_view(k)
  ap = hq_lib._pow2(a)
  x3 = x.reshape(m, a, r)
  per_program, last = hq_lib._grid_rows(
      m, out_rows, max(1, cfg.block_elements // (ap * r)))
  q_block, q_dtype = ((a, r // 2), jnp.uint8) if packed else ((a, r),
                                                                jnp.int8)
  kernel = functools.partial(rms_norm_quant_kernel, rows=m, ap=ap, eps=eps,
                             packed=packed, clip_ratio=clip_ratio,
                             exact=not interpret)
  x_q, s_x = pl.pallas_call(
      kernel,
      grid=(out_rows // per_program,),
      in_specs=[pl.BlockSpec((per_program, a, r),
                             lambda i: (jnp.minimum(i, last), 0, 0)),
                pl.BlockSpec((a, r), lambda i: (0, 0))],
      out_specs=[pl.BlockSpec((per_program, *q_block), lambda i: (i, 0, 0)),
                 pl.BlockSpec((per_program,), lambda i: (i,))],
      out_shape=[jax.ShapeDtypeStruct((out_rows, *q_block), q_dtype),
                 jax.ShapeDtypeStruct((out_rows,), jnp.float32)],
      compiler_params=compat.triton_params(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      interpret=interpret, debug=debug, name="rms_norm_quant",
  )(x3, weight.reshape(a, r))
  return x_q.reshape(out_rows, -1), s_x


def _round_to(x32: jax.Array, dtype) -> jax.Array:
  """f32 values rounded to `dtype` (kept in f32), a rounding XLA keeps.

  A convert to bf16 and back inside one fusion is dropped by XLA on the GPU
  (`xla_allow_excess_precision`, on by default): the jitted reference then
  quantized the unrounded norm, and 44 of 32768 codes differed from the
  kernel and from `layers.rms_norm` run alone (H200, 2026-12-01). The
  optimization barrier between the two converts keeps the pair apart.
  (`reduce_precision` would too, but it flushes f16 subnormals to zero.)
  """
  if jnp.finfo(dtype).bits >= 32:
    return x32
  return jax.lax.optimization_barrier(x32.astype(dtype)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=(
    "eps", "clip_ratio", "packed", "out_rows"))
def rms_norm_quant_reference(x: jax.Array, weight: jax.Array, *, eps: float,
                             clip_ratio: float = 0.9, packed: bool = False,
                             out_rows: int | None = None
                             ) -> tuple[jax.Array, jax.Array]:
  """Plain-jnp `rms_norm_quant`: `quarot_jax.layers.rms_norm`'s arithmetic,
  then `hadamard_quant_reference` without a Hadamard.

  Args:
    x: float[M, K].
    weight: float[K].
    eps: added to the mean square.
    clip_ratio: fraction of each row's absmax mapped to code 7.
    packed: pack the codes (else int8 codes).
    out_rows: rows of the outputs, >= M (None: M); the extra ones hold
      zero codes and scale 1.

  Returns:
    (x_q int8[out_rows, K] or uint8[out_rows, K // 2], s_x f32[out_rows]).

  Raises:
    ValueError: as `rms_norm_quant`.
  """
  _check(x, weight, clip_ratio, 4, out_rows)
  x32 = x.astype(jnp.float32)
  var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
  normed = _round_to(x32 * jax.lax.rsqrt(var + eps), x.dtype)
  y = _round_to(weight.astype(jnp.float32) * normed, x.dtype).astype(x.dtype)
  if out_rows is not None:
    y = jnp.pad(y, ((0, out_rows - x.shape[0]), (0, 0)))
  return hq_lib.hadamard_quant_reference(y, None, clip_ratio=clip_ratio,
                                         packed=packed)
