"""Zero padding of kernel operands to whole tiles."""

import jax
import jax.numpy as jnp


def pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """x zero-padded at the end of `axis` to a multiple of `multiple`.

  Args:
    x: any array.
    axis: the axis to pad.
    multiple: the tile size along `axis`.

  Returns:
    x itself when `axis` is already a multiple, else a padded copy.
  """
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)
