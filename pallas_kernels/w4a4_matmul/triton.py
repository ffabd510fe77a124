"""W4A4 matmul with Pallas Triton: any GPU, and interpret mode on the CPU.

  y[M, N] = (x_q[M, K] · w_q[N, K]ᵀ) * s_x[M, 1] * s_w[1, N]

Matmul axes are M (tokens), N (output channels), K (input channels).
Inputs use the int4 packing of `pallas_kernels/int4_layout.py` (two signed
nibbles per byte along K, low nibble = even index): x_q uint8[M, K // 2] and
w_q uint8[N, K // 2] (both K-major). Scales are f32 per token and per output
channel (or per K group, see `reference.py`); accumulation is exact int32;
the scales are applied in the epilogue and y is written in bf16 (or f16/f32).

Hopper has no int4 tensor-core MMA, so each [block, block_k] byte tile is
split in registers into its low and high nibbles (sign-extended to int8 by
shifts) and fed to the int8 tensor cores as two dots:
  Σ_k x_k w_k = Σ_j x_lo[j] w_lo[j] + Σ_j x_hi[j] w_hi[j],
which needs no re-interleaving because x and w are packed alike.

With group scales the kernel steps through K one group per step
(block_k = group_size / 2 bytes) and scales each step's int32 dot, summing
the groups in f32 in order, as the reference does.

Not supported: bits other than 4, groups that do not divide K (ValueError).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import compat
from pallas_kernels import int4_layout
from pallas_kernels import padding
from pallas_kernels.w4a4_matmul import reference


@dataclasses.dataclass(frozen=True, kw_only=True)
class W4A4TritonConfig:
  """Tile sizes (block_k counts packed bytes: 2 * block_k int4 values)."""

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3


def default_w4a4_triton_config(m: int, n: int, k: int) -> W4A4TritonConfig:
  """A tile choice for [M, K] x [N, K]: small M gets a small block_m."""
  del n, k
  if m <= 64:
    return W4A4TritonConfig(block_m=16 if m <= 16 else 64, block_n=128,
                            block_k=128, num_warps=4, num_stages=4)
  return W4A4TritonConfig()


def can_use_w4a4_triton() -> bool:
  """True where the Pallas kernel compiles (a GPU backend)."""
  return jax.default_backend() == "gpu"


def w4a4_matmul_triton_kernel(x_ref, w_ref, sx_ref, sw_ref, o_ref, *,
                              block_k: int, k_steps: int, grouped: bool):
  """One [block_m, block_n] output tile, looping over K."""
  # x_ref: int8[block_m, K // 2]; w_ref: int8[block_n, K // 2]
  # per-channel: sx_ref f32[block_m], sw_ref f32[block_n];
  # grouped (one group per step): sx_ref f32[block_m, G], sw_ref f32[G,
  # block_n]; o_ref: [block_m, block_n]
  nt = (((1,), (1,)), ((), ()))

  zeros = jnp.zeros(o_ref.shape, jnp.int32)

  def dot(step, acc):  # acc + this K step's int32 products (exact)
    cols = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
    x_lo, x_hi = int4_layout.signed_nibbles(x_ref[:, cols])
    w_lo, w_hi = int4_layout.signed_nibbles(w_ref[:, cols])
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


@functools.partial(jax.jit, static_argnames=(
    "out_dtype", "config", "interpret", "debug"))
def w4a4_matmul_triton(x_q: jax.Array, w_q: jax.Array, s_x: jax.Array,
                       s_w: jax.Array, *, out_dtype=jnp.bfloat16,
                       config: W4A4TritonConfig | None = None,
                       interpret: bool = False, debug: bool = False
                       ) -> jax.Array:
  """W4A4 matmul with per-token and per-channel (or group) scales.

  Args:
    x_q: uint8[M, K // 2] packed int4 activations.
    w_q: uint8[N, K // 2] packed int4 weights.
    s_x: f32[M] per-token scales, or f32[M, G] per token and K group.
    s_w: f32[N] per-output-channel scales, or f32[N, G] per channel and K
      group (see `reference.py`).
    out_dtype: dtype of y.
    config: tiles; `default_w4a4_triton_config` when None. With group
      scales block_k is set to group_size / 2 (one group per step).
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    debug: print the kernel's jaxpr.

  Returns:
    y: [M, N] in `out_dtype`.

  Raises:
    ValueError: shapes or dtypes that do not fit together.
  """
  if x_q.dtype != jnp.uint8:
    raise ValueError(f"x_q must be uint8 (packed int4), got {x_q.dtype=}")
  m, n, k = reference.check_operands(x_q, w_q, s_x, s_w)
  grouped = reference.group_scales(s_x, s_w, k)
  if grouped and grouped[2] % 2:
    raise ValueError(f"group_size={grouped[2]} must be even (packed bytes)")
  cfg = config or default_w4a4_triton_config(m, n, k)
  if grouped:
    cfg = dataclasses.replace(cfg, block_k=grouped[2] // 2)
  pad = padding.pad_to
  # Bytes reinterpreted as int8 (same width): the nibble shifts then
  # sign-extend.
  xi = pad(pad(jax.lax.bitcast_convert_type(x_q, jnp.int8), 0, cfg.block_m),
           1, cfg.block_k)
  wi = pad(pad(jax.lax.bitcast_convert_type(w_q, jnp.int8), 0, cfg.block_n),
           1, cfg.block_k)
  if grouped:  # sx [M, G]; sw transposed to [G, N] (rows load as [1, bn])
    sx = pad(grouped[0].astype(jnp.float32), 0, cfg.block_m)
    sw = pad(grouped[1].astype(jnp.float32).T, 1, cfg.block_n)
    g = sx.shape[1]
    sx_spec = pl.BlockSpec((cfg.block_m, g), lambda i, j: (i, 0))
    sw_spec = pl.BlockSpec((g, cfg.block_n), lambda i, j: (0, j))
  else:
    sx = pad(s_x.astype(jnp.float32), 0, cfg.block_m)
    sw = pad(s_w.astype(jnp.float32), 0, cfg.block_n)
    sx_spec = pl.BlockSpec((cfg.block_m,), lambda i, j: (i,))
    sw_spec = pl.BlockSpec((cfg.block_n,), lambda i, j: (j,))
  mp, kp = xi.shape
  np_ = wi.shape[0]
  kernel = functools.partial(w4a4_matmul_triton_kernel, block_k=cfg.block_k,
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
      interpret=interpret, debug=debug, name="w4a4_matmul_triton",
  )(xi, wi, sx, sw)
  return y[:m, :n]
