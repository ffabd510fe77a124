"""Fused online Hadamard + per-token int4 quantization.

  y = (x * signs) @ H_K / √K          (hadamard=True; y = x otherwise)
  s_x[m] = clip_ratio * max_k |y[m, k]| / 7   (1 where that is 0)
  x_q[m, k] = clip(round_half_even(y[m, k] / s_x[m]), -8, 7)

written as packed int4 in the layout of `quarot_jax/quant.py` (two's
complement nibbles along K, byte j = element 2j in the low nibble, 2j+1 in
the high one): exactly `quant.pack_int4(quant.quantize(y,
quant.activation_spec(4, clip_ratio=c)).values)` and its scales, which is what
`pallas_kernels.int4_matmul` takes. With `packed=False` the codes are written
one per int8 byte instead ([M, K], twice the bytes): the operand the Mosaic
GPU matmul feeds to wgmma from shared memory, where an int4 operand would
have to be widened in registers first (BENCHMARKS.md). Matmul-style axes: M
rows (tokens), K the transformed axis.

The transform as two small matmuls. H_K = np.kron(S_p, B_m) with
(p, m) = hadamard.factorize(K) (S Sylvester, B the base of order m), and
S_p = S_a ⊗ S_b for any a·b = p, so H_K = S_a ⊗ R with R = S_b ⊗ B_m of
order r = b·m. Viewing a row x[K] as X[a, r] (row-major, a free reshape),
  (x @ H_K) viewed as [a, r] = S_aᵀ · X · R
(S_a is symmetric). b is chosen so that r is even and both orders are small
(r, a <= 256 for every LLaMA width). Packing needs no interleave: the even
output columns are X · R[:, 0::2] and the odd ones X · R[:, 1::2], and as r
is even, column parity inside the [a, r] view is the parity of k. So each
program computes Y_even, Y_odd [a, r/2], their absmax, the codes, and one
byte per pair (unpacked output splits R into its first and second halves of
columns instead, two stores).

Without the Hadamard a separate kernel (`quantize_kernel`) has no dots: it
quantizes a block of rows (`block_elements`) and splits the codes into even
and odd elements in registers for the pack (an identity "transform" ran two
dots per row and was slower than XLA, BENCHMARKS.md).

Precision: the ±1 and 0/1 matrices are exact in bf16, so X · R (bf16 x, f32
accumulation) loses nothing; its f32 result is split into bf16 high and low
parts for the left product (two dots), which keeps ~16 mantissa bits. f32
inputs (CPU tests) use f32 dots at HIGHEST precision throughout.

Backend: the Pallas Triton lowering, a few rows per program
(`rows_per_program`) sharing one load of the transform matrices (interpret
mode on the CPU). Not supported: bits other than 4 (NotImplementedError), group
scales along K, K without a Hadamard matrix of that order.
"""

import dataclasses
import functools
import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import numpy as np

from quarot_jax import compat
from quarot_jax import hadamard as hadamard_lib

_MAX_ORDER = 256  # largest r or a the split aims for


@dataclasses.dataclass(frozen=True, kw_only=True)
class HadamardQuantConfig:
  """Launch parameters.

  Attributes:
    num_warps: warps per program.
    num_stages: Triton pipelining stages.
    rows_per_program: most rows one program transforms (a power of two; the
      largest one dividing M that is at most this is used, so no padding).
    block_elements: quantize-only kernel (no Hadamard): rows per program are
      the most (a power of two dividing M) whose padded elements fit in this.
  """

  num_warps: int = 4
  num_stages: int = 1
  rows_per_program: int = 1  # 4-8 won only at M2048 K4096 (BENCHMARKS.md)
  block_elements: int = 8192

  def __post_init__(self):
    for name in ("rows_per_program", "block_elements"):
      n = getattr(self, name)
      if n < 1 or n & (n - 1):
        raise ValueError(f"{name}={n} must be a power of two")


