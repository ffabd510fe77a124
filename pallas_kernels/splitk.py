"""A decode linear's output left as `decode_matmul`'s split-K partial sums.

  y[m, n] = dtype(((sum_s partials[s, n, m]) * s_x[m]) * s_w[n])

`decode_matmul` splits K over its grid and, by itself, adds the splits in
one XLA fusion after the kernel (`decode_matmul._epilogue`). At decode that
fusion is one more launch of ~1.5 us for every linear, ~6 us of a 7B layer's
~73 (BENCHMARKS.md, decode step). Each of those outputs is read next by a
Pallas kernel of ours anyway (the qkv by `decode_qkv`, o_proj's and
down_proj's by the next `rms_norm_quant`, gate/up's by down_proj's
quantizer), so the consumer reads the partial sums instead: `SplitK` carries
them, `load` is the consumer kernel's read, and `combine` is the plain-jnp
epilogue (what a consumer without the fold calls).

Only W4A4 codes defer (`decode_matmul_splitk`): their partial sums are
integers below 2^24 in f32, so every order of adding them is exact and the
consumer's sum equals XLA's bit for bit. W4A16 partials are rounded f32
sums, whose sum depends on the order: those keep the XLA epilogue.

Axes: M tokens (Mp padded, as `decode_matmul` computes), N output channels,
S the splits.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SplitK:
  """A linear's output before its split-K epilogue (a pytree).

  Attributes:
    partials: f32[S, N, Mp] partial sums of the codes' products (integers);
      f32[S, Mp, N] when `token_major`.
    s_x: f32[Mp] per-token scales (padding rows: 1, their partials 0).
    s_w: f32[N] per-output-channel scales.
    token_major: the partials' layout (static): each token's N sums
      contiguous, so that a consumer reading one token's row reads whole
      sectors (N-major, a row is strided by Mp).
  """

  partials: jax.Array
  s_x: jax.Array
  s_w: jax.Array
  token_major: bool = dataclasses.field(default=False,
                                        metadata=dict(static=True))

  @property
  def width(self) -> int:
    """N, the linear's output width."""
    return self.s_w.shape[0]

  @property
  def padded_rows(self) -> int:
    """Mp, the rows the partial sums hold (real rows first)."""
    return self.s_x.shape[0]


def combine(sk: SplitK, rows: int, dtype) -> jax.Array:
  """The epilogue in plain jnp: [rows, N] in `dtype` (rows <= Mp).

  `decode_matmul`'s own epilogue, op for op: the splits summed, transposed,
  times s_x, times s_w, cast.
  """
  acc = sk.partials.sum(axis=0)
  acc = acc[:rows] if sk.token_major else acc[:, :rows].T  # [M, N]
  acc = acc * sk.s_x[:rows].astype(jnp.float32)[:, None]
  return (acc * sk.s_w.astype(jnp.float32)[None, :]).astype(dtype)


def view(sk: SplitK, *shape: int) -> tuple[jax.Array, jax.Array]:
  """The partials as f32[S, *shape, Mp] (token-major: f32[S, Mp, *shape])
  and s_w as f32[*shape]: the consumer kernel's view of the N axis (free
  reshapes; prod(shape) = N)."""
  s, n, mp = sk.partials.shape[0], sk.width, sk.padded_rows
  if n != math.prod(shape):
    raise ValueError(f"a view {shape} of the N={n} output channels must"
                     " hold them all")
  partials = (sk.partials.reshape(s, mp, *shape) if sk.token_major
              else sk.partials.reshape(s, *shape, mp))
  return partials, sk.s_w.reshape(shape)


def whole(array: jax.Array) -> pl.BlockSpec:
  """A BlockSpec of the whole array for any grid (the partials are a few
  MB at most and every program reads its own rows of them)."""
  nd = array.ndim
  return pl.BlockSpec(array.shape, lambda *_: (0,) * nd)


def load(p_ref, sx_ref, sw_ref, idx: tuple, row, *, token_major: bool,
         mask=None) -> jax.Array:
  """Inside a kernel: one token's slice of y in f32, before the cast.

  Args:
    p_ref: f32[S, *shape, Mp] partials (`view`; f32[S, Mp, *shape] when
      `token_major`).
    sx_ref: f32[Mp] token scales.
    sw_ref: f32[*shape] channel scales.
    idx: indexers of the `shape` axes (`pl.ds` slices); the block they
      select is what the consumer would have loaded from y.
    row: int32[] the token (a traced scalar).
    token_major: the partials' layout (`SplitK.token_major`).
    mask: bool broadcastable to the block, or None; masked elements are 0.

  Returns:
    f32 block ((sum_s p[s, idx, row]) * s_x[row]) * s_w[idx]; the caller
    rounds it to the linear's dtype, as `combine` casts.
  """
  extra = {} if mask is None else dict(mask=mask, other=0)
  acc = None
  # In order (integer sums: any order is exact); interpret mode's loads
  # reject a Python int index.
  for s in range(p_ref.shape[0]):
    at = (row, *idx) if token_major else (*idx, row)
    part = plgpu.load(p_ref.at[(jnp.int32(s), *at)], **extra)
    acc = part if acc is None else acc + part
  s_w = plgpu.load(sw_ref.at[idx], **extra)
  return (acc * sx_ref[row]) * s_w
