"""4-bit decode matmul: a few tokens times packed int4 weights, one pass.

  y[M, N] = (x[M, K] · w_q[N, K]ᵀ) * s_x[M, 1] * s_w[1, N]

Matmul axes are M (tokens, 1..16 at decode), N (output channels) and K
(input channels). w_q is uint8[N, K // 2] in the packed int4 layout of
`pallas_kernels/int4_layout.py` (two signed nibbles per byte along K, low
nibble = even index); s_w is f32[N] per output channel. One kernel serves
two numerics:
  * W4A16: x bf16 (f16/f32 are rounded to bf16 for the tensor cores), no
    s_x; y = (x · wᵀ) * s_w.
  * W4A4, exactly as the simulated model: x int8[M, K] codes in [-8, 7] and
    s_x f32[M]. Codes are exact in bf16 and each product of two codes is an
    integer of magnitude <= 64, so every f32 partial sum is an integer below
    64 * K < 2^24 (K <= 262143): the f32 accumulation is exact in any order
    and y = (acc * s_x) * s_w equals the int32 reference bit for bit. The
    Mosaic kernel runs these codes through int8 wgmma instead by default
    (`w4a4_mma='int8'`: nibbles widened to int8 only, int32 accumulator,
    x read as int8), which is exact too and measured 1.3x faster.

At decode M is tiny and the op reads every weight byte once, so it is bound
by HBM bandwidth. The kernel puts the weights on the wide side of the matrix
unit: each program owns `block_n` weight rows and a range of K, multiplies
the unpacked weight tile [block_n, block_k] by the token tile
[block_k, Mp] (tokens padded to Mp = 8 or 16, the narrow side) and keeps an
f32 accumulator [block_n, Mp]. K is split over the grid (`split_k`, ranges
of whole `block_k` blocks, the last possibly shorter) so that enough
programs stream weights at once; each program writes its f32 partial sums
to f32[split_k, N, Mp] and the wrapper adds the splits, transposes, applies
the scales and casts (one XLA fusion, which the model can fuse further).

Backends:
  * 'mosaic' (Hopper): Pallas Mosaic GPU. Weight and token tiles are
    TMA-copied through a `num_stages`-deep shared-memory pipeline; the int4
    tile is loaded into registers (`w_layout`), widened to bf16 there (Mosaic
    GPU's int4 -> bf16 register cast: prmt + lop3 + sub.bf16x2 per pair) and
    used as wgmma's register operand A ([64·i, 64] per instruction), with the
    token tile as the shared-memory operand B (transposed view of x[Mp, K]).
    Needs N % 64 == 0 and K % 64 == 0. No interpreter runs it on a CPU
    (Mosaic GPU's interpreter rejects register wgmma operands), so it is
    tested on the GPU; the Triton kernel runs the same algorithm on the CPU.
  * 'triton': the same algorithm (grid, split-K ranges, partials) on the
    Pallas Triton lowering, with the unpacked nibbles fed to two bf16 dots
    against the even and odd columns of x (Mp = 16, Triton's smallest dot).
    It runs in interpret mode on the CPU, where the tests run it.
  * 'xla': `decode_matmul_reference`.

Not supported: M > 16 in the kernels (use the prefill matmuls), group
scales, bits other than 4, K not a multiple of 64.
"""

import dataclasses
import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import compat
from pallas_kernels import device_info
from pallas_kernels import int4_layout

Implementation = Literal["mosaic", "triton", "xla"]

