"""Programmatic dependent launch (Hopper): the side of the kernel before.

A kernel launched with PDL (our Mosaic decode matmul with
`DecodeMatmulConfig(pdl=True)`, which calls `griddepcontrol.wait` first) may
start while the kernel before it in the stream still runs, once every
program of that kernel has executed `griddepcontrol.launch_dependents`; its
`griddepcontrol.wait` then blocks until that kernel has finished and its
writes are visible. So triggering at a program's start is always safe, and
without a PDL launch after it the instruction does nothing. Pallas' Triton
lowering has no primitive for it; `launch_dependents_zero` emits it as
inline PTX.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu


def launch_dependents_zero(gpu: bool) -> jax.Array:
  """int32 scalar 0; compiled for the GPU, computed by inline PTX that first
  executes `griddepcontrol.launch_dependents`.

  Triton's inline assembly is pure (an unused result is deleted), so the
  caller adds the 0 to an index it uses, e.g. the program's first row; the
  trigger then runs before that index is needed, at the program's start.

  Args:
    gpu: compiled (True) or interpreted (False: a plain 0, no PTX).

  Returns:
    int32[] zero.
  """
  zeros = jnp.zeros((2,), jnp.int32)  # Triton's inline asm is elementwise
  if gpu:
    [zeros] = plgpu.elementwise_inline_asm(
        "griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;",
        args=[zeros], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct((2,), jnp.int32)])
  return jnp.sum(zeros)