def _split(k: int) -> tuple[int, int, int]:
  """(a, b, m): the Hadamard kernel views a row as [a, r] with r = b * m.

  Picks the b that keeps a + r smallest with r even, r >= 32 and a >= 16
  (Triton's smallest dot is 16 wide); rows too short for that use a = 1
  (no left product).
  """
  p, m = hadamard_lib.factorize(k)
  options = [(p // b + b * m, b) for b in (2**i for i in range(
      p.bit_length())) if (b * m) % 2 == 0 and b * m >= 32 and p // b >= 16]
  if not options:
    return 1, p, m
  b = min(options)[1]
  return p // b, b, m


def _pow2(n: int) -> int:
  return 1 << (n - 1).bit_length()


def _quantize_view(k: int) -> tuple[int, int]:
  """(a, r) for the quantize-only kernel: a row viewed as [a, r], r the
  largest power of two dividing K up to 1024 (Triton blocks are powers of
  two; only a is padded, by masking)."""
  r = min(k & -k, 1024)
  return k // r, r


@functools.lru_cache(maxsize=None)
def _matrices(k: int) -> tuple[np.ndarray, np.ndarray]:
  """(left [a, a], right [r, r]) as f32."""
  a, b, m = _split(k)
  # pylint: disable-next=protected-access
  right = np.kron(hadamard_lib.sylvester(b), hadamard_lib._base_matrix(m))
  left = hadamard_lib.sylvester(a).T
  return left.astype(np.float32), right.astype(np.float32)


def can_use_hadamard_quant(k: int, use_hadamard: bool = True) -> bool:
  """True where the Pallas kernel compiles: a GPU backend and K even; with
  the Hadamard also a row split into [a, r] with both matmuls at least 16
  wide (K >= 512 or so)."""
  if jax.default_backend() != "gpu" or k % 2:
    return False
  if not use_hadamard:
    return True
  if not hadamard_lib.is_supported(k):
    return False
  a, b, m = _split(k)
  return _pow2(a) >= 16 and _pow2(b * m) >= 32


def _round_half_even(v: jax.Array) -> jax.Array:
  """jnp.round (ties to even) from floor: Triton has no round primitive."""
  f = jnp.floor(v)
  diff = v - f
  f_is_odd = (f - 2.0 * jnp.floor(f * 0.5)) != 0
  up = (diff > 0.5) | ((diff == 0.5) & f_is_odd)
  return jnp.where(up, f + 1.0, f)


