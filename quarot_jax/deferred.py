"""A decode linear's output whose epilogue the next pre-norm runs (#14).

At decode a packed W4A4 linear's matmul (`decode_matmul`) leaves split-K
partial sums, and its epilogue (add the splits, scale, cast, add the
residual) is one XLA launch of its own. o_proj's and down_proj's outputs
are read next by a pre-norm's quantizer, so with `Kernels(splitk_fold=True)`
that quantizer runs the epilogue instead (`rms_norm_quant_splitk`):

  o_proj / down_proj  ->  Deferred(partials, residual)
  next pre-norm       ->  norm_quantize(Deferred) = PreQuantized(h, codes)
  next q/k/v, gate/up ->  qlinear.linears(PreQuantized, norm=...) uses the
                          codes; h is the residual stream from then on.

Same numbers as the unfused path: the partial sums are integers (exact in
any order), and the kernel rounds y and h to the stream's dtype as the
unfused ops do.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax

from pallas_kernels import rms_norm_quant as rq_lib
from pallas_kernels import splitk


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Deferred:
  """A linear's output (+ a residual), before the linear's epilogue.

  Attributes:
    sk: the linear's output as split-K partials (f32[S, D, Mp]).
    residual: [..., D] the residual stream it is added to, or None.
    shape: the output's shape [..., D] (static).
    dtype: the output's dtype (static).
  """

  sk: splitk.SplitK
  residual: jax.Array | None
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))

  @property
  def rows(self) -> int:
    """M, the tokens (real rows of the partials)."""
    return math.prod(self.shape[:-1])

  def materialize(self) -> jax.Array:
    """[residual +] y as XLA computes it ([..., D] in `dtype`)."""
    y = splitk.combine(self.sk, self.rows, self.dtype).reshape(self.shape)
    return y if self.residual is None else self.residual + y


class PreQuantized(NamedTuple):
  """A residual stream and the codes of its RMS norm (the next linears'
  input), from one `rms_norm_quant_splitk` launch.

  Attributes:
    h: [..., D] the residual stream.
    x_q: int8[Mp, D] codes of rms_norm(h) (padding rows zero).
    s_x: f32[Mp] their per-token scales (padding rows 1).
  """

  h: jax.Array
  x_q: jax.Array
  s_x: jax.Array


def norm_quantize(d: Deferred, weight: jax.Array, *, eps: float,
                  clip_ratio: float, interpret: bool = False
                  ) -> PreQuantized:
  """The deferred epilogue, the residual add and the next pre-norm's
  quantizer in one launch.

  Args:
    d: residual + a linear's deferred output.
    weight: float[D] the norm's weight.
    eps: the norm's epsilon.
    clip_ratio: the activation quantizer's clip ratio.
    interpret: run the kernel in interpret mode (CPU).

  Returns:
    `PreQuantized` with codes of Mp rows (the partials' padded rows, which
    the next decode matmul pads to as well).
  """
  if d.residual is None:
    raise ValueError("norm_quantize takes a residual stream: residual + a"
                     " linear's output")
  x_q, s_x, h = rq_lib.rms_norm_quant_splitk(
      d.sk, d.residual.reshape(d.rows, -1), weight, eps=eps,
      clip_ratio=clip_ratio, out_rows=d.sk.padded_rows,
      implementation="pallas", interpret=interpret)
  return PreQuantized(h.reshape(d.shape), x_q, s_x)
