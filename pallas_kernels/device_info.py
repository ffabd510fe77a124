"""What the kernels ask of the GPU they are built for."""

import jax

# An H100/H200 SXM: the count kernels are planned for when no GPU answers
# (lowering for CUDA on a CPU, as the lowering tests do).
DEFAULT_NUM_SMS = 132


def num_sms() -> int:
  """Streaming multiprocessors of the first device, or `DEFAULT_NUM_SMS`
  where it has none (a CPU)."""
  try:
    return int(jax.devices()[0].core_count)
  except (AttributeError, TypeError):
    return DEFAULT_NUM_SMS