MAX_M = 16  # tokens a kernel call takes: the wgmma/dot's narrow side
_NT = (((1,), (1,)), ((), ()))  # contract the K axes of [A, K] and [B, K]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeMatmulConfig:
  """Tiles of the decode matmul.

  Attributes:
    block_n: weight rows per program (Mosaic: a multiple of 64; the wrapper
      halves it to 64 when it does not divide N).
    block_k: K values per pipeline step (a power of two >= 64; the wrapper
      halves it until it divides K).
    split_k: programs along K; None = enough programs for
      `programs_per_sm` per streaming multiprocessor.
    programs_per_sm: target resident programs per SM for the automatic
      split_k (shared memory allows 2 at the default tiles).
    num_stages: pipeline depth (Mosaic: shared-memory slots; Triton: its
      software pipeliner's stages).
    num_warps: Triton only: warps per program.
    w_layout: Mosaic only: register layout the int4 tile is loaded in.
      'upcast_4x' loads 8 nibbles per 32-bit shared-memory load and moves
      them to the wgmma layout with a warp shuffle; 'wgmma' loads the wgmma
      layout directly (one byte per load).
    w4a4_mma: Mosaic only, int8 codes x: 'bf16' (codes widened to bf16,
      the W4A16 kernel) or 'int8' (int8 wgmma, int32 accumulator: nibbles
      widened to int8 only, x read as int8).
    warp_specialized: Mosaic only: a producer warpgroup issues the TMA
      copies (`emit_pipeline_warp_specialized`) while the compute
      warpgroup unpacks and multiplies; False: one warpgroup does both
      (`emit_pipeline`). Bit-exact, but slower on the 7B shapes (H200,
      2026-12-03: 0.16-0.38 of HBM against 0.28-0.48 at M = 1 and 16,
      `results/decode_matmul.jsonl`): kept for the comparison.
  """

  block_n: int = 128
  block_k: int = 256
  split_k: int | None = None
  programs_per_sm: int = 2
  num_stages: int = 4
  num_warps: int = 4
  w_layout: Literal["upcast_4x", "wgmma"] = "upcast_4x"
  w4a4_mma: Literal["bf16", "int8"] = "bf16"
  warp_specialized: bool = False

  def __post_init__(self):
    if self.block_n < 16 or self.block_n & (self.block_n - 1):
      raise ValueError(f"{self.block_n=} must be a power of two >= 16")
    if self.block_k < 64 or self.block_k & (self.block_k - 1):
      raise ValueError(f"{self.block_k=} must be a power of two >= 64")
    if self.split_k is not None and self.split_k < 1:
      raise ValueError(f"{self.split_k=} must be >= 1 (or None)")
    if self.programs_per_sm < 1:
      raise ValueError(f"{self.programs_per_sm=} must be >= 1")
    if self.num_stages < 2:
      raise ValueError(f"{self.num_stages=} must be >= 2")
    if self.w_layout not in ("upcast_4x", "wgmma"):
      raise ValueError(f"{self.w_layout=} must be 'upcast_4x' or 'wgmma'")
    if self.w4a4_mma not in ("bf16", "int8"):
      raise ValueError(f"{self.w4a4_mma=} must be 'bf16' or 'int8'")


