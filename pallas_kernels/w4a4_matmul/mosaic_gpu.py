"""W4A4 matmul on Hopper with Pallas Mosaic GPU (int8 wgmma, int32 acc).

  y[M, N] = (x[M, K] · w[N, K]ᵀ) * s_x[M, 1] * s_w[1, N]

Matmul axes are M (tokens), N (output channels), K (input channels).
Inputs use the int4 packing of `pallas_kernels/int4_layout.py` (two signed
nibbles per byte along K, low nibble = even index): x_q uint8[M, K // 2] and w_q
uint8[N, K // 2], both K-major. Scales are f32 per token and per output
channel; the int32 accumulation is exact and the scales are applied in the
epilogue; y is written in bf16 (or f16/f32) through shared memory and TMA.

Hopper has no int4 tensor-core MMA, so the kernel runs int8 wgmma:
  * the activation tile is operand A. By default (x_operand='registers')
    it travels as int4 (the wrapper reinterprets the bytes as jnp.int4) and
    is widened int4 -> int8 in registers (8-bit WGMMA layout); a register
    operand cannot outlive its step, so those wgmmas run one at a time per
    warpgroup (the two compute warpgroups interleave). int8 activations
    (x_operand='smem', or x given as int8) feed the wgmma from shared
    memory, and one wgmma stays in flight while the next step's weights
    are widened;
  * the weight tile is operand B and must be int8 in shared memory, K-major
    ([N, K] in memory, passed as `plgpu.transpose_ref(w8, (1, 0))`).
    `w4a4_matmul_mosaic` streams the weights as int4 (half the bytes) and
    each compute warpgroup widens its tile through registers into its own
    int8 shared-memory buffer before the wgmma. `w4a4_matmul_mosaic_w8`, a
    benchmark diagnostic outside the model path, takes weights widened once
    by `unpack_weights` (twice the weight memory) and feeds the TMA'd int8
    tile to the wgmma directly.
`w4a4_matmul_mosaic_wt` (what the model runs on Hopper) swaps the roles:
the int4 weights are operand A, widened in registers, and the int8
activation codes operand B from shared memory, so nothing is widened
through shared memory; it computes yᵀ = w · xᵀ (the caller transposes; XLA
fuses that into the consumer). With 256-token tiles: 1.22-1.31x
`w4a4_matmul_mosaic` and 0.82-1.08x XLA's int8 dot at the LLaMA-2 7B/13B
prefill shapes (H200, 2026-12-04, BENCHMARKS.md).
The grid is persistent (one CTA per SM, `planar_snake` tile order); each CTA
has two compute warpgroups, each owning a [block_m, block_n] output tile,
and one TMA warpgroup that streams K tiles through a `max_concurrent_steps`
deep shared-memory pipeline (`plgpu.emit_pipeline_warp_specialized`).

Shapes are padded to the tiles by the wrapper. The wrappers always run the
kernel (`api.w4a4_matmul` picks between backends). Group scales along K
(the 128G mode) run in `w4a4_matmul_mosaic_wt` only, one K group per
pipeline step. Not supported: bits other than 4, GPUs before Hopper,
interpret mode (Mosaic GPU's interpreter, jax 0.10.2, fails on this
kernel's warp-specialized pipeline; the Triton kernel, tested in interpret
mode, runs the same arithmetic).
"""

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import device_info
from pallas_kernels import int4_layout
from pallas_kernels import padding
from pallas_kernels.w4a4_matmul import reference

_LANE = 128  # int8 elements per 128-byte swizzle row: one wgmma K group


