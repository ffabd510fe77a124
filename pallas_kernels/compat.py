"""The only place the kernels switch on the jax version (0.10.2 CPU, 0.11.2
GPU)."""

from typing import Any

from jax.experimental.pallas import triton as pl_triton


def triton_params(*, num_warps: int, num_stages: int) -> Any:
  """Compiler params that select Pallas' Triton lowering on GPUs."""
  params = getattr(pl_triton, "CompilerParams", None)
  if params is None:  # older spelling
    params = pl_triton.TritonCompilerParams
  return params(num_warps=num_warps, num_stages=num_stages)
