"""W4A16 matmul for decode: bf16 activations times packed int4 weights.

  y[M, N] = x[M, K] · (w_q[N, K] * s_w[N, 1])ᵀ

Matmul axes are M (tokens), N (output channels), K (input channels).
w_q is uint8[N, K // 2] in the int4 packing of `pallas_kernels/int4_layout.py`
(low nibble = even K index), s_w f32[N] per output channel. The weight tile is
unpacked in registers (shifts sign-extend each nibble), converted to bf16
and fed to the bf16 tensor cores against the matching even/odd columns of x,
which the wrapper splits once ([M, K] is tiny at decode). With M this small
the N tiles alone cannot fill the GPU, so K is also split over the grid
(`split_k`): each program writes an f32 partial tile to f32[split_k, M, N]
and the wrapper sums them, applies the per-channel scale and casts (three
XLA ops after the kernel). Accumulation is f32. (Summing the splits with
Triton atomic adds in the kernel was measured no faster and removed;
BENCHMARKS.md.)

Backend: the Pallas Triton lowering (interpret mode on the CPU). Not
supported: group scales, bits other than 4.
"""

import dataclasses
import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import compat
from pallas_kernels import int4_layout
from pallas_kernels import padding


@dataclasses.dataclass(frozen=True, kw_only=True)
class W4A16MatmulConfig:
  """Tile sizes (block_k counts packed bytes) and the K split."""

  block_m: int = 16
  block_n: int = 64
  block_k: int = 256
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 4

  def __post_init__(self):
    if self.split_k < 1:
      raise ValueError(f"split_k={self.split_k} must be at least 1")


def can_use_w4a16_matmul() -> bool:
  """True where the Pallas kernel compiles (a GPU backend)."""
  return jax.default_backend() == "gpu"


def _dot_over_k(xe_ref, xo_ref, w_ref, shape: tuple[int, int], *,
                block_k: int, k_steps: int) -> jax.Array:
  """f32 [block_m, block_n] = x[:, split] · w[:, split]ᵀ, unscaled."""
  nt = (((1,), (1,)), ((), ()))

  def body(step, acc):
    cols = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
    w_lo, w_hi = int4_layout.signed_nibbles(w_ref[:, cols])
    dt = xe_ref.dtype
    acc += jax.lax.dot_general(xe_ref[:, cols], w_lo.astype(dt), nt,
                               preferred_element_type=jnp.float32)
    acc += jax.lax.dot_general(xo_ref[:, cols], w_hi.astype(dt), nt,
                               preferred_element_type=jnp.float32)
    return acc

  return jax.lax.fori_loop(0, k_steps, body, jnp.zeros(shape, jnp.float32))


def w4a16_matmul_kernel(xe_ref, xo_ref, w_ref, o_ref, *, block_k: int,
                        k_steps: int):
  """One f32 partial tile over this split's K range."""
  # xe_ref, xo_ref: bf16[block_m, K // (2 * split_k)] (even / odd x columns)
  # w_ref: int8[block_n, K // (2 * split_k)]; o_ref: f32[1, bm, bn]
  o_ref[...] = _dot_over_k(xe_ref, xo_ref, w_ref, o_ref.shape[1:],
                           block_k=block_k, k_steps=k_steps)[None]


@functools.partial(jax.jit, static_argnames=(
    "config", "interpret", "debug", "implementation"))
def w4a16_matmul(x: jax.Array, w_q: jax.Array, s_w: jax.Array, *,
                 config: W4A16MatmulConfig | None = None,
                 interpret: bool = False, debug: bool = False,
                 implementation: Literal["pallas", "xla"] | None = None
                 ) -> jax.Array:
  """W4A16 matmul with per-output-channel weight scales.

  Args:
    x: bf16[M, K] (or f16/f32) activations.
    w_q: uint8[N, K // 2] packed int4 weights.
    s_w: f32[N] scales.
    config: tiles and split_k.
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    debug: print the kernel's jaxpr.
    implementation: 'pallas', 'xla' (the reference) or None (pallas on a
      GPU or when interpret=True, else the reference; logged).

  Returns:
    y: [M, N] in the dtype of x.

  Raises:
    ValueError: shapes or dtypes that do not fit together.
  """
  m, k = x.shape
  n, k2 = w_q.shape
  if w_q.dtype != jnp.uint8:
    raise ValueError(f"w_q must be uint8 (packed int4), got {w_q.dtype}")
  if k != 2 * k2:
    raise ValueError(f"x is [M, K]={x.shape} but w_q packs K={2 * k2}")
  if s_w.shape != (n,):
    raise ValueError(f"s_w must be [N]=[{n}], got {s_w.shape}")
  if implementation is None:
    implementation = ("pallas" if interpret or can_use_w4a16_matmul()
                      else "xla")
    logging.info("w4a16_matmul: using %s", implementation)
  if implementation == "xla":
    return w4a16_matmul_reference(x, w_q, s_w)
  cfg = config or W4A16MatmulConfig()
  pad = padding.pad_to
  k_multiple = cfg.block_k * cfg.split_k
  xe = pad(pad(x[:, 0::2], 0, cfg.block_m), 1, k_multiple)
  xo = pad(pad(x[:, 1::2], 0, cfg.block_m), 1, k_multiple)
  wi = pad(pad(jax.lax.bitcast_convert_type(w_q, jnp.int8), 0, cfg.block_n),
           1, k_multiple)
  mp, kp = xe.shape
  np_ = wi.shape[0]
  k_split = kp // cfg.split_k
  k_steps = k_split // cfg.block_k
  grid = (cfg.split_k, mp // cfg.block_m, np_ // cfg.block_n)
  in_specs = [
      pl.BlockSpec((cfg.block_m, k_split), lambda s, i, j: (i, s)),
      pl.BlockSpec((cfg.block_m, k_split), lambda s, i, j: (i, s)),
      pl.BlockSpec((cfg.block_n, k_split), lambda s, i, j: (j, s)),
  ]
  call = functools.partial(
      pl.pallas_call, grid=grid,
      compiler_params=compat.triton_params(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      interpret=interpret, debug=debug, name="w4a16_matmul")
  partial = call(
      functools.partial(w4a16_matmul_kernel, block_k=cfg.block_k,
                        k_steps=k_steps),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((1, cfg.block_m, cfg.block_n),
                             lambda s, i, j: (s, i, j)),
      out_shape=jax.ShapeDtypeStruct((cfg.split_k, mp, np_), jnp.float32),
  )(xe, xo, wi)
  y = partial.sum(axis=0)[:m, :n] * s_w.astype(jnp.float32)[None, :]
  return y.astype(x.dtype)


def w4a16_matmul_reference(x: jax.Array, w_q: jax.Array,
                           s_w: jax.Array) -> jax.Array:
  """Plain-jnp `w4a16_matmul`: dequantize w in f32, then x · wᵀ.

  Args:
    x: [M, K] activations.
    w_q: uint8[N, K // 2] packed int4 weights.
    s_w: f32[N] scales.

  Returns:
    y: [M, N] in the dtype of x.
  """
  w = int4_layout.unpack_int4(w_q, signed=True).astype(jnp.float32)
  y = jnp.dot(x.astype(jnp.float32), (w * s_w[:, None]).T,
              precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)