def default_decode_matmul_config(implementation: str) -> DecodeMatmulConfig:
  """The fastest config measured for a backend (H200, 2026-11-30).

  Mosaic: 64-row tiles, 3 stages and 4 programs per SM beat the 128-row,
  4-stage, 2-per-SM tiles by 12-15% (7B qkv shape, M = 1 and 16), and the
  int8 MMA beats the bf16 one for W4A4 codes by 1.3x
  (results/decode_matmul.jsonl). Triton: the class defaults.
  """
  if implementation == "mosaic":
    return DecodeMatmulConfig(block_n=64, num_stages=3, programs_per_sm=4,
                              w4a4_mma="int8")
  return DecodeMatmulConfig()


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static shapes of one call: tiles and the K ranges of the splits."""

  m_pad: int  # Mp, tokens padded
  block_n: int
  block_k: int
  k_blocks: int  # K // block_k
  blocks_per_split: int  # q: split s covers blocks [s q, min((s+1) q, kb))
  split_k: int


def padded_rows(m: int, implementation: str) -> int:
  """Mp: the rows the kernel computes for M tokens (x is zero-padded to
  them); M itself for 'xla'. A caller that hands `decode_matmul` x with Mp
  rows already (and `rows=M`) saves the pad."""
  if implementation == "mosaic":
    return 8 if m <= 8 else 16
  return MAX_M if implementation == "triton" else m


def _plan(m: int, n: int, k: int, cfg: DecodeMatmulConfig,
          implementation: str) -> _Plan:
  """Tiles and K split for [M, K] x [N, K] (see `DecodeMatmulConfig`)."""
  m_pad = padded_rows(m, implementation)
  if implementation == "mosaic":
    block_n = cfg.block_n if n % cfg.block_n == 0 else 64
  else:  # a tile that divides N, so no weight pad (`_partials_triton`)
    block_n = cfg.block_n
    while n % block_n and block_n > 16:
      block_n //= 2
  block_k = cfg.block_k
  while k % block_k:
    block_k //= 2
  k_blocks = k // block_k
  n_tiles = pl.cdiv(n, block_n)
  split = cfg.split_k
  if split is None:
    split = max(1, (cfg.programs_per_sm * device_info.num_sms()) // n_tiles)
  # >= 2 blocks per split: a one-step pipeline gains nothing from stages.
  q = pl.cdiv(k_blocks, max(1, min(split, k_blocks // 2)))
  return _Plan(m_pad=m_pad, block_n=block_n, block_k=block_k,
               k_blocks=k_blocks, blocks_per_split=q,
               split_k=pl.cdiv(k_blocks, q))


def _split_steps(split: jax.Array, plan: _Plan) -> jax.Array | int:
  """K blocks of split `split` (static when all splits are equal)."""
  q = plan.blocks_per_split
  if plan.k_blocks % q == 0:
    return q
  return jnp.minimum(q, plan.k_blocks - split * q)


# --------------------------------------------------------------- Mosaic GPU


def decode_matmul_mosaic_kernel(w_gmem, x_gmem, o_gmem, o_smem, *,
                                plan: _Plan, num_stages: int,
                                w_layout: str, warp_specialized: bool):
  """One program: rows [n0, n0 + block_n) of w over split `s`'s K range."""
  # w_gmem: int4[N, K]; x_gmem: bf16[Mp, K]; o_gmem: f32[split_k, N, Mp]
  # o_smem: f32[block_n, Mp]
  # (int8 MMA: x_gmem int8[Mp, K] codes, and the operand A is int8.)
  ni, si = lax.axis_index("n"), lax.axis_index("s")
  bn, bk, mp = plan.block_n, plan.block_k, plan.m_pad
  q = plan.blocks_per_split
  int8_mma = x_gmem.dtype == jnp.int8
  x_bits = 8 if int8_mma else 16
  w_swizzle = plgpu.find_swizzle(4 * bk, "w")
  x_swizzle = plgpu.find_swizzle(x_bits * bk, "x")
  x_elems = x_swizzle * 8 // x_bits  # x per swizzle row: one wgmma K slice
  w_tf = (plgpu.TilingTransform((8, w_swizzle * 2)),
          plgpu.SwizzleTransform(w_swizzle))
  x_tf = (plgpu.TilingTransform((8, x_elems)),
          plgpu.SwizzleTransform(x_swizzle))
  n_sub = bk // x_elems
  acc_type = plgpu.ACC((bn, mp), jnp.int32 if int8_mma else jnp.float32)

  def step(w_smem, x_smem, acc_ref):
    # w_smem: int4[bn, bk]; x_smem: bf16 (or int8)[mp, bk]
    if int8_mma:
      w = plgpu.load(w_smem, (), layout=plgpu.Layout.WGMMA_8BIT)
    elif w_layout == "upcast_4x":
      w = plgpu.load(w_smem, (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
      w = plgpu.layout_cast(w, plgpu.Layout.WGMMA)
    else:
      w = plgpu.load(w_smem, (), layout=plgpu.Layout.WGMMA)
    if n_sub == 1:
      # The register operand of the previous step's wgmma must be dead
      # before this step's conversion may reuse its registers.
      plgpu.wgmma_wait(0)
    for j in range(n_sub):
      ks = slice(j * x_elems, (j + 1) * x_elems)
      plgpu.wgmma(acc_ref, w[:, ks].astype(
          jnp.int8 if int8_mma else jnp.bfloat16),
                  plgpu.transpose_ref(x_smem.at[:, ks], (1, 0)))
      plgpu.wgmma_wait(1)

  def store(acc_ref):  # the partial sums of this program, to o_gmem
    plgpu.wgmma_wait(0)
    o_smem[...] = acc_ref[...].astype(jnp.float32)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(ni * bn, bn)])
    plgpu.wait_smem_to_gmem(0)

  in_specs = [
      plgpu.BlockSpec((bn, bk), lambda kk: (0, kk + si * q),
                      transforms=w_tf, delay_release=1),
      plgpu.BlockSpec((mp, bk), lambda kk: (0, kk + si * q),
                      transforms=x_tf, delay_release=1),
  ]
  operands = (w_gmem.at[pl.ds(ni * bn, bn)], x_gmem)
  if warp_specialized:
    def body(_, w_smem, x_smem, acc_ref):
      step(w_smem, x_smem, acc_ref)
      return acc_ref

    def compute_context(eval_pipeline):
      pl.run_scoped(lambda acc_ref: store(eval_pipeline(acc_ref)), acc_type)

    plgpu.emit_pipeline_warp_specialized(
        body, grid=(_split_steps(si, plan),), memory_registers=40,
        in_specs=in_specs, wg_axis="wg", num_compute_wgs=1,
        max_concurrent_steps=num_stages, compute_context=compute_context,
    )(*operands)
    return

  def compute(acc_ref):
    plgpu.emit_pipeline(
        lambda _, w_smem, x_smem: step(w_smem, x_smem, acc_ref),
        grid=(_split_steps(si, plan),), in_specs=in_specs,
        max_concurrent_steps=num_stages,
    )(*operands)
    store(acc_ref)

  pl.run_scoped(compute, acc_type)


