"""Tests for experiments/decode_step_kernels.py."""

import jax
import jax.numpy as jnp

from experiments import decode_step_kernels


def test_launched_names_kinds_and_source_lines():
  def f(x, y):
    return jnp.tanh(x @ y).sum(axis=0)

  text = jax.jit(f).lower(jnp.ones((8, 8)), jnp.ones((8, 8))).compile(
  ).as_text()
  kernels = decode_step_kernels.launched(text)
  assert kernels, text
  kinds = {kind for kind, _ in kernels}
  assert kinds <= {"fusion", "dot", "custom-call", "copy", "reduce"}, kinds
  # At least one launch is traced back to f's line in this file.
  assert any("test_decode_step_kernels.py:11" in where
             for _, where in kernels), kernels
