"""Random W4A4 operands shared by the w4a4_matmul tests."""

import jax.numpy as jnp
import numpy as np


def codes(m: int, n: int, k: int, seed: int = 0):
  """int8 x [M, K] and w [N, K] codes in [-8, 7], f32 scales s_x [M] and
  s_w [N] in [0.01, 0.1) (never zero)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.integers(-8, 8, (m, k)), jnp.int8)
  w = jnp.asarray(rng.integers(-8, 8, (n, k)), jnp.int8)
  sx = jnp.asarray(rng.uniform(0.01, 0.1, m), jnp.float32)
  sw = jnp.asarray(rng.uniform(0.01, 0.1, n), jnp.float32)
  return x, w, sx, sw


def group_scales(rows: int, groups: int, seed: int):
  """f32[rows, groups] in [0.01, 0.1)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(0.01, 0.1, (rows, groups)), jnp.float32)


def dequantized_product(x, w, sx, sw) -> np.ndarray:
  """The float computation W4A4 stands for, in f64 on the host:
  (x * s_x) · (w * s_w)ᵀ with per-row or per-group scales."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  k = x.shape[1]

  def widen(s, rows):  # [rows] or [rows, G] -> [rows, K]
    s = np.asarray(s, np.float64).reshape(rows, -1)
    return np.repeat(s, k // s.shape[1], axis=1)

  return (x * widen(sx, x.shape[0])) @ (w * widen(sw, w.shape[0])).T
