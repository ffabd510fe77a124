"""W4A4 matmul: packed int4 activations times packed int4 weights.

  y[M, N] = (x_q[M, K] · w_q[N, K]ᵀ) * s_x[M, 1] * s_w[1, N]

Matmul axes are M (tokens), N (output channels), K (input channels).
Inputs use the int4 packing of `quarot_jax/quant.py` (two signed nibbles per
byte along K, low nibble = even index): x_q uint8[M, K // 2] and w_q
uint8[N, K // 2] (both K-major). Scales are f32 per token and per output
channel; accumulation is exact int32; the scales are applied in the epilogue
and y is written in bf16 (or f16/f32).

Hopper has no int4 tensor-core MMA, so each [block, block_k] byte tile is
split in registers into its low and high nibbles (sign-extended to int8 by
shifts) and fed to the int8 tensor cores as two dots:
  Σ_k x_k w_k = Σ_j x_lo[j] w_lo[j] + Σ_j x_hi[j] w_hi[j],
which needs no re-interleaving because x and w are packed alike.

Group scales (QuaRot's 128G mode): s_x [M, G] and/or s_w [N, G] with one
scale per group of `group_size` consecutive K values (G = K / group_size):
  y[m, n] = Σ_g (x_g · w_g)[m, n] * s_x[m, g] * s_w[n, g],
each group's dot exact in int32, the groups summed in f32 in order g = 0,
1, ... (per-token / per-channel scales broadcast along G when only one side
is grouped). The kernel then steps through K one group per step
(block_k = group_size / 2 bytes) and scales each step's int32 dot.

Backend: the Pallas Triton lowering (`pl.pallas_call` with Triton compiler
params), which also runs in interpret mode on the CPU. Not supported: bits
other than 4, groups that do not divide K.
"""

import dataclasses
import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from quarot_jax import compat


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int4MatmulConfig:
  """Tile sizes (block_k counts packed bytes: 2 * block_k int4 values)."""

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3


def default_int4_matmul_config(m: int, n: int, k: int) -> Int4MatmulConfig:
  """A tile choice for [M, K] x [N, K]: small M gets a small block_m."""
  del n, k
  if m <= 64:
    return Int4MatmulConfig(block_m=16 if m <= 16 else 64, block_n=128,
                            block_k=128, num_warps=4, num_stages=4)
  return Int4MatmulConfig()


