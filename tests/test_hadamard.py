"""Tests for quarot_jax/hadamard.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarot_jax import hadamard

# LLaMA-family sizes (hidden, FFN, heads·head_dim) and their factorizations.
LLAMA_SIZES = {
    4096: (4096, 1),
    5632: (128, 44),  # TinyLlama FFN
    8960: (64, 140),  # Qwen2.5-1.5B FFN (Paley I, q = 139)
    4864: (64, 76),
    576: (16, 36),  # SmolLM2-135M hidden
    960: (16, 60),  # SmolLM2-360M hidden
    1536: (128, 12),  # SmolLM2-135M FFN
    5120: (256, 20),  # LLaMA-2 13B hidden
    6656: (128, 52),  # LLaMA 30B hidden
    11008: (64, 172),  # LLaMA-2 7B FFN
    13824: (128, 108),  # LLaMA-2 13B FFN
    14336: (512, 28),  # LLaMA-3 8B FFN
    17920: (128, 140),  # LLaMA 30B FFN
    22016: (128, 172),  # LLaMA 65B FFN
    28672: (1024, 28),  # LLaMA-2/3 70B FFN
}


def _exact_gram(rows: np.ndarray, h: np.ndarray) -> np.ndarray:
  # ±1 products summed over n <= 2^24 terms are exact in f32.
  return (rows.astype(np.float32) @ h.astype(np.float32).T).astype(np.int64)


@pytest.mark.parametrize("m", (1, 2) + hadamard.BASE_ORDERS)
def test_base_matrix_is_hadamard(m):
  b = hadamard._base_matrix(m).astype(np.int64)
  assert b.shape == (m, m)
  assert set(np.unique(b)) <= {-1, 1}
  np.testing.assert_array_equal(b @ b.T, m * np.eye(m, dtype=np.int64))


@pytest.mark.parametrize("m,source", [
    (12, ("paley1", 11)), (28, ("paley1", 27)), (36, ("paley2", 17)),
    (52, ("paley2", 25)), (76, ("paley2", 37)), (108, ("paley1", 107)),
    (140, ("paley1", 139)), (156, ("circulant", 156)),
    (172, ("circulant", 172)), (40, None),
    (100, ("paley2", 49)), (188, None), (6, None)])
def test_base_sources(m, source):
  # 28 and 52 need the prime-power fields GF(27) and GF(25).
  assert hadamard._base_source(m) == source


def test_gf_log_table_is_a_bijection():
  for p, k in [(3, 3), (5, 2), (2, 4), (7, 1)]:
    log = hadamard._gf_log_table(p, k)
    assert log[0] == -1
    assert sorted(log[1:]) == list(range(p**k - 1))


def test_172_is_williamson_type():
  # Blocks of the Williamson array are symmetric circulants.
  h = hadamard._base_matrix(172).astype(np.int64)
  for r in range(4):
    for c in range(4):
      blk = h[43 * r:43 * (r + 1), 43 * c:43 * (c + 1)]
      np.testing.assert_array_equal(blk, blk.T)
      np.testing.assert_array_equal(np.roll(blk[0], 1), blk[1])


def test_sylvester():
  for n in (1, 2, 4, 64):
    s = hadamard.sylvester(n).astype(np.int64)
    np.testing.assert_array_equal(s, s.T)
    np.testing.assert_array_equal(s @ s.T, n * np.eye(n, dtype=np.int64))
  with pytest.raises(ValueError, match="n=12 must be a power of two"):
    hadamard.sylvester(12)


@pytest.mark.parametrize("n,expected", sorted(LLAMA_SIZES.items()))
def test_factorize_llama_sizes(n, expected):
  assert hadamard.factorize(n) == expected
  assert hadamard.is_supported(n)


def test_factorize_small():
  assert hadamard.factorize(1) == (1, 1)
  assert hadamard.factorize(2) == (2, 1)
  assert hadamard.factorize(40) == (2, 20)
  assert hadamard.factorize(96) == (8, 12)
  assert hadamard.factorize(np.int64(344)) == (2, 172)


@pytest.mark.parametrize("n", [576, 960, 1536, 344, 312, 96, 2048])
def test_hadamard_matrix_dense(n):
  h = hadamard.hadamard_matrix(n)
  assert h.dtype == np.float32 and h.shape == (n, n)
  np.testing.assert_array_equal(np.abs(h), 1)
  np.testing.assert_array_equal(_exact_gram(h, h),
                                n * np.eye(n, dtype=np.int64))


@pytest.mark.parametrize("n", [4096, 4864, 5632, 11008, 13824, 14336])
def test_hadamard_matrix_llama_rows(n):
  # H Hᵀ = n I on 96 random rows against all rows (the bases are checked
  # whole above; a dense n³ check would take minutes on 2 cores).
  h = hadamard.hadamard_matrix(n)
  idx = np.random.default_rng(0).choice(n, 96, replace=False)
  np.testing.assert_array_equal(np.abs(h[idx]), 1)
  np.testing.assert_array_equal(_exact_gram(h[idx], h),
                                n * np.eye(n, dtype=np.int64)[idx])


def test_hadamard_matrix_is_kron_in_documented_order():
  for n in (96, 344, 576):
    p, m = hadamard.factorize(n)
    np.testing.assert_array_equal(
        hadamard.hadamard_matrix(n),
        np.kron(hadamard.sylvester(p), hadamard._base_matrix(m)))


def _dense(x: np.ndarray, n: int, normalize: bool) -> np.ndarray:
  y = x.astype(np.float64) @ hadamard.hadamard_matrix(n).astype(np.float64)
  return y / np.sqrt(n) if normalize else y


@pytest.mark.parametrize("n", [1, 2, 64, 96, 280, 344, 312, 576, 1536,
                               4096])
@pytest.mark.parametrize("normalize", [True, False])
def test_fast_transform_matches_dense(n, normalize):
  x = jax.random.normal(jax.random.key(0), (2, 3, n), jnp.float32)
  y = jax.jit(hadamard.fast_hadamard_transform,
              static_argnames="normalize")(x, normalize=normalize)
  assert y.shape == x.shape and y.dtype == jnp.float32
  ref = _dense(np.asarray(x), n, normalize)
  scale = 1.0 if normalize else np.sqrt(n)
  # f32 rounding of sums of ~n terms of size ~1/sqrt(n) (normalized).
  np.testing.assert_allclose(np.asarray(y), ref, rtol=0,
                             atol=2e-6 * scale * np.log2(2 * n))


def test_fast_transform_bf16_uses_f32_internally():
  n = 576
  x = jax.random.normal(jax.random.key(1), (4, n), jnp.bfloat16)
  y = hadamard.fast_hadamard_transform(x)
  assert y.dtype == jnp.bfloat16
  # Exactly the f32 result rounded once to bf16.
  ref = jnp.asarray(_dense(np.asarray(x, np.float32), n, True), jnp.float32)
  y32 = hadamard.fast_hadamard_transform(x.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(y32), np.asarray(ref), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(y32.astype(jnp.bfloat16),
                                           np.float32))


def test_fast_transform_is_orthogonal():
  x = jax.random.normal(jax.random.key(2), (5, 11008), jnp.float32)
  y = hadamard.fast_hadamard_transform(x)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_fast_transform_rejects_ints():
  with pytest.raises(ValueError, match="must be floating point"):
    hadamard.fast_hadamard_transform(jnp.ones((4,), jnp.int32))


@pytest.mark.parametrize("n, blocks", [(96, 2), (96, 3), (576, 3)])
def test_block_transform_is_block_diagonal(n, blocks):
  # x @ (I_blocks ⊗ H_(n/blocks)) / sqrt(n/blocks): 96/2 = 48 = 4·12,
  # 96/3 = 32, 576/3 = 192 = 16·12 (SmolLM2's N·H over 3 shards).
  x = jax.random.normal(jax.random.key(0), (3, n), jnp.float32)
  m = n // blocks
  dense = np.kron(np.eye(blocks), hadamard.hadamard_matrix(m)) / np.sqrt(m)
  y = hadamard.block_hadamard_transform(x, blocks)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ dense,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(dense @ dense.T), np.eye(n),
                             atol=1e-6)


def test_block_transform_one_block_is_the_full_transform():
  x = jax.random.normal(jax.random.key(1), (2, 96), jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(hadamard.block_hadamard_transform(x, 1)),
      np.asarray(hadamard.fast_hadamard_transform(x)))
  with pytest.raises(ValueError, match="blocks=5 must be a positive divisor"
                     " of n=96"):
    hadamard.block_hadamard_transform(x, 5)


@pytest.mark.parametrize("n", [576, 1536, 344])
def test_random_hadamard_matrix(n):
  q = hadamard.random_hadamard_matrix(n, jax.random.key(0))
  assert q.dtype == jnp.float32 and q.shape == (n, n)
  q64 = np.asarray(q, np.float64)
  np.testing.assert_allclose(q64 @ q64.T, np.eye(n), atol=1e-6)
  # Q = diag(s) H / sqrt(n): each row is ±(the row of H).
  ratio = q64 * np.sqrt(n) / hadamard.hadamard_matrix(n)
  s = ratio[:, :1]
  np.testing.assert_allclose(ratio, np.broadcast_to(s, ratio.shape),
                             atol=1e-6)
  np.testing.assert_allclose(np.abs(s), 1, atol=1e-6)
  assert (s > 0).any() and (s < 0).any()


def test_random_matrices_are_deterministic_by_key():
  for fn in (hadamard.random_hadamard_matrix,
             hadamard.random_orthogonal_matrix):
    a = fn(96, jax.random.key(3))
    np.testing.assert_array_equal(a, fn(96, jax.random.key(3)))
    assert not np.array_equal(a, fn(96, jax.random.key(4)))


def test_random_orthogonal_matrix_is_haar_qr():
  n, key = 200, jax.random.key(5)
  q = np.asarray(hadamard.random_orthogonal_matrix(n, key), np.float64)
  np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-5)
  # Sign fix: R = Qᵀ G is upper triangular with a positive diagonal.
  g = np.asarray(jax.random.normal(key, (n, n), jnp.float32), np.float64)
  r = q.T @ g
  np.testing.assert_allclose(np.tril(r, -1), 0, atol=1e-3)
  assert (np.diag(r) > 0).all()


def test_rotation_matrix_dispatch():
  key = jax.random.key(6)
  np.testing.assert_array_equal(
      hadamard.rotation_matrix(96, key, mode="hadamard"),
      hadamard.random_hadamard_matrix(96, key))
  np.testing.assert_array_equal(
      hadamard.rotation_matrix(96, key, mode="random"),
      hadamard.random_orthogonal_matrix(96, key))
  # The fallback for sizes without a Hadamard matrix.
  q = np.asarray(hadamard.rotation_matrix(188, key, mode="random"))
  np.testing.assert_allclose(q @ q.T, np.eye(188), atol=1e-5)
  with pytest.raises(ValueError, match="mode='qr' must be 'hadamard' or"):
    hadamard.rotation_matrix(96, key, mode="qr")


@pytest.mark.parametrize("n,p,m", [(188, 4, 47), (18, 2, 9), (9, 1, 9)])
def test_unsupported_size_message(n, p, m):
  assert not hadamard.is_supported(n)
  match = (rf"order n={n}: the largest power of two dividing n is {p} with "
           rf"cofactor {m},.*mode='random' \(a random orthogonal matrix\)")
  with pytest.raises(ValueError, match=match):
    hadamard.factorize(n)
  with pytest.raises(ValueError, match=match):
    hadamard.hadamard_matrix(n)
  with pytest.raises(ValueError, match=match):
    hadamard.fast_hadamard_transform(jnp.ones((n,)))
  with pytest.raises(ValueError, match=match):
    hadamard.rotation_matrix(n, jax.random.key(0), mode="hadamard")


def test_nonpositive_size():
  assert not hadamard.is_supported(0)
  with pytest.raises(ValueError, match="n=0 must be a positive integer"):
    hadamard.factorize(0)
  with pytest.raises(ValueError, match="n=-4 must be a positive integer"):
    hadamard.random_orthogonal_matrix(-4, jax.random.key(0))