@dataclasses.dataclass(frozen=True, kw_only=True)
class W4A4MosaicConfig:
  """Tiles of the Mosaic GPU W4A4 kernel.

  Attributes:
    block_m: output rows per compute warpgroup (multiple of 64).
    block_n: output columns per compute warpgroup (multiple of 64, <= 256).
    block_k: K elements per pipeline step (multiple of 128).
    max_concurrent_steps: shared-memory pipeline depth.
    wg_dimension: 'n' puts the two compute warpgroups side by side along N
      (CTA tile [block_m, 2 * block_n]), 'm' along M.
    grid_minor_dim: 'n' or 'm', the fast axis of the persistent tile order.
    grid_tile_width: width of the snake bands of the tile order.
    epi_block_m: rows per TMA store of the epilogue.
    epi_block_n: columns per TMA store of the epilogue.
    wgmma_depth: wgmma groups left in flight at the end of a step (0 or 1;
      1 needs int8 activations in shared memory, x_operand='smem').
    num_sms: persistent CTAs; None = the device's SM count.
    group_convert: with group scales, how each group's int32 sum becomes
      f32: 'magic' adds 0x4B400000 and reinterprets the bits (2**23 +
      2**22 + sum, exact for |sum| < 2**22), then subtracts 12582912.0
      (exact): an integer add and an f32 add at full rate; 'cvt' is the
      plain conversion (I2F, a quarter-rate instruction on Hopper). The
      same f32 values either way.
    group_overlap: with group scales, add each group's scaled sum to y
      while the next group's wgmma runs (the sum and its scales carried
      one step: 64 more registers a thread at 128 tokens), instead of
      after it.
  """

  block_m: int = 128
  block_n: int = 128
  block_k: int = 128
  max_concurrent_steps: int = 4
  wg_dimension: Literal["m", "n"] = "n"
  grid_minor_dim: Literal["m", "n"] = "n"
  grid_tile_width: int = 8
  epi_block_m: int = 64
  epi_block_n: int = 64
  wgmma_depth: int = 0
  num_sms: int | None = None
  group_convert: Literal["magic", "cvt"] = "magic"
  group_overlap: bool = False

  def __post_init__(self):
    if self.block_m % 64 or self.block_m <= 0:
      raise ValueError(f"{self.block_m=} must be a positive multiple of 64")
    if self.block_n % 64 or not 0 < self.block_n <= 256:
      raise ValueError(f"{self.block_n=} must be a multiple of 64 in"
                       " (0, 256]")
    if self.block_k % _LANE or self.block_k <= 0:
      raise ValueError(f"{self.block_k=} must be a positive multiple of"
                       f" {_LANE}")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"{self.max_concurrent_steps=} must be >= 2")
    if self.wg_dimension not in ("m", "n"):
      raise ValueError(f"{self.wg_dimension=} must be 'm' or 'n'")
    if self.grid_minor_dim not in ("m", "n"):
      raise ValueError(f"{self.grid_minor_dim=} must be 'm' or 'n'")
    if self.grid_tile_width < 1:
      raise ValueError(f"{self.grid_tile_width=} must be >= 1")
    if self.block_m % self.epi_block_m or self.block_n % self.epi_block_n:
      raise ValueError(f"{self.epi_block_m=} and {self.epi_block_n=} must"
                       f" divide {self.block_m=} and {self.block_n=}")
    if self.wgmma_depth not in (0, 1):
      raise ValueError(f"{self.wgmma_depth=} must be 0 or 1")
    if self.num_sms is not None and self.num_sms < 1:
      raise ValueError(f"{self.num_sms=} must be >= 1")
    if self.group_convert not in ("magic", "cvt"):
      raise ValueError(f"{self.group_convert=} must be 'magic' or 'cvt'")

  @property
  def cta_m(self) -> int:
    return self.block_m * (2 if self.wg_dimension == "m" else 1)

  @property
  def cta_n(self) -> int:
    return self.block_n * (2 if self.wg_dimension == "n" else 1)


_SMEM_BYTES = 232448  # Per-block shared memory on an H100 (sm_90).
# int32 -> f32 by bits: f32 with bits 0x4B400000 + s is 2**23 + 2**22 + s.
_MAGIC_INT, _MAGIC_FLOAT = 0x4B400000, 12582912.0


def smem_bytes(cfg: W4A4MosaicConfig, *, x_int4: bool, w_int4: bool,
               out_dtype, residual: bool = False,
               grouped: bool = False) -> int:
  """Shared memory the kernel allocates for `cfg` (barriers excluded);
  `residual`: with a residual's staging (one epilogue chunk per
  warpgroup); `grouped`: with each step's group scales in the pipeline."""
  x_b, w_b = (0.5 if x_int4 else 1), (0.5 if w_int4 else 1)
  stage = cfg.cta_m * cfg.block_k * x_b + cfg.cta_n * cfg.block_k * w_b
  if grouped:
    stage += 4 * (cfg.cta_m + cfg.cta_n)
  widened = 4 * cfg.block_n * cfg.block_k if w_int4 else 0  # 2 slots per wg
  chunk = cfg.epi_block_m * cfg.epi_block_n * jnp.dtype(out_dtype).itemsize
  epilogue = (4 + (2 if residual else 0)) * chunk
  scales = 4 * 2 * (cfg.block_m + cfg.block_n)
  return int(cfg.max_concurrent_steps * stage + widened + epilogue + scales)


def default_w4a4_mosaic_config(*, x_int4: bool, w_int4: bool,
                               out_dtype) -> W4A4MosaicConfig:
  """Tiles: 128x128x128 per warpgroup, the deepest pipeline (<= 4) that fits.

  With int8 activations in shared memory one wgmma stays in flight across
  steps (depth 1); int4 activations are a register operand (depth 0).
  BENCHMARKS.md has the configs timed.
  """
  for steps in (4, 3, 2):
    cfg = W4A4MosaicConfig(max_concurrent_steps=steps,
                           wgmma_depth=0 if x_int4 else 1)
    if smem_bytes(cfg, x_int4=x_int4, w_int4=w_int4,
                  out_dtype=out_dtype) + 1024 <= _SMEM_BYTES:
      return cfg
  return cfg


def default_w4a4_mosaic_wt_config(out_dtype=jnp.bfloat16, *,
                                   residual: bool = False
                                   ) -> W4A4MosaicConfig:
  """Tiles of `w4a4_matmul_mosaic_wt` (yᵀ: block_m runs along N).

  The two compute warpgroups own 64 weight rows each (wg_dimension='m') and
  share one 256-token tile of codes, so each weight fragment widened in
  registers feeds 256 tokens (128-token tiles were 4-20% slower); 256-wide
  K steps, 2 deep (two 256 x 256 int8 code tiles already take 128 KB of
  shared memory). Fastest or within 3% of the fastest of seven configs at
  the 16 LLaMA-2-7B/13B prefill shapes (H200, 2026-12-04,
  `bench_int4_matmul --variants=mosaic_wt`; BENCHMARKS.md). A 32-bit
  `out_dtype` doubles the epilogue's staging and overflows shared memory
  by 64 bytes there: 128-wide K steps, 3 deep, instead. `residual`: the
  epilogue also stages a residual (16 KB more in bf16).
  """
  for block_k, steps in ((256, 2), (128, 3), (128, 2)):
    cfg = W4A4MosaicConfig(wg_dimension="m", block_m=64, block_n=256,
                           block_k=block_k, max_concurrent_steps=steps)
    if smem_bytes(cfg, x_int4=True, w_int4=False, out_dtype=out_dtype,
                  residual=residual) + 1024 <= _SMEM_BYTES:
      return cfg
  return cfg