def hadamard_quant_kernel(x_ref, sign_ref, left_ref, *refs, packed: bool,
                          use_left: bool, use_signs: bool, norm: float,
                          clip_ratio: float):
  """A few rows: transform, absmax, codes, packed bytes (or int8 codes)."""
  # x_ref: [rows, a, r]; sign_ref: f32[ap, rp]; left_ref: [ap, ap]; r0_ref,
  # r1_ref: [rp, rp // 2], the even and odd columns of R (packed) or its
  # first and second halves; q_ref: uint8[rows, a, r // 2] (packed) or
  # int8[rows, a, 2, r // 2] (the halves; in memory the same as [a, r]);
  # s_ref: f32[rows] (ap, rp: a, r rounded up to powers of two, as Triton
  # needs; the padded rows and columns of the matrices are zero).
  *right_refs, q_ref, s_ref = refs
  n_rows, a, r = x_ref.shape
  ap, rp = sign_ref.shape
  dt = right_refs[0].dtype
  # The matrices are loaded once per program and reused for every row (one
  # row per program spent more L2 traffic on them than on x).
  rights = [ref[...] for ref in right_refs]
  left = left_ref[...] if use_left else None
  signs = sign_ref[...] if use_signs else None
  valid = jnp.arange(ap)[:, None] < a
  mask = valid & (jnp.arange(rp // 2)[None, :] < r // 2)
  dot = functools.partial(jax.lax.dot, precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
  scales = jnp.zeros((n_rows,), jnp.float32)
  for i in range(n_rows):
    row = jnp.int32(i)  # interpret mode's load/store reject a Python int
    x = plgpu.load(x_ref.at[row, pl.ds(0, ap), pl.ds(0, rp)],
                   mask=valid & (jnp.arange(rp)[None, :] < r), other=0)
    if use_signs:
      x = x.astype(jnp.float32) * signs
    x = x.astype(dt)
    halves = [dot(x, right) for right in rights]  # f32 [ap, rp // 2]
    if use_left:
      if dt == jnp.float32:
        halves = [dot(left, z) for z in halves]
      else:  # 16-bit: split the f32 intermediate so the left dot stays exact
        split = []
        for z in halves:
          z_hi = z.astype(dt)
          z_lo = (z - z_hi.astype(jnp.float32)).astype(dt)
          split.append(dot(left, z_hi) + dot(left, z_lo))
        halves = split
    ys = [z * norm for z in halves]
    absmax = functools.reduce(jnp.maximum,
                              [jnp.max(jnp.abs(y)) for y in ys])
    scale = clip_ratio * absmax / 7.0
    scale = jnp.where(scale > 0, scale, 1.0)
    codes = [jnp.clip(_round_half_even(y / scale), -8, 7).astype(jnp.int32)
             for y in ys]
    if packed:
      out = ((codes[0] & 0xF) | ((codes[1] & 0xF) << 4)).astype(jnp.uint8)
      plgpu.store(q_ref.at[row, pl.ds(0, ap), pl.ds(0, rp // 2)], out,
                  mask=mask)
    else:  # Two half-width stores keep the dots the packed kernel's size.
      for h, half in enumerate(codes):
        plgpu.store(
            q_ref.at[row, pl.ds(0, ap), pl.ds(h, 1), pl.ds(0, rp // 2)],
            half.astype(jnp.int8)[:, None, :], mask=mask[:, None, :])
    scales = jnp.where(jnp.arange(n_rows) == i, scale, scales)
  s_ref[...] = scales


def quantize_kernel(x_ref, sign_ref, q_ref, s_ref, *, packed: bool,
                    use_signs: bool, clip_ratio: float):
  """Quantize only: a block of rows, no dots; the pack splits each row's
  codes into even and odd elements in registers (reshape + unstack)."""
  # x_ref: [rows, a, r]; sign_ref: f32[ap, r]; q_ref: uint8[rows, a, r // 2]
  # (packed) or int8[rows, a, r]; s_ref: f32[rows]. ap = a rounded up to a
  # power of two, its padded rows masked.
  n_rows, a, r = x_ref.shape
  ap = sign_ref.shape[0]
  valid = None
  if ap != a:
    valid = (jnp.arange(ap) < a)[None, :, None]
  mask = lambda width: (None if valid is None else
                        jnp.broadcast_to(valid, (n_rows, ap, width)))
  masked = {} if valid is None else dict(mask=mask(r), other=0)
  y = plgpu.load(x_ref.at[:, pl.ds(0, ap), :], **masked).astype(jnp.float32)
  if use_signs:
    y = y * sign_ref[...][None]
  absmax = jnp.max(jnp.max(jnp.abs(y), axis=2), axis=1)
  scale = clip_ratio * absmax / 7.0
  scale = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(_round_half_even(y / scale[:, None, None]), -8, 7
                   ).astype(jnp.int32)
  if packed:
    even, odd = jnp.unstack(codes.reshape(n_rows, ap, r // 2, 2), axis=-1)
    out = ((even & 0xF) | ((odd & 0xF) << 4)).astype(jnp.uint8)
  else:
    out = codes.astype(jnp.int8)
  plgpu.store(q_ref.at[:, pl.ds(0, ap), :], out, mask=mask(out.shape[-1]))
  s_ref[...] = scale


def _quantize_only(x: jax.Array, signs: jax.Array | None, clip_ratio: float,
                   packed: bool, cfg: HadamardQuantConfig, interpret: bool,
                   debug: bool) -> tuple[jax.Array, jax.Array]:
  """`hadamard_quant(hadamard=False)` with `quantize_kernel`."""
  k = x.shape[-1]
  lead = x.shape[:-1]
  a, r = _quantize_view(k)
  ap = _pow2(a)
  x3 = x.reshape(-1, a, r)
  rows = x3.shape[0]
  per_program = math.gcd(rows, max(1, cfg.block_elements // (ap * r))
                         ) if rows else 1
  sign = (jnp.ones((a, r), jnp.float32) if signs is None
          else signs.astype(jnp.float32).reshape(a, r))
  sign = jnp.pad(sign, [(0, ap - a), (0, 0)])
  q_block, q_dtype = ((a, r // 2), jnp.uint8) if packed else ((a, r),
                                                                jnp.int8)
  kernel = functools.partial(quantize_kernel, packed=packed,
                             use_signs=signs is not None,
                             clip_ratio=clip_ratio)
  x_q, s_x = pl.pallas_call(
      kernel,
      grid=(rows // per_program,),
      in_specs=[pl.BlockSpec((per_program, a, r), lambda i: (i, 0, 0)),
                pl.BlockSpec((ap, r), lambda i: (0, 0))],
      out_specs=[pl.BlockSpec((per_program, *q_block), lambda i: (i, 0, 0)),
                 pl.BlockSpec((per_program,), lambda i: (i,))],
      out_shape=[jax.ShapeDtypeStruct((rows, *q_block), q_dtype),
                 jax.ShapeDtypeStruct((rows,), jnp.float32)],
      compiler_params=compat.triton_params(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      interpret=interpret, debug=debug, name="hadamard_quant_no_transform",
  )(x3, sign)
  return x_q.reshape(*lead, -1), s_x.reshape(lead)


@functools.partial(jax.jit, static_argnames=(
    "hadamard", "clip_ratio", "bits", "packed", "config", "interpret",
    "debug", "implementation"))
def hadamard_quant(x: jax.Array, *, hadamard: bool = True,
                   signs: jax.Array | None = None, clip_ratio: float = 0.9,
                   bits: int = 4, packed: bool = True,
                   config: HadamardQuantConfig | None = None,
                   interpret: bool = False, debug: bool = False,
                   implementation: Literal["pallas", "xla"] | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Online Hadamard (optional) and per-token symmetric int4 quantization.

  Args:
    x: float[..., K] activations (bf16, f16 or f32); K even.
    hadamard: apply x @ H_K / √K first (H_K = `hadamard.hadamard_matrix(K)`).
    signs: optional f32[K] of ±1 multiplied into x before the transform
      (a randomized Hadamard diag(signs) · H).
    clip_ratio: fraction of each row's absmax mapped to the largest code.
    bits: 4 (the only width the packed kernels take).
    packed: two codes per byte (uint8[..., K // 2]); False writes one int8
      code per element (int8[..., K]).
    config: launch parameters.
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    debug: print the kernel's jaxpr.
    implementation: 'pallas', 'xla' (the reference) or None (pallas on a GPU
      or when interpret=True, else the reference).

  Returns:
    (x_q uint8[..., K // 2] packed int4 (int8[..., K] codes when not
    `packed`), s_x f32[...] per-row scales).

  Raises:
    ValueError: K odd, K without a Hadamard matrix, clip_ratio outside
      (0, 1], or signs of the wrong shape.
    NotImplementedError: bits != 4.
  """
  k = x.shape[-1]
  if bits != 4:
    raise NotImplementedError(f"hadamard_quant packs int4 only, got {bits=}")
  if k % 2:
    raise ValueError(f"K={k} must be even to pack int4")
  if not 0 < clip_ratio <= 1:
    raise ValueError(f"{clip_ratio=} must be in (0, 1]")
  if hadamard and not hadamard_lib.is_supported(k):
    raise ValueError(f"no Hadamard matrix of order K={k} (see"
                     " quarot_jax.hadamard.factorize)")
  if signs is not None and signs.shape != (k,):
    raise ValueError(f"signs must be [K]=[{k}], got {signs.shape}")
  if implementation is None:
    implementation = ("pallas" if interpret
                      or can_use_hadamard_quant(k, hadamard) else "xla")
    logging.info("hadamard_quant: using %s", implementation)
  if implementation == "xla":
    return hadamard_quant_reference(x, hadamard=hadamard, signs=signs,
                                    clip_ratio=clip_ratio, packed=packed)
  cfg = config or HadamardQuantConfig()
  if not hadamard:
    return _quantize_only(x, signs, clip_ratio, packed, cfg, interpret, debug)
  lead = x.shape[:-1]
  a, b, m = _split(k)
  r = b * m
  ap, rp = _pow2(a), _pow2(r)
  x3 = x.reshape(-1, a, r)  # [M, a, r]: row element k = i * r + j
  rows = x3.shape[0]
  per_program = math.gcd(rows, cfg.rows_per_program) if rows else 1
  # ±1 and 0/1 are exact in every float dtype; 16-bit inputs keep theirs.
  dt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
  left, right = _matrices(k)
  rights = ((right[:, 0::2], right[:, 1::2]) if packed
            else (right[:, :r // 2], right[:, r // 2:]))
  q_block, q_dtype = ((a, r // 2), jnp.uint8) if packed else (
      (a, 2, r // 2), jnp.int8)
  pad = lambda t, shape: jnp.asarray(
      np.pad(t, [(0, n - d) for d, n in zip(t.shape, shape)]), dt)
  sign = (jnp.ones((a, r), jnp.float32) if signs is None
          else signs.astype(jnp.float32).reshape(a, r))
  sign = jnp.pad(sign, [(0, ap - a), (0, rp - r)])
  kernel = functools.partial(
      hadamard_quant_kernel, packed=packed, use_left=a > 1,
      use_signs=signs is not None,
      norm=float(np.float32(1.0 / math.sqrt(k))),
      clip_ratio=clip_ratio)
  full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  x_q, s_x = pl.pallas_call(
      kernel,
      grid=(rows // per_program,),
      in_specs=[pl.BlockSpec((per_program, a, r), lambda i: (i, 0, 0)),
                full((ap, rp)), full((ap, ap))]
      + [full((rp, rp // 2))] * 2,
      out_specs=[pl.BlockSpec((per_program, *q_block),
                              lambda i: (i,) + (0,) * len(q_block)),
                 pl.BlockSpec((per_program,), lambda i: (i,))],
      out_shape=[jax.ShapeDtypeStruct((rows, *q_block), q_dtype),
                 jax.ShapeDtypeStruct((rows,), jnp.float32)],
      compiler_params=compat.triton_params(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      interpret=interpret, debug=debug, name="hadamard_quant",
  )(x3, sign, pad(left, (ap, ap)),
    *[pad(t, (rp, rp // 2)) for t in rights])
  return x_q.reshape(*lead, -1), s_x.reshape(lead)


def hadamard_quant_reference(x: jax.Array, *, hadamard: bool = True,
                             signs: jax.Array | None = None,
                             clip_ratio: float = 0.9, packed: bool = True
                             ) -> tuple[jax.Array, jax.Array]:
  """Plain-jnp `hadamard_quant`: transform in f32, quantize, pack (or keep
  int8 codes when not `packed`)."""
  from quarot_jax import quant  # pylint: disable=g-import-not-at-top
  y = x.astype(jnp.float32)
  if signs is not None:
    y = y * signs.astype(jnp.float32)
  if hadamard:
    y = hadamard_lib.fast_hadamard_transform(y)
  q = quant.quantize(y, quant.activation_spec(4, clip_ratio=clip_ratio))
  codes = q.values.astype(jnp.int8)
  return (quant.pack_int4(codes) if packed else codes), q.scale[..., 0]
