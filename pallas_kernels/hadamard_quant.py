"""Fused online Hadamard + per-token int4 quantization.

  y = x @ H_K / √K          (a Hadamard base given; y = x otherwise)
  s_x[m] = max_k |y[m, k]| * f32(clip_ratio / 7)   (1 where that is 0)
  x_q[m, k] = clip(round_half_even(y[m, k] / s_x[m]), -8, 7)

written as packed int4 in the layout of `pallas_kernels/int4_layout.py`
(two's complement nibbles along K, byte j = element 2j in the low nibble,
2j+1 in the high one): QuaRot's symmetric per-token activation quantizer
(`quarot_jax.quant.activation_spec(4, clip_ratio=c)`, the same arithmetic
step for step) packed, which is what `w4a4_matmul` takes. With
`packed=False` the codes are written one per int8 byte instead ([M, K],
twice the bytes): the operand the Mosaic GPU matmul feeds to wgmma from
shared memory, where an int4 operand would have to be widened in registers
first (BENCHMARKS.md). Matmul-style axes: M rows (tokens), K the transformed
axis.

The Hadamard matrix comes from the caller as its base: H_K = np.kron(S_p,
B_m) with S Sylvester (built here) and B_m the ±1 base of order m = K / p
(`hadamard_base`; the library builds it with `quarot_jax.hadamard`, which
has the constructions). The transform as two small matmuls: S_p = S_a ⊗ S_b
for any a·b = p, so H_K = S_a ⊗ R with R = S_b ⊗ B_m of order r = b·m.
Viewing a row x[K] as X[a, r] (row-major, a free reshape),
  (x @ H_K) viewed as [a, r] = S_aᵀ · X · R
(S_a is symmetric). b is chosen so that r is even and both orders are small
(r, a <= 256 for every LLaMA width). Packing needs no interleave: the even
output columns are X · R[:, 0::2] and the odd ones X · R[:, 1::2], and as r
is even, column parity inside the [a, r] view is the parity of k. So each
program computes Y_even, Y_odd [a, r/2], their absmax, the codes, and one
byte per pair (unpacked output multiplies by R whole and stores int8).
Triton blocks are powers of two, and r need not be one (r = 172 at K =
11008): the dots run over pieces of r (`_pieces`: 172 -> 128 + 64 along
R's rows, column pieces of at most 128), summed in a fixed order, rather
than over r padded to 256, which did 2.2x the work (K = 11008 int8 codes,
H200, 2026-12-04: M = 8192 0.688 -> 0.326 ms, M = 32768 2.714 -> 1.264).

Many rows at K >= 8192 (prefill's down_proj input): a persistent grid,
two programs an SM (`programs_per_sm`), each looping over rows p, p + P,
... with R and S_a loaded once (`hadamard_quant_loop_kernel`), the row's
arithmetic the row grid's (`_quantized_row`, the same bits): 0.90-0.92x
the row grid's time at K = 11008, slower at 4096 (H100, 2026-12-07).
Triton's pipelining of the loop (num_stages 2-3) was slower still.

Few rows (decode, M <= 16): one program per row leaves most SMs idle (at
M = 1 one SM runs all of the row's dots, once per layer). There the split
path runs two launches. `hadamard_split_kernel`, on an (M, G) grid:
program (i, g) loads all of row i as X[a, r], multiplies it by slice g of
R's columns (r_p / G wide, r_p = r padded to a power of two), applies the
left product to that slice with the same hi/lo split, stores the f32 slice
of y and its max |y| (f32[M, G], the partial absmax). Then
`quantize_chunk_kernel`, on an (M, C) grid: program (i, c) takes chunk c of
row i (`chunk_elements`, 2048 by default: C = 6 at K = 11008, 7 at
14336), forms the row's absmax from its G partial maxima, the scale, the
codes and bytes of its chunk; program (i, 0) writes the scale. Why
(issue #14): the quantizer it replaces (`quantize_kernel`, at M = 1 one
program reading and reducing the whole f32 row) took 5.9 us a layer on the
H200 at the down_proj input, latency bound, more than the split transform
(4.5 us); the partial maxima spare the chunks a second reduction over the
row. The chunked quantizer: 1.7 us a layer (H200, B = 1, 2026-12-01). Each
element of y, the absmax (a max, in any order the same) and the
quantizer's arithmetic (`_row_scales`, `_store_codes`, shared with the
other kernels) are the fused kernel's, so the codes and scales are the
same bits (interpret mode). The cost over the fused kernel: a second
launch and the f32 y written and read once (4 bytes per element, ~44 KB
per row at K = 11008). A split forced past 16 rows (an explicit G)
quantizes with `quantize_kernel` instead, so prefill-sized M gets no more
programs than rows. The config's `column_splits` and `column_splits()`
choose G (1: the fused kernel).
Measured in the 7B decode step (H200, 2026-12-01, B = 1, with the old
quantizer): at K = 11008 split + quantize 3.8 + 4.7 us a layer against
15.3 us fused; at K = 4096 4.6 us against 3.7 fused. So the automatic rule
splits only K >= 8192 and 16-bit inputs: on the GPU the f32 split cases
failed their test (two; a third ran past the time limit; not diagnosed),
while the bf16/f16 cases at r = 172 (as at 11008) passed.

SwiGLU (`gate_up=True`, a prefill's down_proj input): x is the fused
gate/up output [M, 2K] and the fused kernel loads each piece of gate and
of up and forms `swiglu` there, so the model runs no SwiGLU pass of its
own (1.08-1.10x the pass + this kernel at K = 11008, M = 2048-8192, H100,
2026-12-05, BENCHMARKS.md); the split path and the quantize-only kernel
take the SwiGLU computed before them.

Without the Hadamard a separate kernel (`quantize_kernel`) has no dots: it
quantizes a block of rows (`block_elements`) and splits the codes into even
and odd elements in registers for the pack (an identity "transform" ran two
dots per row and was slower than XLA, BENCHMARKS.md).

Precision: the ±1 and 0/1 matrices are exact in bf16, so X · R (bf16 x, f32
accumulation) loses nothing; its f32 result is split into bf16 high and low
parts for the left product (two dots), which keeps ~16 mantissa bits. f32
inputs (CPU tests) use f32 dots at HIGHEST precision throughout.

Backend: the Pallas Triton lowering, a few rows per program
(`rows_per_program`) sharing one load of the transform matrices, or the
split path for few rows (interpret mode on the CPU). Not supported: bits
other than 4 (NotImplementedError), group scales along K, a base whose
order m leaves K / m not a power of two.
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

from pallas_kernels import compat
from pallas_kernels import device_info
from pallas_kernels import int4_layout


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
    column_splits: G, the programs per row of the split path (the transform
      in G slices of R's columns, then the chunked quantize; see the
      module docstring): None picks it from M (`column_splits`), 1 never
      splits, a power of two G > 1 always splits (capped so that each slice
      is at least 16 columns wide, Triton's smallest dot).
    chunk_elements: split path at M <= 16: elements of a row each quantize
      program takes (a power of two; whole rows of the [a, r] view, at
      least one).
    programs_per_sm: the fused Hadamard kernel's grid: 0 runs a program
      per block of `rows_per_program` rows; n > 0 a persistent grid of
      n programs per SM, each looping over its rows with the matrices
      loaded once (`hadamard_quant_loop_kernel`), where there are more
      rows than programs (else the row grid); None (the default) picks
      (`programs_per_sm()`).
    piece_multiple: the fused Hadamard kernel's dots cover R's order
      rounded up to this (32 or 16; `_pieces`): at r = 172 (K = 11008)
      32 gives pieces 128 + 64, 16 gives 128 + 32 + 16 (8% less padded
      work, more and smaller dots).
  """

  num_warps: int = 4
  num_stages: int = 1
  rows_per_program: int = 1  # 4-8 won only at M2048 K4096 (BENCHMARKS.md)
  block_elements: int = 8192
  column_splits: int | None = None
  chunk_elements: int = 2048
  programs_per_sm: int | None = None
  piece_multiple: int = 32

  def __post_init__(self):
    if self.piece_multiple not in (16, 32):
      raise ValueError(f"piece_multiple={self.piece_multiple!r} must be 16"
                       " or 32")
    n = self.programs_per_sm
    if n is not None and (not isinstance(n, int) or n < 0):
      raise ValueError(f"programs_per_sm={n!r} must be None or an int >= 0")
    for name in ("rows_per_program", "block_elements", "chunk_elements"):
      n = getattr(self, name)
      if n < 1 or n & (n - 1):
        raise ValueError(f"{name}={n} must be a power of two")
    n = self.column_splits
    if n is not None and (not isinstance(n, int) or n < 1 or n & (n - 1)):
      raise ValueError(f"column_splits={n!r} must be None or a power of two")


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """`silu(gate) * up` in f32, rounded to gate's dtype: the LLaMA FFN
  activation ([..., F], [..., F] -> [..., F]). The model's
  `quarot_jax.layers.swiglu` is this function, and `hadamard_quant(...,
  gate_up=True)` applies it inside its kernel, so both round alike."""
  g32 = gate.astype(jnp.float32)
  return (jax.nn.silu(g32) * up.astype(jnp.float32)).astype(gate.dtype)


