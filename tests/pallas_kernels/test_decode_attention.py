"""decode_attention (Pallas, interpret mode) against its reference, and the
reference against the model's einsum attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention as da
from pallas_kernels import flash_decoding
from quarot_jax import model

Config = da.DecodeAttentionConfig


def _case(b, s, kv_heads, g, h, dtype=jnp.float32, seed=0):
  """q [B, N, H] and caches [B, S, K, H], fresh random per case."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, kv_heads * g, h)).astype(dtype)
  k = (1.5 * jax.random.normal(kk, (b, s, kv_heads, h))).astype(dtype)
  v = jax.random.normal(kv, (b, s, kv_heads, h)).astype(dtype)
  return q, k, v


# S not a block multiple, G in {1, 3, 4}, several splits, per-row ranges:
# short, one slot, empty (row 2 of the second case), ending at S.
_CASES = [
    # b, s, kv_heads, g, h, block_s, num_splits, start, end
    (2, 100, 2, 1, 64, 16, 3, [0, 40], [100, 43]),
    (3, 300, 2, 1, 32, 64, 2, [0, 5, 280], [300, 6, 280]),
    (3, 77, 1, 4, 64, 32, 1, [5, 0, 60], [70, 77, 65]),
    (2, 50, 2, 3, 32, 16, 4, [10, 0], [15, 50]),
]


@pytest.mark.parametrize("b, s, kv_heads, g, h, block_s, splits, start, end",
                         _CASES)
def test_f32_kernel_is_the_reference(b, s, kv_heads, g, h, block_s, splits,
                                     start, end, interpret):
  q, k, v = _case(b, s, kv_heads, g, h, seed=s)
  start, end = jnp.array(start, jnp.int32), jnp.array(end, jnp.int32)
  got = da.decode_attention(q, k, v, start, end,
                            config=Config(block_s=block_s, num_splits=splits),
                            interpret=interpret, implementation="pallas")
  want = da.decode_attention_reference(q, k, v, start, end)
  assert got.shape == q.shape and got.dtype == q.dtype
  empty = np.asarray(start >= end)
  np.testing.assert_array_equal(np.asarray(got)[empty], 0.0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                             atol=2e-6 * float(jnp.abs(want).max()))


# The merge (grid (B, K, G)) over NS = 3 or 5 splits, padded to NSp = 4 or
# 8: rows with different starts, a row shorter than one block (its later
# splits empty) and a row with every split empty (start == end).
_MERGE_CASES = [
    # b, s, kv_heads, g, splits, start, end
    (2, 150, 2, 1, 5, [0, 37], [150, 120]),
    (2, 150, 2, 4, 3, [9, 60], [140, 150]),
    (3, 90, 2, 4, 5, [3, 40, 70], [90, 44, 70]),
    (3, 90, 1, 1, 3, [0, 88, 50], [90, 90, 50]),
]


@pytest.mark.parametrize("b, s, kv_heads, g, splits, start, end",
                         _MERGE_CASES)
def test_merge_of_splits_not_a_power_of_two(b, s, kv_heads, g, splits, start,
                                            end, interpret):
  q, k, v = _case(b, s, kv_heads, g, 32, seed=s + g)
  start, end = jnp.array(start, jnp.int32), jnp.array(end, jnp.int32)
  got = np.asarray(da.decode_attention(
      q, k, v, start, end, interpret=interpret, implementation="pallas",
      config=Config(block_s=16, num_splits=splits)))
  want = np.asarray(da.decode_attention_reference(q, k, v, start, end))
  assert not np.any(np.isnan(got))
  np.testing.assert_array_equal(got[np.asarray(start >= end)], 0.0)
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=2e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("g", [1, 4])
def test_bf16_kernel_matches_the_reference(g, interpret):
  # bf16 dots with f32 accumulation; the kernel rounds the unnormalized
  # probabilities to bf16, the reference the normalized ones.
  q, k, v = _case(2, 200, 2, g, 64, jnp.bfloat16, seed=g)
  start, end = jnp.array([0, 37], jnp.int32), jnp.array(200, jnp.int32)
  got = da.decode_attention(q, k, v, start, end, interpret=interpret,
                            implementation="pallas")
  want = da.decode_attention_reference(q.astype(jnp.float32),
                                       k.astype(jnp.float32),
                                       v.astype(jnp.float32), start, end)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want),
                             rtol=0, atol=1e-2 * float(jnp.abs(want).max()))


