"""W4A4 matmul in plain jnp: the reference every backend is tested against.

  y[M, N] = (x_q[M, K] · w_q[N, K]ᵀ) * s_x[M, 1] * s_w[1, N]

Matmul axes are M (tokens), N (output channels), K (input channels).
Operands are int4 in the packing of `pallas_kernels/int4_layout.py` (two
signed nibbles per byte along K, low nibble = even index): x_q uint8[M, K //
2] (or its int8[M, K] codes) and w_q uint8[N, K // 2], both K-major. The
int32 accumulation is exact; the scales are applied in f32 after it. This is
also the fastest XLA formulation (unpack to int8, XLA's int8 dot: cuBLAS on
a GPU), which is what `api.w4a4_matmul(implementation='xla')` runs.

Group scales (QuaRot's 128G mode): s_x [M, G] and/or s_w [N, G] with one
scale per group of `group_size` consecutive K values (G = K / group_size):
  y[m, n] = Σ_g (x_g · w_g)[m, n] * s_x[m, g] * s_w[n, g],
each group's dot exact in int32, the groups summed in f32 in order g = 0,
1, ... (per-token / per-channel scales broadcast along G when only one side
is grouped).
"""

import jax
import jax.numpy as jnp

from pallas_kernels import int4_layout

_NT = (((1,), (1,)), ((), ()))  # contract the K axes of [M, K] and [N, K]


def group_scales(s_x: jax.Array, s_w: jax.Array, k: int
                 ) -> tuple[jax.Array, jax.Array, int] | None:
  """(s_x [M, G], s_w [N, G], group_size) when either side is grouped
  (the other broadcast along G), None when both are 1-D.

  Args:
    s_x: f32[M] or f32[M, G].
    s_w: f32[N] or f32[N, G].
    k: K, in int4 values.

  Returns:
    The grouped scales and the group size, or None.

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


def check_operands(x_q: jax.Array, w_q: jax.Array, s_x: jax.Array,
                   s_w: jax.Array) -> tuple[int, int, int]:
  """Checks the operands every backend takes; returns (M, N, K).

  Args:
    x_q: uint8[M, K // 2] packed int4 activations, or int8[M, K] codes.
    w_q: uint8[N, K // 2] packed int4 weights.
    s_x: f32[M] or f32[M, G].
    s_w: f32[N] or f32[N, G].

  Returns:
    (M, N, K), K in int4 values.

  Raises:
    ValueError: dtypes, shapes or group scales that do not fit together.
  """
  if x_q.dtype not in (jnp.uint8, jnp.int8) or w_q.dtype != jnp.uint8:
    raise ValueError(f"x_q must be uint8 (packed int4) or int8 (codes) and"
                     f" w_q uint8 (packed int4), got {x_q.dtype=}"
                     f" {w_q.dtype=}")
  m, n = x_q.shape[0], w_q.shape[0]
  k = x_q.shape[1] * (2 if x_q.dtype == jnp.uint8 else 1)
  if 2 * w_q.shape[1] != k:
    raise ValueError(f"K differs: x_q {x_q.shape} {x_q.dtype}, w_q"
                     f" {w_q.shape} {w_q.dtype}")
  if s_x.shape[:1] != (m,) or s_w.shape[:1] != (n,) or max(
      s_x.ndim, s_w.ndim) > 2:
    raise ValueError(f"scales must be [M]=[{m}] (or [M, G]) and [N]=[{n}]"
                     f" (or [N, G]), got {s_x.shape=} {s_w.shape=}")
  group_scales(s_x, s_w, k)  # raises on groups that do not fit K
  return m, n, k


def w4a4_matmul_reference(x_q: jax.Array, w_q: jax.Array, s_x: jax.Array,
                          s_w: jax.Array, *, out_dtype=jnp.bfloat16
                          ) -> jax.Array:
  """Unpack, exact int32 dot, scale (per group, in order, when grouped).

  Args:
    x_q: uint8[M, K // 2] packed int4 activations, or int8[M, K] codes in
      [-8, 7].
    w_q: uint8[N, K // 2] packed int4 weights.
    s_x: f32[M] per-token scales, or f32[M, G].
    s_w: f32[N] per-output-channel scales, or f32[N, G].
    out_dtype: dtype of y.

  Returns:
    y: [M, N] in `out_dtype`.

  Raises:
    ValueError: group scales that do not fit K.
  """
  x = x_q if x_q.dtype == jnp.int8 else int4_layout.unpack_int4(x_q,
                                                                signed=True)
  w = int4_layout.unpack_int4(w_q, signed=True)
  grouped = group_scales(s_x, s_w, x.shape[1])
  if grouped:
    sx, sw, size = grouped
    split = lambda a: jnp.moveaxis(a.reshape(a.shape[0], -1, size), 1, 0)

    def step(y, group):  # one K group: exact int32 dot, then its scales
      xg, wg, sxg, swg = group
      acc = jax.lax.dot_general(xg, wg, _NT,
                                preferred_element_type=jnp.int32)
      return y + acc.astype(jnp.float32) * sxg[:, None] * swg[None, :], None

    y, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], w.shape[0]),
                                        jnp.float32),
                        (split(x), split(w), sx.T.astype(jnp.float32),
                         sw.T.astype(jnp.float32)))
    return y.astype(out_dtype)
  acc = jax.lax.dot_general(x, w, _NT, preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * s_x[:, None] * s_w[None, :]
  return y.astype(out_dtype)
