"""The only place that switches on the jax version (0.10.2 CPU, 0.11.2 GPU)."""

from typing import Any


def triton_params(*, num_warps: int, num_stages: int) -> Any:
  """Compiler params that select Pallas' Triton lowering on GPUs."""
  from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
  params = getattr(pl_triton, "CompilerParams", None)
  if params is None:  # older spelling
    params = pl_triton.TritonCompilerParams
  return params(num_warps=num_warps, num_stages=num_stages)