def default_w4a4_mosaic_wt_grouped_config(group_size: int,
                                           out_dtype=jnp.bfloat16, *,
                                           residual: bool = False
                                           ) -> W4A4MosaicConfig:
  """Tiles of `w4a4_matmul_mosaic_wt` with group scales along K.

  One pipeline step is one K group (block_k = group_size), so each step's
  int32 wgmma sum is scaled and added to an f32 accumulator carried in
  registers. That carry doubles the accumulator registers, so the token
  tile is 128 (a 64 x 256 int32 accumulator plus its f32 twin would take
  every register a thread has: 256 tokens ran 1.3-1.5x slower, 192 and
  64 1.1-1.4x); the pipeline is as deep (<= 4) as fits; each group is
  added under the next group's wgmma (2-5% faster than after it) and
  converted by bits (5-8% faster than I2F). H100, 2026-12-05,
  `bench_int4_matmul --variants=mosaic_wt_g128`; BENCHMARKS.md.
  """
  for steps in (4, 3, 2):
    cfg = W4A4MosaicConfig(wg_dimension="m", block_m=64, block_n=128,
                           block_k=group_size, max_concurrent_steps=steps,
                           group_overlap=True)
    if smem_bytes(cfg, x_int4=True, w_int4=False, out_dtype=out_dtype,
                  residual=residual, grouped=True) + 1024 <= _SMEM_BYTES:
      return cfg
  return cfg