def _nibbles(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """int8 [..] bytes -> (low, high) sign-extended int8 nibbles."""
  low = jnp.right_shift(jnp.left_shift(packed, 4), 4)
  high = jnp.right_shift(packed, 4)
  return low, high


def int4_matmul_kernel(x_ref, w_ref, sx_ref, sw_ref, o_ref, *, block_k: int,
                       k_steps: int, grouped: bool):
  """One [block_m, block_n] output tile, looping over K."""
  # x_ref: int8[block_m, K // 2]; w_ref: int8[block_n, K // 2]
  # per-channel: sx_ref f32[block_m], sw_ref f32[block_n];
  # grouped (one group per step): sx_ref f32[block_m, G], sw_ref f32[G,
  # block_n]; o_ref: [block_m, block_n]
  nt = (((1,), (1,)), ((), ()))

  zeros = jnp.zeros(o_ref.shape, jnp.int32)

  def dot(step, acc):  # acc + this K step's int32 products (exact)
    cols = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
    x_lo, x_hi = _nibbles(x_ref[:, cols])
    w_lo, w_hi = _nibbles(w_ref[:, cols])
    # One `acc +=` per dot: Triton folds each into its MMA's accumulator
    # (summing the two dots first ran 1.3-1.4x longer on the H100).
    acc += jax.lax.dot_general(x_lo, w_lo, nt,
                               preferred_element_type=jnp.int32)
    acc += jax.lax.dot_general(x_hi, w_hi, nt,
                               preferred_element_type=jnp.int32)
    return acc

  if grouped:
    def body(step, y):
      g = pl.ds(step, 1)
      return y + dot(step, zeros).astype(jnp.float32) * sx_ref[:, g] * (
          sw_ref[g, :])

    y = jax.lax.fori_loop(0, k_steps, body,
                          jnp.zeros(o_ref.shape, jnp.float32))
  else:
    acc = jax.lax.fori_loop(0, k_steps, dot, zeros)
    y = (acc.astype(jnp.float32) * sx_ref[...][:, None]
         * sw_ref[...][None, :])
  o_ref[...] = y.astype(o_ref.dtype)


def _group_scales(s_x: jax.Array, s_w: jax.Array, k: int
                  ) -> tuple[jax.Array, jax.Array, int] | None:
  """(s_x [M, G], s_w [N, G], group_size) when either side is grouped
  (the other broadcast along G), None when both are 1-D.

  Raises:
    ValueError: group counts that differ or do not divide K.
  """
  if s_x.ndim == 1 and s_w.ndim == 1:
    return None
  groups = {a.shape[1] for a in (s_x, s_w) if a.ndim == 2}
  if len(groups) != 1 or k % (g := groups.pop()):
    raise ValueError(f"group scales must share G dividing K={k}; got"
                     f" {s_x.shape=} {s_w.shape=}")
  widen = lambda a: a if a.ndim == 2 else jnp.broadcast_to(
      a[:, None], (a.shape[0], g))
  return widen(s_x), widen(s_w), k // g


def pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """x zero-padded at the end of `axis` to a multiple of `multiple`."""
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def can_use_int4_matmul() -> bool:
  """True where the Pallas kernel compiles (a GPU backend)."""
  return jax.default_backend() == "gpu"


@functools.partial(jax.jit, static_argnames=(
    "out_dtype", "config", "interpret", "debug", "implementation"))
def int4_matmul(x_q: jax.Array, w_q: jax.Array, s_x: jax.Array,
                s_w: jax.Array, *, out_dtype=jnp.bfloat16,
                config: Int4MatmulConfig | None = None,
                interpret: bool = False, debug: bool = False,
                implementation: Literal["pallas", "xla"] | None = None
                ) -> jax.Array:
  """W4A4 matmul with per-token and per-channel scales.

  Args:
    x_q: uint8[M, K // 2] packed int4 activations.
    w_q: uint8[N, K // 2] packed int4 weights.
    s_x: f32[M] per-token scales, or f32[M, G] per token and K group.
    s_w: f32[N] per-output-channel scales, or f32[N, G] per channel and K
      group (see the module docstring).
    out_dtype: dtype of y.
    config: tiles; `default_int4_matmul_config` when None. With group
      scales block_k is set to group_size / 2 (one group per step).
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    debug: print the kernel's jaxpr.
    implementation: 'pallas', 'xla' (the reference) or None (pallas on GPU
      or when interpret=True, else the reference).

  Returns:
    y: [M, N] in `out_dtype`.

  Raises:
    ValueError: shapes or dtypes that do not fit together.
  """
  m, k2 = x_q.shape
  n, k2w = w_q.shape
  if x_q.dtype != jnp.uint8 or w_q.dtype != jnp.uint8:
    raise ValueError(f"x_q and w_q must be uint8 (packed int4), got"
                     f" {x_q.dtype=} {w_q.dtype=}")
  if k2 != k2w:
    raise ValueError(f"packed K differs: x_q {x_q.shape}, w_q {w_q.shape}")
  if s_x.shape[:1] != (m,) or s_w.shape[:1] != (n,) or max(
      s_x.ndim, s_w.ndim) > 2:
    raise ValueError(f"scales must be [M]=[{m}] (or [M, G]) and [N]=[{n}]"
                     f" (or [N, G]), got {s_x.shape=} {s_w.shape=}")
  grouped = _group_scales(s_x, s_w, 2 * k2)
  if grouped and grouped[2] % 2:
    raise ValueError(f"group_size={grouped[2]} must be even (packed bytes)")
  if implementation is None:
    implementation = ("pallas" if interpret or can_use_int4_matmul()
                      else "xla")
    logging.info("int4_matmul: using %s", implementation)
  if implementation == "xla":
    return int4_matmul_reference(x_q, w_q, s_x, s_w, out_dtype=out_dtype)
  cfg = config or default_int4_matmul_config(m, n, 2 * k2)
  if grouped:
    cfg = dataclasses.replace(cfg, block_k=grouped[2] // 2)
  # Bytes reinterpreted as int8 (same width): the nibble shifts then
  # sign-extend.
  xi = pad_to(pad_to(jax.lax.bitcast_convert_type(x_q, jnp.int8), 0,
                       cfg.block_m), 1, cfg.block_k)
  wi = pad_to(pad_to(jax.lax.bitcast_convert_type(w_q, jnp.int8), 0,
                       cfg.block_n), 1, cfg.block_k)
  if grouped:  # sx [M, G]; sw transposed to [G, N] (rows load as [1, bn])
    sx = pad_to(grouped[0].astype(jnp.float32), 0, cfg.block_m)
    sw = pad_to(grouped[1].astype(jnp.float32).T, 1, cfg.block_n)
    g = sx.shape[1]
    sx_spec = pl.BlockSpec((cfg.block_m, g), lambda i, j: (i, 0))
    sw_spec = pl.BlockSpec((g, cfg.block_n), lambda i, j: (0, j))
  else:
    sx = pad_to(s_x.astype(jnp.float32), 0, cfg.block_m)
    sw = pad_to(s_w.astype(jnp.float32), 0, cfg.block_n)
    sx_spec = pl.BlockSpec((cfg.block_m,), lambda i, j: (i,))
    sw_spec = pl.BlockSpec((cfg.block_n,), lambda i, j: (j,))
  mp, kp = xi.shape
  np_ = wi.shape[0]
  kernel = functools.partial(int4_matmul_kernel, block_k=cfg.block_k,
                             k_steps=kp // cfg.block_k,
                             grouped=grouped is not None)
  y = pl.pallas_call(
      kernel,
      grid=(mp // cfg.block_m, np_ // cfg.block_n),
      in_specs=[
          pl.BlockSpec((cfg.block_m, kp), lambda i, j: (i, 0)),
          pl.BlockSpec((cfg.block_n, kp), lambda i, j: (j, 0)),
          sx_spec, sw_spec,
      ],
      out_specs=pl.BlockSpec((cfg.block_m, cfg.block_n),
                             lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      compiler_params=compat.triton_params(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
      interpret=interpret, debug=debug, name="int4_matmul",
  )(xi, wi, sx, sw)
  return y[:m, :n]


def int4_matmul_reference(x_q: jax.Array, w_q: jax.Array, s_x: jax.Array,
                          s_w: jax.Array, *, out_dtype=jnp.bfloat16
                          ) -> jax.Array:
  """Plain-jnp `int4_matmul`: unpack, exact int32 dot, scale (per group,
  groups summed in order, when the scales are grouped)."""
  from quarot_jax import quant  # pylint: disable=g-import-not-at-top
  x = quant.unpack_int4(x_q, signed=True)
  w = quant.unpack_int4(w_q, signed=True)
  nt = (((1,), (1,)), ((), ()))
  grouped = _group_scales(s_x, s_w, x.shape[1])
  if grouped:
    sx, sw, size = grouped
    split = lambda a: jnp.moveaxis(a.reshape(a.shape[0], -1, size), 1, 0)

    def step(y, group):  # one K group: exact int32 dot, then its scales
      xg, wg, sxg, swg = group
      acc = jax.lax.dot_general(xg, wg, nt, preferred_element_type=jnp.int32)
      return y + acc.astype(jnp.float32) * sxg[:, None] * swg[None, :], None

    y, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], w.shape[0]),
                                        jnp.float32),
                        (split(x), split(w), sx.T.astype(jnp.float32),
                         sw.T.astype(jnp.float32)))
    return y.astype(out_dtype)
  acc = jax.lax.dot_general(x, w, nt, preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * s_x[:, None] * s_w[None, :]
  return y.astype(out_dtype)