def test_tiny_cache_and_default_splits(interpret):
  q, k, v = _case(2, 9, 1, 2, 16, seed=3)  # S < 16: padded to one block
  start, end = jnp.array([0, 4], jnp.int32), jnp.array(9, jnp.int32)
  got = da.decode_attention(q, k, v, start, end, interpret=interpret,
                            implementation="pallas")
  want = da.decode_attention_reference(q, k, v, start, end)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                             atol=2e-6 * float(jnp.abs(want).max()))
  assert flash_decoding.default_num_splits(1, 32, 1088) == 8  # >= 128 a split
  assert flash_decoding.default_num_splits(16, 32, 4160) == 1


def test_reference_is_the_model_attention():
  # model.attend at T = 1 over the mask start <= s < end (rows not empty).
  q, k, v = _case(3, 40, 2, 2, 32, seed=5)
  start, end = jnp.array([0, 7, 39], jnp.int32), jnp.array([40, 20, 40])
  slots = jnp.arange(40)
  mask = ((slots >= start[:, None]) & (slots < end[:, None]))[:, None]
  want = model.attend(q[:, None], k, v, mask)[:, 0]
  got = da.decode_attention_reference(q, k, v, start, end)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                             atol=1e-6 * float(jnp.abs(want).max()))


def test_errors():
  q, k, v = _case(2, 16, 2, 2, 32)
  s, e = jnp.array([0, 0]), jnp.array([16, 16])
  run = da.decode_attention
  with pytest.raises(ValueError, match="query heads n=3 must be a multiple"):
    run(q[:, :3], k, v, s, e)
  with pytest.raises(ValueError, match="k and v caches differ"):
    run(q, k, v[:, :8], s, e)
  with pytest.raises(ValueError, match=r"start must be \[B\]=\[2\]"):
    run(q, k, v, s[:1], e)
  with pytest.raises(ValueError, match="block_s=24 must be a power of two"):
    Config(block_s=24)
  with pytest.raises(ValueError, match="num_splits=0 must be >= 1"):
    Config(num_splits=0)
  assert not da.kernel_takes(96) and da.kernel_takes(128)


@pytest.mark.gpu
@pytest.mark.parametrize("g", [1, 4])
def test_gpu_lowers_to_the_named_kernel_and_matches(g):
  # LLaMA-2-7B (G = 1) / LLaMA-3-8B (G = 4) heads, fewer of them; rows with
  # a full, a partial, a short and an empty range; 1 and several splits.
  q, k, v = _case(4, 4096 + 200, 8 // g, g, 128, jnp.bfloat16, seed=g)
  start = jnp.array([0, 100, 4000, 4296], jnp.int32)
  end = jnp.array([4296, 3000, 4010, 4296], jnp.int32)
  want = np.asarray(da.decode_attention_reference(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
      start, end))
  fn = jax.jit(lambda *a: da.decode_attention(*a, implementation="pallas"))
  assert "decode_attention" in fn.lower(q, k, v, start, end).as_text()
  for cfg in (None, Config(num_splits=1), Config(block_s=128, num_splits=8),
              Config(block_s=32, num_splits=3, num_warps=8)):
    got = np.asarray(da.decode_attention(q, k, v, start, end, config=cfg,
                                         implementation="pallas"), np.float32)
    assert not np.any(np.isnan(got))
    np.testing.assert_array_equal(got[3], 0.0)
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=1e-2 * np.abs(want).max())