def _partials_mosaic(x: jax.Array, w_q: jax.Array, plan: _Plan,
                     cfg: DecodeMatmulConfig) -> jax.Array:
  """f32[split_k, N, Mp] partial sums from the Mosaic GPU kernel.

  w_q is uint8[N, K // 2] packed, or the same bytes as int4[N, K].
  """
  n = w_q.shape[0]
  if w_q.dtype == jnp.int4:  # int4[N, K], already reinterpreted
    w4 = w_q
  else:
    # [N, K // 2, 2] -> [N, K]: XLA splits each byte low nibble first,
    # which is the int4_layout element order.
    w4 = lax.bitcast_convert_type(w_q, jnp.int4).reshape(n, -1)
  int8_mma = x.dtype == jnp.int8 and cfg.w4a4_mma == "int8"
  xp = jnp.pad(x if int8_mma else x.astype(jnp.bfloat16),
               ((0, plan.m_pad - x.shape[0]), (0, 0)))
  call = plgpu.kernel(
      functools.partial(decode_matmul_mosaic_kernel, plan=plan,
                        num_stages=cfg.num_stages, w_layout=cfg.w_layout,
                        warp_specialized=cfg.warp_specialized),
      out_type=jax.ShapeDtypeStruct((plan.split_k, n, plan.m_pad),
                                    jnp.float32),
      scratch_types=dict(
          o_smem=plgpu.SMEM((plan.block_n, plan.m_pad), jnp.float32)),
      grid=(n // plan.block_n, plan.split_k),
      grid_names=("n", "s"),
      **(dict(num_threads=2, thread_name="wg") if cfg.warp_specialized
         else {}),
      kernel_name="decode_matmul",
  )
  return call(w4, xp)


# ------------------------------------------------------------------- Triton


def decode_matmul_triton_kernel(w_ref, xe_ref, xo_ref, o_ref, *, plan: _Plan):
  """One program: rows of one N tile over split `s`'s K range."""
  # w_ref: int8[block_n, K // 2] packed bytes; xe_ref, xo_ref: bf16[16,
  # K // 2] (even / odd columns of x); o_ref: f32[1, block_n, 16]
  s = pl.program_id(1)
  half = plan.block_k // 2  # bytes (and x columns of one parity) per step
  lo = s * plan.blocks_per_split
  hi = jnp.minimum(lo + plan.blocks_per_split, plan.k_blocks)

  def body(step, acc):
    cols = pl.ds(pl.multiple_of(step * half, half), half)
    w_lo, w_hi = int4_layout.signed_nibbles(w_ref[:, cols])
    acc += lax.dot_general(w_lo.astype(jnp.bfloat16), xe_ref[:, cols], _NT,
                           preferred_element_type=jnp.float32)
    acc += lax.dot_general(w_hi.astype(jnp.bfloat16), xo_ref[:, cols], _NT,
                           preferred_element_type=jnp.float32)
    return acc

  acc = lax.fori_loop(lo, hi, body,
                      jnp.zeros(o_ref.shape[1:], jnp.float32))
  o_ref[...] = acc[None]


def _partials_triton(x: jax.Array, w_q: jax.Array, plan: _Plan,
                     cfg: DecodeMatmulConfig, *, interpret: bool,
                     debug: bool) -> jax.Array:
  """f32[split_k, N, 16] partial sums from the Triton kernel."""
  n, k2 = w_q.shape
  xb = jnp.pad(x.astype(jnp.bfloat16), ((0, plan.m_pad - x.shape[0]),
                                        (0, 0)))
  xe, xo = xb[:, 0::2], xb[:, 1::2]
  wi = lax.bitcast_convert_type(w_q, jnp.int8)
  bn = plan.block_n
  # Every block inside the arrays: natively, Pallas Triton does not mask
  # the rows of a block past N, and the last tile's partial sums ran into
  # the next split's first rows (H200, 2026-12-03; interpreted, they did
  # not). Only N % 16 != 0 pads (`_plan` picks a tile that divides N).
  n_pad = pl.cdiv(n, bn) * bn
  if n_pad != n:
    wi = jnp.pad(wi, ((0, n_pad - n), (0, 0)))
  return pl.pallas_call(
      functools.partial(decode_matmul_triton_kernel, plan=plan),
      grid=(pl.cdiv(n, bn), plan.split_k),
      in_specs=[
          pl.BlockSpec((bn, k2), lambda i, s: (i, 0)),
          pl.BlockSpec((plan.m_pad, k2), lambda i, s: (0, 0)),
          pl.BlockSpec((plan.m_pad, k2), lambda i, s: (0, 0)),
      ],
      out_specs=pl.BlockSpec((1, bn, plan.m_pad), lambda i, s: (s, i, 0)),
      out_shape=jax.ShapeDtypeStruct((plan.split_k, n_pad, plan.m_pad),
                                     jnp.float32),
      compiler_params=compat.triton_params(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      interpret=interpret, debug=debug, name="decode_matmul",
  )(wi, xe, xo)[:, :n]


# ------------------------------------------------------------------ wrapper


def is_hopper() -> bool:
  """True on a Hopper GPU (sm_90), where the Mosaic GPU kernel runs."""
  if jax.default_backend() != "gpu":
    return False
  return str(getattr(jax.devices()[0], "compute_capability", "")
             ).startswith("9.")


def can_use_decode_matmul(m: int, n: int, k: int,
                          implementation: str) -> bool:
  """Whether the `implementation` kernel takes [M, K] x [N, K] here.

  Args:
    m, n, k: the matmul sizes (K in int4 values).
    implementation: 'mosaic' or 'triton'.

  Returns:
    False for M > 16, K not a multiple of 64, and for 'mosaic' N not a
    multiple of 64 or no Hopper GPU.
  """
  if not 1 <= m <= MAX_M or k % 64:
    return False
  if implementation == "mosaic":
    return n % 64 == 0 and is_hopper()
  return implementation == "triton"


def _resolve(m: int, n: int, k: int, implementation: str | None,
             interpret: bool) -> str:
  """The backend to run: explicit, or the fastest that fits (logged)."""
  if implementation not in (None, "mosaic", "triton", "xla"):
    raise ValueError(f"{implementation=} must be 'mosaic', 'triton', 'xla'"
                     " or None")
  if implementation is None:
    if interpret:
      implementation = "triton"
    elif can_use_decode_matmul(m, n, k, "mosaic"):
      implementation = "mosaic"
    elif jax.default_backend() == "gpu":
      implementation = "triton"
    else:
      implementation = "xla"
    if implementation != "xla" and not can_use_decode_matmul(
        m, n, k, implementation):
      implementation = "xla"
    logging.info("decode_matmul [%d, %d] x [%d, %d]: using %s", m, k, n, k,
                 implementation)
    return implementation
  if implementation == "mosaic" and interpret:
    raise ValueError("implementation='mosaic' has no interpret mode (Mosaic"
                     " GPU's interpreter does not run register wgmma"
                     " operands); use 'triton'")
  if implementation != "xla" and not can_use_decode_matmul(
      m, n, k, implementation):
    raise ValueError(f"decode_matmul: {implementation=} cannot take M={m},"
                     f" N={n}, K={k} here (needs 1 <= M <= {MAX_M}, K % 64"
                     " == 0; mosaic: N % 64 == 0 and a Hopper GPU)")
  return implementation


def _check(x, w_q, s_w, s_x) -> tuple[int, int, int]:
  m, k = x.shape
  n = w_q.shape[0]
  if w_q.dtype != jnp.uint8 or w_q.ndim != 2:
    raise ValueError(f"w_q must be uint8[N, K // 2] (packed int4), got"
                     f" {w_q.dtype}{list(w_q.shape)}")
  if 2 * w_q.shape[1] != k:
    raise ValueError(f"x is [M, K]={x.shape} but w_q packs"
                     f" K={2 * w_q.shape[1]}")
  if s_w.shape != (n,):
    raise ValueError(f"s_w must be [N]=[{n}], got {s_w.shape}")
  if x.dtype == jnp.int8:
    if s_x is None or s_x.shape != (m,):
      raise ValueError(f"int8 codes x need s_x f32[M]=[{m}], got"
                       f" {None if s_x is None else s_x.shape}")
  elif x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
    if s_x is not None:
      raise ValueError(f"float x ({x.dtype}) takes no s_x (W4A16)")
  else:
    raise ValueError(f"x must be bf16/f16/f32 (W4A16) or int8 codes (W4A4),"
                     f" got {x.dtype}")
  return m, n, k


def _epilogue(partials: jax.Array, m: int, s_w: jax.Array,
              s_x: jax.Array | None, out_dtype) -> jax.Array:
  """Sum of the splits, [N, Mp] -> [M, N], scales, cast (one fusion)."""
  acc = partials.sum(axis=0)[:, :m].T  # [M, N]
  if s_x is not None:
    acc = acc * s_x[:m].astype(jnp.float32)[:, None]
  return (acc * s_w.astype(jnp.float32)[None, :]).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=(
    "out_dtype", "config", "implementation", "interpret", "debug", "rows"))
def decode_matmul(x: jax.Array, w_q: jax.Array, s_w: jax.Array,
                  s_x: jax.Array | None = None, *, out_dtype=None,
                  config: DecodeMatmulConfig | None = None,
                  implementation: Implementation | None = None,
                  interpret: bool = False, debug: bool = False,
                  rows: int | None = None) -> jax.Array:
  """y = (x · w_qᵀ) [* s_x] * s_w for a few tokens (decode).

  Args:
    x: bf16/f16/f32[M, K] activations (W4A16; rounded to bf16), or
      int8[M, K] int4 codes in [-8, 7] (W4A4, needs s_x).
    w_q: uint8[N, K // 2] packed int4 weights (`int4_layout`).
    s_w: f32[N] per-output-channel scales.
    s_x: f32[M] per-token scales of int8 codes x; None for float x.
    out_dtype: dtype of y; None = x's dtype (bf16 for int8 x).
    config: tiles and K split; `default_decode_matmul_config` when None.
    implementation: 'mosaic' (Hopper), 'triton', 'xla' (the reference), or
      None: mosaic on a Hopper GPU, triton on another GPU or under
      `interpret`, else xla; also xla when M > 16 or K % 64 != 0.
    interpret: run the Triton kernel in interpret mode (CPU tests).
    debug: print the Triton kernel's jaxpr.
    rows: the real tokens R when x (and s_x) come padded to
      `padded_rows(R, implementation)` rows (the caller's producer wrote
      the padding, so no pad runs here); None: all M rows are real.

  Returns:
    y: [M, N] (or [rows, N]) in `out_dtype`.

  Raises:
    ValueError: shapes or dtypes that do not fit together, or an explicit
      implementation that cannot take them here.
  """
  m, n, k = _check(x, w_q, s_w, s_x)
  if rows is not None and not 1 <= rows <= m:
    raise ValueError(f"rows={rows} must be in [1, M={m}]")
  out_rows = m if rows is None else rows
  if out_dtype is None:
    out_dtype = jnp.bfloat16 if x.dtype == jnp.int8 else x.dtype
  impl = _resolve(m, n, k, implementation, interpret)
  if impl == "xla":
    return decode_matmul_reference(x, w_q, s_w, s_x,
                                   out_dtype=out_dtype)[:out_rows]
  cfg = config or default_decode_matmul_config(impl)
  plan = _plan(m, n, k, cfg, impl)
  if impl == "mosaic":
    partials = _partials_mosaic(x, w_q, plan, cfg)
  else:
    partials = _partials_triton(x, w_q, plan, cfg, interpret=interpret,
                                debug=debug)
  return _epilogue(partials, out_rows, s_w, s_x, out_dtype)


def decode_matmul_reference(x: jax.Array, w_q: jax.Array, s_w: jax.Array,
                            s_x: jax.Array | None = None, *,
                            out_dtype=None) -> jax.Array:
  """Plain-jnp `decode_matmul` (any M).

  W4A16 (float x): f32 dot of x with the int4 values, then * s_w. W4A4
  (int8 codes x): exact int32 dot, then (acc * s_x) * s_w in f32, the same
  arithmetic as `w4a4_matmul.reference`.

  Args:
    x: float[M, K], or int8[M, K] codes with s_x.
    w_q: uint8[N, K // 2] packed int4 weights.
    s_w: f32[N].
    s_x: f32[M] for int8 x, else None.
    out_dtype: dtype of y; None = x's dtype (bf16 for int8 x).

  Returns:
    y: [M, N] in `out_dtype`.
  """
  if out_dtype is None:
    out_dtype = jnp.bfloat16 if x.dtype == jnp.int8 else x.dtype
  w = int4_layout.unpack_int4(w_q, signed=True)  # int8[N, K]
  if x.dtype == jnp.int8:
    acc = lax.dot_general(x, w, _NT, preferred_element_type=jnp.int32)
    acc = acc.astype(jnp.float32) * s_x.astype(jnp.float32)[:, None]
  else:
    acc = lax.dot_general(x.astype(jnp.float32), w.astype(jnp.float32), _NT,
                          precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
  return (acc * s_w.astype(jnp.float32)[None, :]).astype(out_dtype)