def _transforms(minor_elems: int, dtype) -> tuple[int, tuple]:
  """Swizzle (bytes) and tiling+swizzle transforms for a smem tile."""
  bits = jnp.iinfo(dtype).bits if jnp.issubdtype(
      dtype, jnp.integer) else jnp.finfo(dtype).bits
  swizzle = plgpu.find_swizzle(minor_elems * bits)
  return swizzle, (plgpu.TilingTransform((8, swizzle * 8 // bits)),
                   plgpu.SwizzleTransform(swizzle))


def _load(ref, layout) -> jax.Array:
  """Smem -> registers in a pinned layout (wgmma's register operand's)."""
  return plgpu.load(ref, (), layout=layout)


def w4a4_matmul_mosaic_kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, o_gmem,
                              o_smem, sx_smem, sw_smem, s_barrier,
                              w8_smem=None, r_gmem=None, r_smem=None,
                              r_barrier=None, *, cfg: W4A4MosaicConfig,
                              col_scale_first: bool = False,
                              transpose_out: bool = False):
  """Persistent warp-specialized kernel body (one CTA per SM).

  Args:
    x_gmem: int4[M, K] activations (operand A, widened in registers), or
      int8[M, K] (operand A straight from shared memory).
    w_gmem: int4[N, K] weights (widened to int8 in the kernel), or
      int8[N, K] with values in [-8, 7]; operand B, K-major.
    sx_gmem: f32[M] per-token scales, or f32[G, M] group scales (one
      row per K group of block_k values: each pipeline step is one group).
    sw_gmem: f32[N] per-channel scales, or f32[G, N] group scales (only
      with sx_gmem grouped). With sx_gmem grouped and sw_gmem 1-D, y =
      (sum over groups of acc * sx) * sw: one multiply-add an element and
      group, sw once at the end.
    o_gmem: [M, N] output ([N, M] with transpose_out).
    o_smem: [2, 2, epi_block_m, epi_block_n] epilogue staging (per warpgroup,
      two slots; [2, 2, epi_block_n, epi_block_m] with transpose_out).
    sx_smem: f32[2, block_m] scale tiles (per warpgroup).
    sw_smem: f32[2, block_n] scale tiles (per warpgroup).
    s_barrier: 4 barriers, the scale copies of (warpgroup, which).
    (sx_smem, sw_smem and s_barrier go unused with group scales, which
    travel through the pipeline with their K step.)
    w8_smem: int8[2, 2, block_n, block_k] widened weight tiles (per
      warpgroup, two slots) when w_gmem is int4, else None.
    r_gmem: a residual shaped like o_gmem, added to y in the epilogue
      (`out_dtype(f32(out_dtype(y)) + f32(r))`: XLA's `y + r`), or None.
      Only with transpose_out.
    r_smem: [2, epi_block_n, epi_block_m] residual staging (one chunk per
      warpgroup, loaded one chunk ahead of its use) with r_gmem.
    r_barrier: 2 barriers, the residual copies of each warpgroup.
    cfg: tiles; M, N, K must be multiples of the CTA tile and block_k.
    col_scale_first: y = (acc * sw) * sx instead of (acc * sx) * sw, the
      f32 order of the untransposed product when the kernel computes yᵀ
      (`w4a4_matmul_mosaic_wt`: weights in x's place).
    transpose_out: store yᵀ: each epilogue chunk is transposed in registers
      (WGMMA -> WGMMA_TRANSPOSED, a lane shuffle) and written through a
      transposed view of its staging tile, so the TMA store writes rows of
      yᵀ (`w4a4_matmul_mosaic_wt` hands back y [tokens, N] this way).
  """
  m, k = x_gmem.shape
  n = w_gmem.shape[0]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  m_iters, n_iters, k_iters = m // cfg.cta_m, n // cfg.cta_n, k // bk
  _, x_tf = _transforms(bk, x_gmem.dtype)
  _, w_tf = _transforms(bk, w_gmem.dtype)
  delay = cfg.wgmma_depth
  if delay and x_gmem.dtype == jnp.int4:
    raise ValueError("wgmma_depth=1 needs int8 activations in smem; int4"
                     " activations are a register operand (depth 0)")
  grouped = sx_gmem.ndim == 2
  cols_grouped = sw_gmem.ndim == 2  # else sw scales the f32 sum at the end
  if cols_grouped and not grouped:
    raise ValueError("grouped sw_gmem needs grouped sx_gmem")
  if grouped and (delay or x_gmem.dtype != jnp.int4
                  or sx_gmem.shape[0] != k_iters):
    raise ValueError("group scales need int4 operand A at wgmma depth 0 and"
                     f" one group per K step; got {sx_gmem.shape[0]} groups"
                     f" for {k_iters} steps")
  # Group scales: row kk of [G, rows] is step kk's, [1, cta rows] a step.
  scale_specs = [plgpu.BlockSpec((1, cfg.cta_m), lambda kk: (kk, 0))
                 ] if grouped else []
  if cols_grouped:
    scale_specs.append(plgpu.BlockSpec((1, cfg.cta_n), lambda kk: (kk, 0)))
  grouped_operands = ((sx_gmem, sw_gmem) if cols_grouped
                      else (sx_gmem,) if grouped else ())

  def get_pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[
            # x: int4[cta_m, block_k]; w: int8[cta_n, block_k]
            plgpu.BlockSpec((cfg.cta_m, bk), lambda kk: (0, kk),
                            transforms=x_tf, memory_space=plgpu.SMEM,
                            delay_release=delay),
            plgpu.BlockSpec((cfg.cta_n, bk), lambda kk: (0, kk),
                            transforms=w_tf, memory_space=plgpu.SMEM,
                            delay_release=delay),
            *scale_specs,
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )

  ignore = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped,
      allocs=get_pipeline(ignore, ignore).get_allocations(
          x_gmem, w_gmem, *grouped_operands),
      collective_axes="wg")
  def _scope(allocs):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _tile_loop(info):
      (lin,) = info.index
      mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters),
                                  1 if cfg.grid_minor_dim == "n" else 0,
                                  cfg.grid_tile_width)
      cta_m = pl.ds(mi * cfg.cta_m, cfg.cta_m)
      cta_n = pl.ds(ni * cfg.cta_n, cfg.cta_n)
      if cfg.wg_dimension == "m":
        wg_m, wg_n = pl.ds(wg * bm, bm), slice(None)
        m0, n0 = mi * cfg.cta_m + wg * bm, ni * cfg.cta_n
      else:
        wg_m, wg_n = slice(None), pl.ds(wg * bn, bn)
        m0, n0 = mi * cfg.cta_m, ni * cfg.cta_n + wg * bn

      em, en = cfg.epi_block_m, cfg.epi_block_n
      chunks = [(i, j) for i in range(bm // em) for j in range(bn // en)]

      def out_chunk(ref, i, j):  # chunk (i, j) of this warpgroup's tile
        if transpose_out:
          return ref.at[cta_n, cta_m].at[wg_n, wg_m].at[
              pl.ds(j * en, en), pl.ds(i * em, em)]
        return ref.at[cta_m, cta_n].at[wg_m, wg_n].at[
            pl.ds(i * em, em), pl.ds(j * en, en)]

      def fetch_residual(c):  # chunk c of the residual, TMA into r_smem
        plgpu.copy_gmem_to_smem(out_chunk(r_gmem, *chunks[c]),
                                r_smem.at[wg], r_barrier.at[wg])

      def scale(acc, sx, sw):  # f32 acc [bm, bn]; sx [bm], sw [bn]
        rows = lax.broadcast_in_dim(sx, (bm, bn), (0,))
        cols = lax.broadcast_in_dim(sw, (bm, bn), (1,))
        return (acc * cols * rows) if col_scale_first else (acc * rows * cols)

      def store(y):  # y: f32[bm, bn] (WGMMA layout), scaled
        y = y.astype(o_gmem.dtype)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        for c, (i, j) in enumerate(chunks):
          slot = c % 2
          plgpu.wait_smem_to_gmem(1, wait_read_only=True)
          chunk = y[i * em:(i + 1) * em, j * en:(j + 1) * en]
          if transpose_out:
            chunk = plgpu.layout_cast(chunk, plgpu.Layout.WGMMA_TRANSPOSED)
            if r_gmem is not None:
              plgpu.barrier_wait(r_barrier.at[wg])
              r = plgpu.load(plgpu.transpose_ref(r_smem.at[wg], (1, 0)), (),
                             layout=plgpu.Layout.WGMMA_TRANSPOSED)
              chunk = (chunk.astype(jnp.float32)
                       + r.astype(jnp.float32)).astype(o_gmem.dtype)
            plgpu.transpose_ref(o_smem.at[wg, slot], (1, 0))[...] = chunk
          else:
            o_smem[wg, slot] = chunk
          plgpu.commit_smem()  # also a warpgroup barrier: r_smem is read
          if r_gmem is not None and c + 1 < len(chunks):
            fetch_residual(c + 1)
          plgpu.copy_smem_to_gmem(o_smem.at[wg, slot],
                                  out_chunk(o_gmem, i, j))

      def compute_context(eval_pipeline):
        if grouped:  # The pipeline carries y in f32; scales come per step.
          if not cols_grouped:  # sw of this tile: TMA now, used at the end
            plgpu.copy_gmem_to_smem(sw_gmem.at[pl.ds(n0, bn)],
                                    sw_smem.at[wg], s_barrier.at[2 * wg + 1])
          if r_gmem is not None:  # the first residual chunk, under K
            fetch_residual(0)
          zeros = lambda shape, dtype, layout: plgpu.layout_cast(
              jnp.zeros(shape, dtype), layout)
          y = zeros((bm, bn), jnp.float32, plgpu.Layout.WGMMA)
          if cfg.group_overlap:
            # The carry holds the previous group's sum and scales, added to
            # y while the next group's wgmma runs; the first "previous"
            # group is zeros (y + 0 * 0 = y), the last is added here.
            prev = (zeros((bm, bn), jnp.int32, plgpu.Layout.WGMMA),
                    zeros((bm,), jnp.float32, plgpu.Layout.WGMMA.reduce(1)))
            if cols_grouped:
              prev += (zeros((bn,), jnp.float32,
                             plgpu.Layout.WGMMA.reduce(0)),)
            y, prev = eval_pipeline((y, prev))
            y = add_group(y, *prev)
          else:
            y = eval_pipeline(y)
          if not cols_grouped:
            plgpu.barrier_wait(s_barrier.at[2 * wg + 1])
            y = y * lax.broadcast_in_dim(
                _load(sw_smem.at[wg], plgpu.Layout.WGMMA.reduce(0)),
                (bm, bn), (1,))
          store(y)
          return
        # Scales of this tile: TMA now, used after the K loop.
        plgpu.copy_gmem_to_smem(sx_gmem.at[pl.ds(m0, bm)], sx_smem.at[wg],
                                s_barrier.at[2 * wg])
        plgpu.copy_gmem_to_smem(sw_gmem.at[pl.ds(n0, bn)], sw_smem.at[wg],
                                s_barrier.at[2 * wg + 1])
        if r_gmem is not None:  # the first residual chunk, under the K loop
          fetch_residual(0)

        @functools.partial(pl.run_scoped,
                           acc_ref=plgpu.ACC((bm, bn), jnp.int32))
        def _acc_scope(acc_ref):
          eval_pipeline(acc_ref)
          plgpu.wgmma_wait(0)
          plgpu.barrier_wait(s_barrier.at[2 * wg])
          plgpu.barrier_wait(s_barrier.at[2 * wg + 1])
          sx = _load(sx_smem.at[wg], plgpu.Layout.WGMMA.reduce(1))
          sw = _load(sw_smem.at[wg], plgpu.Layout.WGMMA.reduce(0))
          store(scale(acc_ref[...].astype(jnp.float32), sx, sw))

      def add_group(y, acc, sx, sw=None):  # y + scale(f32(acc), sx, sw)
        if cfg.group_convert == "magic":  # |acc| <= 64 * block_k < 2**22
          acc = lax.bitcast_convert_type(acc + _MAGIC_INT, jnp.float32)
          acc = acc - _MAGIC_FLOAT
        else:
          acc = acc.astype(jnp.float32)
        if sw is None:  # rows only: one multiply-add (sw after the sum)
          return y + acc * lax.broadcast_in_dim(sx, (bm, bn), (0,))
        return y + scale(acc, sx, sw)

      def grouped_body(idx, x_smem, w_smem, sxg_smem, *rest):
        # One K group: its exact int32 sum in a fresh accumulator, then
        # y += (sum * one scale) * the other, in the reference's f32 order
        # (with 1-D sw: y += sum * sx, sw applied after the last group).
        del idx
        *swg_smem, carry = rest
        a = _load(x_smem.at[wg_m], plgpu.Layout.WGMMA_8BIT).astype(jnp.int8)
        scales = (_load(sxg_smem.at[0, wg_m], plgpu.Layout.WGMMA.reduce(1)),)
        if swg_smem:
          scales += (_load(swg_smem[0].at[0, wg_n],
                           plgpu.Layout.WGMMA.reduce(0)),)

        def dot(acc_ref):
          plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(w_smem.at[wg_n], (1, 0)))
          y = None
          if cfg.group_overlap:  # the previous group, under this wgmma
            # The barrier keeps the compiler from sinking the adds below
            # the wait (attention_mgpu does the same with its softmax).
            y = lax.optimization_barrier(add_group(carry[0], *carry[1]))
          plgpu.wgmma_wait(0)
          return acc_ref[...], y

        acc, y = pl.run_scoped(dot, plgpu.ACC((bm, bn), jnp.int32))
        if cfg.group_overlap:
          return y, (acc, *scales)
        return add_group(carry, acc, *scales)

      def mma_body(idx, x_smem, w_smem, acc_ref):
        # x_smem: int4 or int8[cta_m, block_k]
        # w_smem: int4 or int8[cta_n, block_k]
        if x_gmem.dtype == jnp.int4:  # wgmma's register operand.
          a = _load(x_smem.at[wg_m], plgpu.Layout.WGMMA_8BIT).astype(jnp.int8)
        else:
          a = x_smem.at[wg_m]
        if w8_smem is None:
          b = w_smem.at[wg_n]
        else:
          # wgmma's smem operand must be 8-bit: widen this warpgroup's int4
          # weight tile through registers into its own int8 buffer. Two
          # slots, so a wgmma still in flight (depth 1) keeps its operand.
          (kk,) = idx
          b = w8_smem.at[wg, kk % 2 if delay else 0]
          b[...] = _load(w_smem.at[wg_n],
                         plgpu.Layout.WGMMA_8BIT).astype(jnp.int8)
          plgpu.commit_smem()  # Generic-proxy stores -> wgmma's async reads.
        plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b, (1, 0)))
        # depth 1 (smem operands only): this step's wgmma overlaps the next
        # step's weight widening; the pipeline holds each smem slot one step
        # longer (delay_release). A register operand must not be overwritten
        # while its wgmma runs, and Pallas cannot pin registers, so int4 x
        # runs at depth 0 (measured: depth 1 gave wrong results).
        plgpu.wgmma_wait(delay)
        return acc_ref

      operands = [x_gmem.at[cta_m, :], w_gmem.at[cta_n, :]]
      if grouped:
        operands.append(sx_gmem.at[:, cta_m])
      if cols_grouped:
        operands.append(sw_gmem.at[:, cta_n])
      get_pipeline(grouped_body if grouped else mma_body, compute_context)(
          *operands, allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def packed_to_int4(x_q: jax.Array) -> jax.Array:
  """Reinterprets packed bytes as a jnp.int4 array (no unpack).

  Args:
    x_q: uint8[..., K // 2], low nibble = even index (`int4_layout`).

  Returns:
    int4[..., K] with element 2j = low nibble of byte j.
  """
  # [..., K // 2, 2]: XLA splits each byte low nibble first.
  x4 = lax.bitcast_convert_type(x_q, jnp.int4)
  # [..., K]
  return x4.reshape(*x_q.shape[:-1], 2 * x_q.shape[-1])


def unpack_weights(w_q: jax.Array) -> jax.Array:
  """Widens packed int4 weights to the kernel's int8 operand B.

  Args:
    w_q: uint8[N, K // 2] packed int4 (`int4_layout`).

  Returns:
    int8[N, K], values in [-8, 7], for `w4a4_matmul_mosaic_w8`.
  """
  return int4_layout.unpack_int4(w_q, signed=True)


def can_use_w4a4_mosaic() -> bool:
  """True on a Hopper GPU (sm_90), where the Mosaic GPU kernel runs."""
  if jax.default_backend() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", "")
  return str(cc).startswith("9.")


def _num_sms(cfg: W4A4MosaicConfig) -> int:
  if cfg.num_sms is not None:
    return cfg.num_sms
  return device_info.num_sms()


def _check(x, w, s_x, s_w, w_dtype):
  """Shared argument checks; returns (M, N, K)."""
  m, n = x.shape[0], w.shape[0]
  if x.dtype not in (jnp.uint8, jnp.int8) or w.dtype != w_dtype:
    raise ValueError(f"x must be uint8 (packed int4) or int8 and w"
                     f" {jnp.dtype(w_dtype).name}, got {x.dtype=}"
                     f" {w.dtype=}")
  k = x.shape[1] * (2 if x.dtype == jnp.uint8 else 1)
  if w.shape[1] * (2 if w.dtype == jnp.uint8 else 1) != k:
    raise ValueError(f"K differs: x {x.shape} {x.dtype}, w {w.shape}"
                     f" {w.dtype}")
  if s_x.shape != (m,) or s_w.shape != (n,):
    raise ValueError(f"scales must be [M]=[{m}] and [N]=[{n}], got"
                     f" {s_x.shape=} {s_w.shape=}")
  return m, n, k


def _mgpu_matmul(x, w, s_x, s_w, *, x_operand, out_dtype, config, debug,
                 col_scale_first=False, transpose_out=False,
                 kernel_name="w4a4_matmul_mosaic", residual=None):
  """Pads to the tiles and runs the kernel.

  x is packed uint8[M, K // 2] or int8[M, K]; w is packed uint8[N, K // 2]
  (handed to the kernel as int4 and widened there) or int8[N, K]. Returns
  y [M, N], or yᵀ [N, M] with transpose_out; `residual` (with
  transpose_out only) is shaped like what is returned and added to it.
  """
  if residual is not None and not transpose_out:
    raise NotImplementedError("a residual needs transpose_out")
  m, n = x.shape[0], w.shape[0]
  if x_operand not in ("smem", "registers"):
    raise ValueError(f"{x_operand=} must be 'smem' or 'registers'")
  if x.dtype == jnp.uint8 and x_operand == "smem":
    x = int4_layout.unpack_int4(x, signed=True)  # One XLA pass over x.
  cfg = config or default_w4a4_mosaic_config(
      x_int4=x.dtype == jnp.uint8, w_int4=w.dtype == jnp.uint8,
      out_dtype=out_dtype)
  pad = padding.pad_to
  if x.dtype == jnp.uint8:
    x = packed_to_int4(pad(pad(x, 0, cfg.cta_m), 1, cfg.block_k // 2))
  else:
    x = pad(pad(x, 0, cfg.cta_m), 1, cfg.block_k)
  if w.dtype == jnp.uint8:
    w = packed_to_int4(pad(pad(w, 0, cfg.cta_n), 1, cfg.block_k // 2))
  else:
    w = pad(pad(w, 0, cfg.cta_n), 1, cfg.block_k)
  # Group scales [rows, G] -> [G, rows]: a row a K step.
  sx, sw = s_x.astype(jnp.float32), s_w.astype(jnp.float32)
  sx = pad(sx.T, 1, cfg.cta_m) if sx.ndim == 2 else pad(sx, 0, cfg.cta_m)
  sw = pad(sw.T, 1, cfg.cta_n) if sw.ndim == 2 else pad(sw, 0, cfg.cta_n)
  mp, np_ = x.shape[0], w.shape[0]
  scratch = {}
  if w.dtype == jnp.int4:
    _, w8_tf = _transforms(cfg.block_k, jnp.int8)
    scratch["w8_smem"] = plgpu.SMEM((2, 2, cfg.block_n, cfg.block_k),
                                    jnp.int8, transforms=w8_tf)
  em, en = cfg.epi_block_m, cfg.epi_block_n
  out_shape, epi_tile = (mp, np_), (em, en)
  if transpose_out:
    out_shape, epi_tile = (np_, mp), (en, em)
  _, o_tf = _transforms(epi_tile[1], out_dtype)
  body = functools.partial(w4a4_matmul_mosaic_kernel, cfg=cfg,
                           col_scale_first=col_scale_first,
                           transpose_out=transpose_out)
  operands = [x, w, sx, sw]
  if residual is not None:
    if residual.shape != (n, m) or residual.dtype != out_dtype:
      raise ValueError(f"residual must be {jnp.dtype(out_dtype).name}"
                       f"{[n, m]}, got {residual.dtype.name}"
                       f"{list(residual.shape)}")
    operands.append(pad(pad(residual, 0, cfg.cta_n), 1, cfg.cta_m))
    scratch["r_smem"] = plgpu.SMEM((2, *epi_tile), out_dtype,
                                   transforms=o_tf)
    scratch["r_barrier"] = plgpu.Barrier(num_barriers=2)
    unfused = body

    def body(x_gmem, w_gmem, sx_gmem, sw_gmem, r_gmem, o_gmem, **refs):
      unfused(x_gmem, w_gmem, sx_gmem, sw_gmem, o_gmem, r_gmem=r_gmem,
              **refs)
  call = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
      scratch_types=dict(
          o_smem=plgpu.SMEM((2, 2, *epi_tile), out_dtype, transforms=o_tf),
          sx_smem=plgpu.SMEM((2, cfg.block_m), jnp.float32),
          sw_smem=plgpu.SMEM((2, cfg.block_n), jnp.float32),
          s_barrier=plgpu.Barrier(num_barriers=4),
          **scratch,
      ),
      grid=(_num_sms(cfg),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      kernel_name=kernel_name,
  )
  if debug:
    print(jax.make_jaxpr(call)(*operands))
  out = call(*operands)
  return out[:n, :m] if transpose_out else out[:m, :n]


_STATIC = ("x_operand", "out_dtype", "config", "debug")


@functools.partial(jax.jit, static_argnames=_STATIC)
def w4a4_matmul_mosaic(x: jax.Array, w_q: jax.Array, s_x: jax.Array,
                       s_w: jax.Array, *,
                       x_operand: Literal["smem", "registers"] = "registers",
                       out_dtype=jnp.bfloat16,
                       config: W4A4MosaicConfig | None = None,
                       debug: bool = False) -> jax.Array:
  """W4A4 matmul with per-token and per-channel scales (Mosaic GPU, Hopper).

  Args:
    x: uint8[M, K // 2] packed int4 activations, or int8[M, K] int4 values.
    w_q: uint8[N, K // 2] packed int4 weights (widened to int8 in the
      kernel, tile by tile, in shared memory).
    s_x: f32[M] per-token scales.
    s_w: f32[N] per-output-channel scales.
    x_operand: 'registers' streams packed x as int4 and widens it in
      registers (half the activation bytes, but each wgmma must finish
      before the next step); 'smem' feeds int8 activations to the wgmma from
      shared memory (packed x is widened to int8 by XLA first), which lets
      one wgmma run while the next weight tile is widened. int8 x always
      goes through shared memory. BENCHMARKS.md compares them.
    out_dtype: dtype of y.
    config: tiles; `default_w4a4_mosaic_config` when None.
    debug: print the kernel's jaxpr.

  Returns:
    y: [M, N] in `out_dtype`.

  Raises:
    ValueError: shapes, dtypes or options that do not fit together.
  """
  _check(x, w_q, s_x, s_w, jnp.uint8)
  return _mgpu_matmul(x, w_q, s_x, s_w, x_operand=x_operand,
                      out_dtype=out_dtype, config=config, debug=debug)


@functools.partial(jax.jit, static_argnames=_STATIC)
def w4a4_matmul_mosaic_w8(x: jax.Array, w_i8: jax.Array, s_x: jax.Array,
                          s_w: jax.Array, *,
                          x_operand: Literal["smem", "registers"] = "registers",
                          out_dtype=jnp.bfloat16,
                          config: W4A4MosaicConfig | None = None,
                          debug: bool = False) -> jax.Array:
  """`w4a4_matmul_mosaic` with weights already widened by `unpack_weights`.

  A benchmark diagnostic (twice the weight memory; the model does not run
  it): how much of the kernel's time the in-kernel weight widening takes.

  Args:
    x: uint8[M, K // 2] packed int4 activations, or int8[M, K] int4 values.
    w_i8: int8[N, K] int4 weight values in [-8, 7] (not checked).
    s_x: f32[M] per-token scales.
    s_w: f32[N] per-output-channel scales.
    x_operand: as in `w4a4_matmul_mosaic`.
    out_dtype: dtype of y.
    config: tiles; `default_w4a4_mosaic_config` when None.
    debug: print the kernel's jaxpr.

  Returns:
    y: [M, N] in `out_dtype`.

  Raises:
    ValueError: shapes, dtypes or options that do not fit together.
  """
  _check(x, w_i8, s_x, s_w, jnp.int8)
  return _mgpu_matmul(x, w_i8, s_x, s_w, x_operand=x_operand,
                      out_dtype=out_dtype, config=config, debug=debug)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config",
                                             "transposed", "debug"))
def w4a4_matmul_mosaic_wt(x: jax.Array, w_q: jax.Array, s_x: jax.Array,
                          s_w: jax.Array, *, out_dtype=jnp.bfloat16,
                          config: W4A4MosaicConfig | None = None,
                          transposed: bool = False,
                          residual: jax.Array | None = None,
                          debug: bool = False) -> jax.Array:
  """y = (x · w_qᵀ) * s_x * s_w, the weights as wgmma's register operand.

  With group scales (QuaRot's 128G mode: s_x [M, G] and/or s_w [N, G], one
  scale per K group of K / G values) each pipeline step is one group: its
  exact int32 sum, in a fresh accumulator, is scaled and added to an f32
  accumulator the pipeline carries, in the reference's order (groups in
  order, (sum * s_x) * s_w), so y matches `reference.w4a4_matmul_reference`
  up to f32 contraction (FMA) of those few terms. With s_w grouped and s_x
  per token (the model's mode) y = (sum over groups of sum * s_w) * s_x:
  one multiply-add an element and group instead of two products and an
  add, equal to the reference up to f32 rounding.

  The same kernel with the operands' roles swapped: it computes yᵀ = w_q ·
  xᵀ, the int4 weight tile as operand A, widened int4 -> int8 in registers
  (no shared-memory round trip, the cost of `w4a4_matmul_mosaic`'s weight
  widening), and the int8 activation codes as operand B, straight from
  shared memory. The epilogue transposes each tile in registers and stores
  y [M, N] (`transposed=False`), `w4a4_matmul_mosaic`'s y bit for bit (the
  scales are applied in the same f32 order). Storing yᵀ as computed and
  leaving the transpose to XLA's consumers (RoPE, SwiGLU, the residual add)
  cost a 7B layer 3.5 ms of transposing fusions at 32768 tokens (H200,
  2026-12-04, `experiments/prefill_layer_kernels.py`); `transposed=True`
  keeps that layout for the benchmark.

  Args:
    x: int8[M, K] activation codes in [-8, 7], or uint8[M, K // 2] packed
      (widened to int8 by XLA first).
    w_q: uint8[N, K // 2] packed int4 weights.
    s_x: f32[M] per-token scales, or f32[M, G] group scales.
    s_w: f32[N] per-output-channel scales, or f32[N, G]. With either
      grouped, K / G must be a multiple of 128 (the wgmma K step).
    out_dtype: dtype of yᵀ.
    config: tiles of the [N, M] product (block_m along N, block_n along M;
      block_k = K / G when grouped); `default_w4a4_mosaic_wt_config` (or
      `default_w4a4_mosaic_wt_grouped_config`) when None.
    transposed: return yᵀ [N, M], the product's own layout.
    residual: `out_dtype`[M, N] added to y in the epilogue, rounded as
      XLA's `y + residual` (y rounded to `out_dtype` first, the sum in f32,
      rounded again), or None. Each warpgroup loads its residual chunks by
      TMA one chunk ahead, so the layer's residual add is no separate pass
      over [M, N]. Not with `transposed`.
    debug: print the kernel's jaxpr.

  Returns:
    y: [M, N] in `out_dtype` (yᵀ: [N, M] with `transposed`), plus the
    residual if one is given.

  Raises:
    ValueError: shapes, dtypes or options that do not fit together.
  """
  grouped = s_x.ndim == 2 or s_w.ndim == 2
  if grouped:
    reference.check_operands(x, w_q, s_x, s_w)
    gx, s_w, group_size = reference.group_scales(s_x, s_w,
                                                 2 * w_q.shape[1])
    # Per-token s_x stays 1-D (the model's 128G mode: weights grouped):
    # the kernel applies it once, after the group sum.
    s_x = s_x if s_x.ndim == 1 else gx
    if group_size % _LANE or 64 * group_size >= 2**22:
      raise ValueError(f"group size K / G = {group_size} must be a multiple"
                       f" of {_LANE} (one wgmma K step) below 65536")
    config = config or default_w4a4_mosaic_wt_grouped_config(
        group_size, out_dtype, residual=residual is not None)
    if config.block_k != group_size:
      raise ValueError(f"{config.block_k=} must equal the group size"
                       f" {group_size}: one pipeline step per group")
  else:
    _check(x, w_q, s_x, s_w, jnp.uint8)
  if residual is not None and transposed:
    raise ValueError("residual is added to y [M, N]: not with transposed")
  if x.dtype == jnp.uint8:
    x = int4_layout.unpack_int4(x, signed=True)
  config = config or default_w4a4_mosaic_wt_config(
      out_dtype, residual=residual is not None)
  return _mgpu_matmul(w_q, x, s_w, s_x, x_operand="registers",
                      out_dtype=out_dtype, config=config, debug=debug,
                      col_scale_first=True, transpose_out=not transposed,
                      kernel_name="w4a4_matmul_mosaic_wt"
                      + ("_grouped" if grouped else ""),
                      residual=residual)