def _swiglu_halves(x: jax.Array) -> jax.Array:
  """swiglu of x [..., 2F] = gate | up (the fused gate/up linear's output)."""
  gate, up = jnp.split(x, 2, axis=-1)
  return swiglu(gate, up)


def sylvester(n: int) -> np.ndarray:
  """Sylvester's Hadamard matrix S_n = S_2 ⊗ S_{n/2}, S_1 = [[1]].

  Args:
    n: a power of two.

  Returns:
    f32[n, n] with ±1 entries (symmetric).

  Raises:
    ValueError: n is not a power of two.
  """
  if n < 1 or n & (n - 1):
    raise ValueError(f"{n=} must be a power of two")
  s = np.ones((1, 1), np.float32)
  while len(s) < n:
    s = np.block([[s, s], [s, -s]])
  return s


def _base_fits(k: int, m: int) -> bool:
  """Whether K / m is a power of two (a base of order m gives H_K)."""
  return m >= 1 and k % m == 0 and (k // m) & (k // m - 1) == 0


def _check_base(k: int, base_order: int) -> None:
  if not _base_fits(k, base_order):
    raise ValueError(f"a Hadamard base of order m={base_order} gives no"
                     f" H_K for K={k}: K / m must be a power of two")


def _split(k: int, m: int) -> tuple[int, int]:
  """(a, b): the Hadamard kernel views a row as [a, r] with r = b * m.

  Picks the b that keeps a + r smallest with r even, r >= 32 and a >= 16
  (Triton's smallest dot is 16 wide); rows too short for that use a = 1
  (no left product).
  """
  p = k // m
  options = [(p // b + b * m, b) for b in (2**i for i in range(
      p.bit_length())) if (b * m) % 2 == 0 and b * m >= 32 and p // b >= 16]
  if not options:
    return 1, p
  b = min(options)[1]
  return p // b, b


def _pow2(n: int) -> int:
  return 1 << (n - 1).bit_length()


def _quantize_view(k: int) -> tuple[int, int]:
  """(a, r) for the quantize-only kernel: a row viewed as [a, r], r the
  largest power of two dividing K up to 1024 (Triton blocks are powers of
  two; only a is padded, by masking)."""
  r = min(k & -k, 1024)
  return k // r, r


def kernel_takes(k: int, base_order: int | None) -> bool:
  """Whether the Pallas kernel takes rows of K (on a GPU): K even; with a
  Hadamard base of order m also K / m a power of two and a row split into
  [a, r] with both matmuls at least 16 wide (K >= 512 or so)."""
  if k % 2:
    return False
  if base_order is None:
    return True
  if not _base_fits(k, base_order):
    return False
  a, b = _split(k, base_order)
  return _pow2(a) >= 16 and _pow2(b * base_order) >= 32


def can_use_hadamard_quant(k: int, base_order: int | None = None) -> bool:
  """True where the Pallas kernel compiles: a GPU backend and
  `kernel_takes(k, base_order)`."""
  return jax.default_backend() == "gpu" and kernel_takes(k, base_order)


# The split path runs for at most this many rows (one program per row left
# most of an H200's 132 SMs idle there), aiming at this many programs.
_SPLIT_MAX_ROWS = 16
_SPLIT_PROGRAMS = 64
_SPLIT_MIN_K = 8192


def column_splits(k: int, base_order: int, rows: int,
                  config: HadamardQuantConfig | None = None, *,
                  dtype=jnp.bfloat16) -> int:
  """G, the programs per row the Hadamard path runs (1: the fused kernel).

  Automatic (`config.column_splits` None): for 1 <= M <= 16 rows of a
  16-bit dtype and K >= 8192, the smallest power of two with M * G >= 64,
  at most r_p / 32 (slices at least 32 columns wide); else 1 (measured
  slower at K = 4096; f32 failed on the GPU, see the module docstring). An
  explicit G is capped at r_p / 16.

  Args:
    k: row width K.
    base_order: m, the order of the Hadamard base (K / m a power of two).
    rows: M, the rows transformed.
    config: launch parameters (None: the defaults).
    dtype: the dtype of the rows.

  Returns:
    G >= 1, a power of two dividing r_p (r rounded up to a power of two).

  Raises:
    ValueError: K / m is not a power of two.
  """
  _check_base(k, base_order)
  _, b = _split(k, base_order)
  rp = _pow2(b * base_order)
  wanted = (config or HadamardQuantConfig()).column_splits
  if wanted is None:
    if (not 1 <= rows <= _SPLIT_MAX_ROWS or k < _SPLIT_MIN_K
        or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16)):
      return 1
    return max(1, min(_pow2(-(-_SPLIT_PROGRAMS // rows)), rp // 32))
  return max(1, min(wanted, rp // 16))


# The persistent grid's programs an SM where `programs_per_sm` picks: at
# K = 11008 (LLaMA-2-7B's down_proj input, SwiGLU formed in the kernel,
# int8 codes) 2 an SM took 0.112 / 0.428 ms against the row grid's 0.124 /
# 0.465 (M = 2048 / 8192); at K = 4096 the row grid was faster (0.020 /
# 0.068 against 0.022 / 0.094; H100, 2026-12-07, BENCHMARKS.md).
_LOOP_PROGRAMS_PER_SM = 2


def programs_per_sm(k: int, config: HadamardQuantConfig | None = None
                    ) -> int:
  """The fused Hadamard kernel's persistent programs per SM (0: the row
  grid): `config.programs_per_sm`, or where that is None 2 for K >= 8192
  (a row's dots long enough that looping beats a launch a row, as
  measured; see `_LOOP_PROGRAMS_PER_SM`), else 0."""
  n = (config or HadamardQuantConfig()).programs_per_sm
  if n is not None:
    return n
  return _LOOP_PROGRAMS_PER_SM if k >= _SPLIT_MIN_K else 0


def loop_programs(k: int, rows: int,
                  config: HadamardQuantConfig | None = None) -> int:
  """P, the programs of the fused kernel's persistent grid for `rows` rows
  of K (the output's, padding included), or 0 where the row grid runs:
  `programs_per_sm` times the SMs, used only when there are more rows than
  that."""
  programs = programs_per_sm(k, config) * device_info.num_sms()
  return programs if rows > programs else 0


def _scale_factor(clip_ratio: float) -> np.float32:
  """clip_ratio / 7 as one f32 constant: scales are absmax times it, one
  rounding on every backend (XLA folds `absmax * c / 7` into this multiply;
  Triton would multiply, then divide, 1 ulp apart on the GPU). Equal to
  `quarot_jax.quant`'s symmetric scale."""
  return np.float32(clip_ratio / 7)


def _round_half_even(v: jax.Array) -> jax.Array:
  """jnp.round (ties to even) from floor: Triton has no round primitive."""
  f = jnp.floor(v)
  diff = v - f
  f_is_odd = (f - 2.0 * jnp.floor(f * 0.5)) != 0
  up = (diff > 0.5) | ((diff == 0.5) & f_is_odd)
  return jnp.where(up, f + 1.0, f)


def _pieces(n: int, most: int, multiple: int = 32
            ) -> tuple[tuple[int, int, int], ...]:
  """(start, size, first) blocks that cover [0, n): n rounded up to a
  multiple of `multiple` (16 or 32), cut into powers of two of at most
  `most`, largest first. Triton blocks are powers of two; pieces pad the
  order-172 base of K = 11008 to 192 (128 + 64) instead of 256, 1.6x less
  padded work in its dots, or with multiple 16 to 176 (128 + 32 + 16). A
  last piece that would run past n starts earlier instead (at
  n - size; Pallas rejects a slice that starts inside an axis and runs
  past it), overlapping the one before: `first` is where its own columns
  begin (a load masks those before; a store writes them twice, the same
  values)."""
  total, start, out = -(-n // multiple) * multiple, 0, []
  while start < total:
    size = min(most, 1 << ((total - start).bit_length() - 1))
    out.append((max(0, min(start, n - size)), size, start))
    start += size
  return tuple(out)


def _right_blocks(right_refs, in_pieces, out_pieces):
  """blocks[p][i][j]: piece (i, j) of right matrix p, loaded once per
  program and reused for every row (one row per program spent more L2
  traffic on them than on x)."""
  return [[[ref[pl.ds(i0, ni), pl.ds(j0, nj)] for j0, nj, _ in out_pieces]
           for i0, ni, _ in in_pieces] for ref in right_refs]


def _row_loader(x_ref, row, real, ap: int):
  """`_quantized_row`'s `load` for row `row` of x_ref ([rows, a, r] or
  [rows, 2, a, r]): masked to the piece's own columns below r and to the
  real [a] of [ap] view rows; all zeros where `real` is false."""
  a, r = x_ref.shape[-2:]
  valid = jnp.arange(ap)[:, None] < a

  def load(half, i0, ni, first):
    col = i0 + jnp.arange(ni)[None, :]
    at = (row,) + (() if half is None else (jnp.int32(half),))
    return jnp.where(real, plgpu.load(
        x_ref.at[(*at, pl.ds(0, ap), pl.ds(i0, ni))],
        mask=valid & (col >= first) & (col < r), other=0), 0)
  return load


def _quantized_row(load, blocks, left, *, packed: bool, norm: float,
                   clip_ratio: float, in_pieces, out_pieces, dt,
                   gate_up: bool):
  """One row: load its pieces, transform, absmax, codes.

  Args:
    load: (half, i0, ni, first) -> the row's [ap, ni] piece at columns
      i0.. of its [a, r] view (half: 0 gate, 1 up with `gate_up`, else
      None), zero where masked.
    blocks: `_right_blocks`.
    left: [ap, ap] S_a, or None (a = 1: no left product).

  Returns:
    (outs, scale): outs[j] the bytes (packed) or int8 codes of out piece j,
    [ap, nj]; scale the row's f32 scale.
  """
  xs = []
  for i0, ni, first in in_pieces:
    # Masked elements are 0 in both halves, and swiglu(0, 0) = 0.
    piece = (swiglu(load(0, i0, ni, first), load(1, i0, ni, first))
             if gate_up else load(None, i0, ni, first))
    xs.append(piece.astype(dt))
  dot = functools.partial(jax.lax.dot, precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
  # zs[p][j]: f32 [ap, nj], columns of piece j of right matrix p.
  zs = [[functools.reduce(jnp.add, [dot(x, blk[i][j])
                                    for i, x in enumerate(xs)])
         for j in range(len(out_pieces))] for blk in blocks]
  if left is not None:
    if dt == jnp.float32:
      zs = [[dot(left, z) for z in zp] for zp in zs]
    else:  # 16-bit: split the f32 intermediate so the left dot stays exact
      def exact_left(z):
        z_hi = z.astype(dt)
        z_lo = (z - z_hi.astype(jnp.float32)).astype(dt)
        return dot(left, z_hi) + dot(left, z_lo)
      zs = [[exact_left(z) for z in zp] for zp in zs]
  ys = [[z * norm for z in zp] for zp in zs]
  absmax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(y))
                                          for yp in ys for y in yp])
  scale = _row_scales(absmax, clip_ratio)
  codes = [[jnp.clip(_round_half_even(y / scale), -8, 7).astype(jnp.int32)
            for y in yp] for yp in ys]
  if packed:
    outs = [((codes[0][j] & 0xF) | ((codes[1][j] & 0xF) << 4)
             ).astype(jnp.uint8) for j in range(len(out_pieces))]
  else:
    outs = [c.astype(jnp.int8) for c in codes[0]]
  return outs, scale


def hadamard_quant_kernel(x_ref, left_ref, *refs, packed: bool,
                          use_left: bool, norm: float, clip_ratio: float,
                          rows: int, in_pieces, out_pieces,
                          gate_up: bool = False):
  """A few rows: transform, absmax, codes, packed bytes (or int8 codes).
  Rows at or past `rows` (the padding up to `out_rows`) quantize zeros:
  codes 0, scale 1. With `gate_up` each row is `swiglu` of its two halves,
  formed piece by piece as it is loaded."""
  # x_ref: [rows, a, r], or [rows, 2, a, r] (gate, up) with gate_up;
  # left_ref: [ap, ap]; right_refs: the even and odd
  # columns of R (packed) or R itself, [r, r_out] (r_out: r // 2 or r),
  # zero-padded only where a single piece is wider than r or r_out;
  # q_ref: uint8[rows, a, r // 2] (packed) or int8[rows, a, r]; s_ref:
  # f32[rows] (ap: a rounded up to a power of two, as Triton needs).
  *right_refs, q_ref, s_ref = refs
  n_rows, a = x_ref.shape[0], x_ref.shape[-2]
  ap = left_ref.shape[0]
  r_out = q_ref.shape[2]
  blocks = _right_blocks(right_refs, in_pieces, out_pieces)
  left = left_ref[...] if use_left else None
  valid = jnp.arange(ap)[:, None] < a
  scales = jnp.zeros((n_rows,), jnp.float32)
  real = pl.program_id(0) * n_rows < rows  # a program's rows: all or none
  for i in range(n_rows):
    row = jnp.int32(i)  # interpret mode's load/store reject a Python int

    outs, scale = _quantized_row(
        _row_loader(x_ref, row, real, ap), blocks, left, packed=packed,
        norm=norm, clip_ratio=clip_ratio, in_pieces=in_pieces,
        out_pieces=out_pieces, dt=right_refs[0].dtype, gate_up=gate_up)
    for out, (j0, nj, _) in zip(outs, out_pieces):
      mask = valid & (j0 + jnp.arange(nj)[None, :] < r_out)
      plgpu.store(q_ref.at[row, pl.ds(0, ap), pl.ds(j0, nj)], out,
                  mask=mask)
    scales = jnp.where(jnp.arange(n_rows) == i, scale, scales)
  s_ref[...] = scales


def hadamard_quant_loop_kernel(x_ref, left_ref, *refs, packed: bool,
                               use_left: bool, norm: float,
                               clip_ratio: float, rows: int, iters: int,
                               in_pieces, out_pieces, gate_up: bool = False):
  """The persistent grid: program p takes rows p, p + P, p + 2P, ... (P
  programs, `iters` rows each at most) in one loop, the transform's
  matrices loaded once before it (Triton pipelines the loop's loads with
  `num_stages` > 1, measured slower). Each row is computed as in
  `hadamard_quant_kernel` (the same `_quantized_row`), the same bits."""
  # x_ref: [rows, a, r] or [rows, 2, a, r] (whole); q_ref: [out_rows, a,
  # r_out]; s_ref: f32[out_rows]; the rest as `hadamard_quant_kernel`.
  *right_refs, q_ref, s_ref = refs
  a = x_ref.shape[-2]
  ap = left_ref.shape[0]
  out_rows, _, r_out = q_ref.shape
  # Read outside the loop: interpret mode does not substitute them in a
  # loop's body.
  program, programs = pl.program_id(0), pl.num_programs(0)
  blocks = _right_blocks(right_refs, in_pieces, out_pieces)
  left = left_ref[...] if use_left else None
  valid = jnp.arange(ap)[:, None] < a

  def body(it, carry):
    row = program + it * programs
    real = row < rows  # rows past it (padding up to out_rows) are zeros
    live = row < out_rows  # the last turn of some programs has no row
    x_row = jnp.minimum(row, rows - 1)
    q_row = jnp.minimum(row, out_rows - 1)

    outs, scale = _quantized_row(
        _row_loader(x_ref, x_row, real, ap), blocks, left, packed=packed,
        norm=norm, clip_ratio=clip_ratio, in_pieces=in_pieces,
        out_pieces=out_pieces, dt=right_refs[0].dtype, gate_up=gate_up)
    for out, (j0, nj, _) in zip(outs, out_pieces):
      mask = valid & (j0 + jnp.arange(nj)[None, :] < r_out) & live
      plgpu.store(q_ref.at[q_row, pl.ds(0, ap), pl.ds(j0, nj)], out,
                  mask=mask)
    plgpu.store(s_ref.at[pl.ds(q_row, 1)], jnp.broadcast_to(scale, (1,)),
                mask=jnp.broadcast_to(live, (1,)))
    return carry

  jax.lax.fori_loop(0, iters, body, 0)


def hadamard_split_kernel(x_ref, left_ref, right_ref, y_ref, max_ref, *,
                          use_left: bool, norm: float):
  """One row and one slice of R's columns: y[:, slice] = S_aᵀ · X ·
  R[:, slice] / √K in f32, each element computed as in
  `hadamard_quant_kernel` (same dots, same hi/lo split), and max |y| over
  the slice; no quantization."""
  # x_ref: [1, a, r]; left_ref: [ap, ap]; right_ref: [rp, w], columns
  # g * w .. (g + 1) * w of R padded to [rp, rp] (padded rows and columns
  # zero); y_ref: f32[1, a, r], this program stores the real [a] rows of its
  # columns below r; max_ref: f32[1, 1], this program's partial absmax.
  _, a, r = x_ref.shape
  ap, w = left_ref.shape[0], right_ref.shape[1]
  dt = right_ref.dtype
  dot = functools.partial(jax.lax.dot, precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
  valid = jnp.arange(ap)[:, None] < a
  row = jnp.int32(0)  # interpret mode's load/store reject a Python int
  # The fused kernel's pieces of R's rows, summed in its order.
  z = 0.0  # f32 [ap, w]
  for i0, ni, first in _pieces(r, 256):
    col = i0 + jnp.arange(ni)[None, :]
    x = plgpu.load(x_ref.at[row, pl.ds(0, ap), pl.ds(i0, ni)],
                   mask=valid & (col >= first) & (col < r), other=0)
    z = z + dot(x.astype(dt), right_ref[pl.ds(i0, ni), :])
  if use_left:
    left = left_ref[...]
    if dt == jnp.float32:
      z = dot(left, z)
    else:  # 16-bit: split the f32 intermediate so the left dot stays exact
      z_hi = z.astype(dt)
      z_lo = (z - z_hi.astype(jnp.float32)).astype(dt)
      z = dot(left, z_hi) + dot(left, z_lo)
  y = z * norm
  col = pl.program_id(1) * w
  plgpu.store(y_ref.at[row, pl.ds(0, ap), pl.ds(col, w)], y,
              mask=valid & (col + jnp.arange(w)[None, :] < r))
  # The padding of y is exactly zero (zero-padded x and matrices), as in
  # the fused kernel's absmax, so no mask; two one-axis reductions, as
  # `store_quantized_rows`.
  absmax = jnp.max(jnp.max(jnp.abs(y), axis=1), axis=0)
  max_ref[...] = jnp.broadcast_to(absmax, max_ref.shape)


def quantize_chunk_kernel(y_ref, max_ref, q_ref, s_ref, *, ca: int,
                          packed: bool, clip_ratio: float, rows: int):
  """Quantize one chunk of a row (the split path at few rows): rows
  c * ca .. (c + 1) * ca of its [a, r] view, scaled by the row's absmax
  from the transform's partial maxima, so no program reduces a whole row.
  Program (i, 0) writes row i's scale."""
  # y_ref: f32[1, a, r]; max_ref: f32[1, G] (G a power of two); q_ref:
  # uint8[1, a, r // 2] (packed) or int8[1, a, r]; s_ref: f32[1]. Rows at
  # or past `rows` (the padding up to `out_rows`) quantize zeros: codes 0,
  # scale 1.
  real = pl.program_id(0) < rows
  start = pl.program_id(1) * ca
  y, mask = load_rows(y_ref, ca, start)
  y = jnp.where(real, y, 0.0)
  absmax = jnp.where(real, jnp.max(max_ref[...], axis=1), 0.0)  # [1]
  scale = _row_scales(absmax, clip_ratio)
  _store_codes(y, scale, q_ref, start=start, packed=packed, mask=mask)

  @pl.when(pl.program_id(1) == 0)
  def _():
    s_ref[...] = scale


def quantize_kernel(x_ref, q_ref, s_ref, *, ap: int, packed: bool,
                    clip_ratio: float, rows: int):
  """Quantize only: a block of rows, no dots; the pack splits each row's
  codes into even and odd elements in registers (reshape + unstack)."""
  # x_ref: [rows, a, r]; q_ref: uint8[rows, a, r // 2] (packed) or
  # int8[rows, a, r]; s_ref: f32[rows]. ap = a rounded up to a power of
  # two, its padded rows masked. Programs at or past `rows` (the padding
  # up to `out_rows`) quantize zeros: codes 0, scale 1.
  y, mask = load_rows(x_ref, ap)
  y = jnp.where(pl.program_id(0) * x_ref.shape[0] < rows, y, 0.0)
  store_quantized_rows(y, q_ref, s_ref, packed=packed, clip_ratio=clip_ratio,
                       mask=mask)


def load_rows(x_ref, ap: int, start=0):
  """In a kernel: a block of rows [rows, a, r] as f32[rows, ap, r].

  Args:
    x_ref: the block, each row viewed as [a, r].
    ap: rows of the view loaded (a power of two).
    start: the first row of the view loaded (a traced int32 in a chunked
      grid); rows at or past a load as zero.

  Returns:
    (y, mask): y, rows start..start + ap of each row's view (those past a
    zero); mask(width) the store mask of the real ones (None when all are).
  """
  n_rows, a, r = x_ref.shape
  valid = None
  if a % ap:  # ap > a, or a ragged last chunk
    valid = ((start + jnp.arange(ap)) < a)[None, :, None]
  mask = lambda width: (None if valid is None else
                        jnp.broadcast_to(valid, (n_rows, ap, width)))
  masked = {} if valid is None else dict(mask=mask(r), other=0)
  y = plgpu.load(x_ref.at[:, pl.ds(start, ap), :], **masked
                 ).astype(jnp.float32)
  return y, mask


def _row_scales(absmax: jax.Array, clip_ratio: float) -> jax.Array:
  """Scales from each row's absmax: absmax * f32(clip_ratio / 7), 1 where
  that is 0 (all-zero rows)."""
  scale = absmax * _scale_factor(clip_ratio)
  return jnp.where(scale > 0, scale, 1.0)


def _store_codes(y: jax.Array, scale: jax.Array, q_ref, *, start,
                 packed: bool, mask) -> None:
  """In a kernel: the int4 codes of y [rows, ap, r] with scales [rows],
  stored to rows start..start + ap of each row's [a, r] view in q_ref
  (packed: byte j = element 2j low nibble, 2j + 1 high)."""
  n_rows, ap, r = y.shape
  codes = jnp.clip(_round_half_even(y / scale[:, None, None]), -8, 7
                   ).astype(jnp.int32)
  if packed:
    even, odd = jnp.unstack(codes.reshape(n_rows, ap, r // 2, 2), axis=-1)
    out = ((even & 0xF) | ((odd & 0xF) << 4)).astype(jnp.uint8)
  else:
    out = codes.astype(jnp.int8)
  plgpu.store(q_ref.at[:, pl.ds(start, ap), :], out,
              mask=mask(out.shape[-1]))


def store_quantized_rows(y: jax.Array, q_ref, s_ref, *, packed: bool,
                         clip_ratio: float, mask) -> None:
  """In a kernel: per-row symmetric int4 codes of `y` and their scales.

  Args:
    y: f32[rows, ap, r] the rows, each viewed as [ap, r] (padding zero).
    q_ref: int8[rows, a, r] or uint8[rows, a, r // 2] (packed) codes out.
    s_ref: f32[rows] scales out (1 where a row is all zero).
    packed: two codes per byte (low nibble = even element).
    clip_ratio: fraction of each row's absmax mapped to code 7.
    mask: width -> the store mask of the real [a] of [ap] rows (or None).
  """
  absmax = jnp.max(jnp.max(jnp.abs(y), axis=2), axis=1)
  scale = _row_scales(absmax, clip_ratio)
  _store_codes(y, scale, q_ref, start=0, packed=packed, mask=mask)
  s_ref[...] = scale


def _grid_rows(rows: int, out_rows: int, most: int) -> tuple[int, int]:
  """(rows per program, the last program that reads x): every program's
  rows are all real or all padding; padding programs re-read the last real
  block (then zero it)."""
  per_program = math.gcd(rows, out_rows, most) if rows else 1
  return per_program, max(rows // per_program - 1, 0)


def _quantize_only(x: jax.Array, clip_ratio: float, packed: bool,
                   cfg: HadamardQuantConfig, interpret: bool,
                   debug: bool, out_rows: int
                   ) -> tuple[jax.Array, jax.Array]:
  """`hadamard_quant` without a Hadamard, with `quantize_kernel`."""
  k = x.shape[-1]
  lead = x.shape[:-1]
  a, r = _quantize_view(k)
  ap = _pow2(a)
  x3 = x.reshape(-1, a, r)
  rows = x3.shape[0]
  per_program, last = _grid_rows(
      rows, out_rows, max(1, cfg.block_elements // (ap * r)))
  q_block, q_dtype = ((a, r // 2), jnp.uint8) if packed else ((a, r),
                                                                jnp.int8)
  kernel = functools.partial(quantize_kernel, ap=ap, packed=packed,
                             clip_ratio=clip_ratio, rows=rows)
  x_q, s_x = pl.pallas_call(
      kernel,
      grid=(out_rows // per_program,),
      in_specs=[pl.BlockSpec((per_program, a, r),
                             lambda i: (jnp.minimum(i, last), 0, 0))],
      out_specs=[pl.BlockSpec((per_program, *q_block), lambda i: (i, 0, 0)),
                 pl.BlockSpec((per_program,), lambda i: (i,))],
      out_shape=[jax.ShapeDtypeStruct((out_rows, *q_block), q_dtype),
                 jax.ShapeDtypeStruct((out_rows,), jnp.float32)],
      compiler_params=compat.triton_params(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      interpret=interpret, debug=debug, name="hadamard_quant_no_transform",
  )(x3)
  return _shaped(x_q, s_x, lead, rows, out_rows)


def _quantize_chunks(y: jax.Array, maxima: jax.Array, clip_ratio: float,
                     packed: bool, cfg: HadamardQuantConfig,
                     interpret: bool, debug: bool, out_rows: int
                     ) -> tuple[jax.Array, jax.Array]:
  """The split path's quantize, `quantize_chunk_kernel` on an (out_rows, C)
  grid: y f32[..., K] in chunks of `cfg.chunk_elements`, with maxima
  f32[M, G] the partial absmax of each row's G slices."""
  k = y.shape[-1]
  lead = y.shape[:-1]
  a, r = _quantize_view(k)
  y3 = y.reshape(-1, a, r)
  rows, splits = maxima.shape
  ca = max(1, min(_pow2(a), cfg.chunk_elements // r))  # view rows a chunk
  last = max(rows - 1, 0)  # padding rows re-read the last real row
  q_block, q_dtype = ((a, r // 2), jnp.uint8) if packed else ((a, r),
                                                                jnp.int8)
  kernel = functools.partial(quantize_chunk_kernel, ca=ca, packed=packed,
                             clip_ratio=clip_ratio, rows=rows)
  x_q, s_x = pl.pallas_call(
      kernel,
      grid=(out_rows, -(-a // ca)),
      in_specs=[pl.BlockSpec((1, a, r),
                             lambda i, c: (jnp.minimum(i, last), 0, 0)),
                pl.BlockSpec((1, splits),
                             lambda i, c: (jnp.minimum(i, last), 0))],
      out_specs=[pl.BlockSpec((1, *q_block), lambda i, c: (i, 0, 0)),
                 pl.BlockSpec((1,), lambda i, c: (i,))],
      out_shape=[jax.ShapeDtypeStruct((out_rows, *q_block), q_dtype),
                 jax.ShapeDtypeStruct((out_rows,), jnp.float32)],
      compiler_params=compat.triton_params(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      interpret=interpret, debug=debug, name="hadamard_split_quantize",
  )(y3, maxima)
  return _shaped(x_q, s_x, lead, rows, out_rows)


def _shaped(x_q: jax.Array, s_x: jax.Array, lead: tuple[int, ...],
            rows: int, out_rows: int) -> tuple[jax.Array, jax.Array]:
  """The kernels' [out_rows, ...] outputs in x's leading shape (or
  [out_rows, ...] when padded)."""
  if out_rows != rows:
    return x_q.reshape(out_rows, -1), s_x
  return x_q.reshape(*lead, -1), s_x.reshape(lead)


def _check(x: jax.Array, hadamard_base: jax.Array | None, clip_ratio: float,
           bits: int, out_rows: int | None = None,
           gate_up: bool = False) -> int | None:
  """Argument checks; returns the base order m (None: no Hadamard)."""
  k = x.shape[-1]
  if gate_up:
    if k % 2:
      raise ValueError(f"gate_up=True takes gate | up rows [..., 2K], got"
                       f" an odd width {k}")
    k //= 2
  if out_rows is not None and (x.ndim != 2 or out_rows < x.shape[0]):
    raise ValueError(f"{out_rows=} needs x of shape [M, K] with M <="
                     f" out_rows, got {x.shape}")
  if bits != 4:
    raise NotImplementedError(f"hadamard_quant packs int4 only, got {bits=}")
  if k % 2:
    raise ValueError(f"K={k} must be even to pack int4")
  if not 0 < clip_ratio <= 1:
    raise ValueError(f"{clip_ratio=} must be in (0, 1]")
  if hadamard_base is None:
    return None
  if hadamard_base.ndim != 2 or (
      hadamard_base.shape[0] != hadamard_base.shape[1]):
    raise ValueError(f"hadamard_base must be a square [m, m] matrix, got"
                     f" {hadamard_base.shape}")
  _check_base(k, hadamard_base.shape[0])
  return hadamard_base.shape[0]


@functools.partial(jax.jit, static_argnames=(
    "clip_ratio", "bits", "packed", "out_rows", "config", "interpret",
    "debug", "implementation", "gate_up"))
def hadamard_quant(x: jax.Array, hadamard_base: jax.Array | None = None, *,
                   clip_ratio: float = 0.9, bits: int = 4,
                   packed: bool = True, out_rows: int | None = None,
                   config: HadamardQuantConfig | None = None,
                   interpret: bool = False, debug: bool = False,
                   implementation: Literal["pallas", "xla"] | None = None,
                   gate_up: bool = False) -> tuple[jax.Array, jax.Array]:
  """Online Hadamard (optional) and per-token symmetric int4 quantization.

  Args:
    x: float[..., K] activations (bf16, f16 or f32); K even. With
      `gate_up`, float[..., 2K]: a fused gate/up linear's output (gate
      first), whose rows `swiglu(gate, up)` are transformed and quantized.
    hadamard_base: f32[m, m], the ±1 base B_m of H_K = kron(S_{K/m}, B_m)
      (K / m a power of two; `quarot_jax.hadamard.hadamard_matrix(m)` with
      m from `quarot_jax.hadamard.factorize(K)`), applied as x @ H_K / √K
      first; None quantizes x as it is.
    clip_ratio: fraction of each row's absmax mapped to the largest code.
    bits: 4 (the only width the packed kernels take).
    packed: two codes per byte (uint8[..., K // 2]); False writes one int8
      code per element (int8[..., K]).
    out_rows: for x [M, K], rows of the outputs, >= M (None: M). Rows past
      M hold zero codes and scale 1: the padding `decode_matmul` takes, so
      nobody pads x in a launch of its own.
    config: launch parameters.
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    debug: print the kernel's jaxpr.
    implementation: 'pallas' (the kernel where `kernel_takes` the shape,
      the reference for rows it does not take, such as short ones), 'xla'
      (the reference), or None (pallas where `can_use_hadamard_quant` or
      `interpret`, else the reference; logged).
    gate_up: x holds gate | up; the fused kernel forms the SwiGLU as it
      loads each row (a prefill's FFN then needs no SwiGLU pass of its
      own); the split path (few rows) and the kernel without a Hadamard
      take `swiglu` computed before them, the same numbers.

  Returns:
    (x_q uint8[..., K // 2] packed int4 (int8[..., K] codes when not
    `packed`), s_x f32[...] per-row scales); [out_rows, ...] and
    [out_rows] with `out_rows`.

  Raises:
    ValueError: K odd, a base that is not square or whose order m leaves
      K / m not a power of two, clip_ratio outside (0, 1], out_rows with
      x not [M, K] or below M, or gate_up with an odd width.
    NotImplementedError: bits != 4.
  """
  m = _check(x, hadamard_base, clip_ratio, bits, out_rows, gate_up)
  k = x.shape[-1] // 2 if gate_up else x.shape[-1]
  if implementation is None:
    implementation = ("pallas" if interpret or can_use_hadamard_quant(k, m)
                      else "xla")
    logging.info("hadamard_quant: using %s", implementation)
  elif implementation == "pallas" and not (interpret or kernel_takes(k, m)):
    implementation = "xla"
    logging.info("hadamard_quant: the kernel does not take K=%d (base %s);"
                 " using the reference", k, m)
  if implementation == "xla":
    return hadamard_quant_reference(x, hadamard_base, clip_ratio=clip_ratio,
                                    packed=packed, out_rows=out_rows,
                                    gate_up=gate_up)
  cfg = config or HadamardQuantConfig()
  rows = math.prod(x.shape[:-1])
  out_rows = rows if out_rows is None else out_rows
  fused = (hadamard_base is not None
           and column_splits(k, m, rows, cfg, dtype=x.dtype) == 1)
  if gate_up and not fused:  # the other kernels take the SwiGLU's output
    x, gate_up = _swiglu_halves(x), False
  if hadamard_base is None:
    return _quantize_only(x, clip_ratio, packed, cfg, interpret, debug,
                          out_rows)
  lead = x.shape[:-1]
  a, b = _split(k, m)
  r = b * m
  ap, rp = _pow2(a), _pow2(r)
  # [M, a, r]: row element k = i * r + j ([M, 2, a, r]: gate, up).
  x3 = x.reshape(-1, *((2,) if gate_up else ()), a, r)
  # ±1 and 0/1 are exact in every float dtype; 16-bit inputs keep theirs.
  dt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
  left = jnp.asarray(sylvester(a).T)
  right = jnp.kron(jnp.asarray(sylvester(b)),
                   hadamard_base.astype(jnp.float32))
  pad = lambda t, shape: jnp.pad(
      t, [(0, n - d) for d, n in zip(t.shape, shape)]).astype(dt)
  norm = float(np.float32(1.0 / math.sqrt(k)))
  params = compat.triton_params(num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages)
  splits = column_splits(k, m, rows, cfg, dtype=x.dtype)
  if splits > 1:  # Few rows: the transform on M x G programs, then quantize.
    w = rp // splits
    y, maxima = pl.pallas_call(
        functools.partial(hadamard_split_kernel, use_left=a > 1, norm=norm),
        grid=(rows, splits),
        in_specs=[pl.BlockSpec((1, a, r), lambda i, g: (i, 0, 0)),
                  pl.BlockSpec((ap, ap), lambda i, g: (0, 0)),
                  pl.BlockSpec((rp, w), lambda i, g: (0, g))],
        out_specs=[pl.BlockSpec((1, a, r), lambda i, g: (i, 0, 0)),
                   pl.BlockSpec((1, 1), lambda i, g: (i, g))],
        out_shape=[jax.ShapeDtypeStruct((rows, a, r), jnp.float32),
                   jax.ShapeDtypeStruct((rows, splits), jnp.float32)],
        compiler_params=params, interpret=interpret, debug=debug,
        name="hadamard_split",
    )(x3, pad(left, (ap, ap)), pad(right, (rp, rp)))
    y = y.reshape(*lead, k)
    if rows > _SPLIT_MAX_ROWS:  # forced G at many rows: a program per row
      return _quantize_only(y, clip_ratio, packed, cfg, interpret, debug,
                            out_rows)
    return _quantize_chunks(y, maxima, clip_ratio, packed, cfg, interpret,
                            debug, out_rows)
  # Packed: even and odd columns of R (byte j = columns 2j, 2j + 1 of the
  # [a, r] view, as r is even); int8 codes: R whole.
  rights = (right[:, 0::2], right[:, 1::2]) if packed else (right,)
  r_out = r // 2 if packed else r
  in_pieces = _pieces(r, 256, cfg.piece_multiple)
  out_pieces = _pieces(r_out, 128, cfg.piece_multiple)
  extent = lambda pieces, n: max([n] + [i + size for i, size, _ in pieces])
  q_dtype = jnp.uint8 if packed else jnp.int8
  full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  right_shape = (extent(in_pieces, r), extent(out_pieces, r_out))
  operands = (x3, pad(left, (ap, ap)), *[pad(t, right_shape) for t in rights])
  out_shape = [jax.ShapeDtypeStruct((out_rows, a, r_out), q_dtype),
               jax.ShapeDtypeStruct((out_rows,), jnp.float32)]
  programs = loop_programs(k, out_rows, cfg)
  if programs and rows:
    kernel = functools.partial(
        hadamard_quant_loop_kernel, packed=packed, use_left=a > 1,
        norm=norm, clip_ratio=clip_ratio, rows=rows,
        iters=-(-out_rows // programs), in_pieces=in_pieces,
        out_pieces=out_pieces, gate_up=gate_up)
    x_q, s_x = pl.pallas_call(
        kernel, grid=(programs,),
        in_specs=[full(x3.shape), full((ap, ap))]
        + [full(right_shape)] * len(rights),
        out_specs=[full(t.shape) for t in out_shape], out_shape=out_shape,
        compiler_params=params, interpret=interpret, debug=debug,
        name="hadamard_quant_loop",
    )(*operands)
    return _shaped(x_q, s_x, lead, rows, out_rows)
  per_program, last = _grid_rows(rows, out_rows, cfg.rows_per_program)
  kernel = functools.partial(
      hadamard_quant_kernel, packed=packed, use_left=a > 1, norm=norm,
      clip_ratio=clip_ratio, rows=rows, in_pieces=in_pieces,
      out_pieces=out_pieces, gate_up=gate_up)
  x_block = (per_program, *x3.shape[1:])
  x_q, s_x = pl.pallas_call(
      kernel,
      grid=(out_rows // per_program,),
      in_specs=[pl.BlockSpec(x_block, lambda i: (
          jnp.minimum(i, last),) + (0,) * (len(x_block) - 1)),
                full((ap, ap))] + [full(right_shape)] * len(rights),
      out_specs=[pl.BlockSpec((per_program, a, r_out), lambda i: (i, 0, 0)),
                 pl.BlockSpec((per_program,), lambda i: (i,))],
      out_shape=out_shape, compiler_params=params, interpret=interpret,
      debug=debug, name="hadamard_quant",
  )(*operands)
  return _shaped(x_q, s_x, lead, rows, out_rows)


def _hadamard_transform(y: jax.Array, base: jax.Array) -> jax.Array:
  """y @ kron(S_p, base) / √K in f32 (HIGHEST), the way
  `quarot_jax.hadamard.fast_hadamard_transform` computes it: the base as a
  dense [m, m] matmul, then log2(p) butterfly stages."""
  k, m = y.shape[-1], base.shape[0]
  p = k // m
  lead = y.shape[:-1]
  y = y.reshape(lead + (p, m))  # [..., p, m]
  if m > 1:
    y = jnp.einsum("...pa,ab->...pb", y, base.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  h = 1
  while h < p:
    y = y.reshape(lead + (p // (2 * h), 2, h, m))
    lo, hi = y[..., 0, :, :], y[..., 1, :, :]
    y = jnp.stack([lo + hi, lo - hi], axis=-3)
    h *= 2
  return y.reshape(lead + (k,)) * jnp.float32(1.0 / math.sqrt(k))


@functools.partial(jax.jit, static_argnames=("clip_ratio", "packed",
                                             "out_rows", "gate_up"))
def hadamard_quant_reference(x: jax.Array,
                             hadamard_base: jax.Array | None = None, *,
                             clip_ratio: float = 0.9, packed: bool = True,
                             out_rows: int | None = None,
                             gate_up: bool = False
                             ) -> tuple[jax.Array, jax.Array]:
  """Plain-jnp `hadamard_quant`: transform in f32, quantize, pack (or keep
  int8 codes when not `packed`).

  The quantizer is `quarot_jax.quant.quantize` with
  `activation_spec(4, clip_ratio)`, op for op (so the two agree exactly).

  Args:
    x: float[..., K] activations.
    hadamard_base: as in `hadamard_quant`.
    clip_ratio: fraction of each row's absmax mapped to code 7.
    packed: pack the codes (else int8 codes).
    out_rows: as in `hadamard_quant` (zero rows appended to x: zero codes,
      scale 1).
    gate_up: x is gate | up [..., 2K]; `swiglu(gate, up)` is quantized.

  Returns:
    (x_q uint8[..., K // 2] or int8[..., K], s_x f32[...]).

  Raises:
    ValueError: as `hadamard_quant`.
  """
  _check(x, hadamard_base, clip_ratio, 4, out_rows, gate_up)
  if gate_up:
    x = _swiglu_halves(x)
  y = x.astype(jnp.float32)
  if out_rows is not None:
    y = jnp.pad(y, ((0, out_rows - x.shape[0]), (0, 0)))
  if hadamard_base is not None:
    y = _hadamard_transform(y, hadamard_base)
  scale = jnp.max(jnp.abs(y), axis=-1, keepdims=True) * _scale_factor(
      clip_ratio)
  scale = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round(y / scale), -8, 7).astype(jnp.int8)
  return (int4_layout.pack_int4(codes) if packed else codes), scale[..., 0]
