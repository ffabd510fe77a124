"""prefill_qkv (Pallas, interpret mode on CPU) against its reference, and the
reference against the model's unfused prefill ops (apply_rope, the head
Hadamard, write_kv4, fake_quantize_kv4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kv4_cache as kv4_lib
from pallas_kernels import prefill_qkv as pq
from quarot_jax import hadamard
from quarot_jax import layers


def _case(b, t, n, kv_heads, s, h, dtype, seed=0):
  """Random qkv [B, T, (N + 2K) H], positions [B, T], filled caches of S
  slots, and cos/sin [B, T, H]."""
  kq, kc, kp = jax.random.split(jax.random.key(seed), 3)
  width = (n + 2 * kv_heads) * h
  # Heads of different ranges, so per-head scales differ.
  spread = jnp.repeat(jnp.linspace(0.3, 3.0, n + 2 * kv_heads), h)
  qkv = (jax.random.normal(kq, (b, t, width)) * spread).astype(dtype)
  old = jax.random.normal(kc, (2, b, s, kv_heads, h))
  caches = tuple(kv4_lib.quantize_kv4(x) for x in old)
  positions = (jax.random.randint(kp, (b, 1), 0, 3000)
               + jnp.arange(t)[None, :])
  inv_freq = layers.rope_inv_freq(h, 10000.0)
  cos, sin = layers.rope_cos_sin(positions, inv_freq)  # [B, T, H]
  return qkv, cos, sin, positions, inv_freq, caches


def _assert_same(got, want, f32: bool):
  """q, k, v equal (f32: to the reordering of the head transform's sums)
  and the caches' codes, zeros and scales equal (f32 scales to 2^-20)."""
  for g, w in zip(got[:3], want[:3]):
    assert g.shape == w.shape and g.dtype == w.dtype
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    if f32:
      np.testing.assert_allclose(g, w, rtol=0, atol=3e-5)
    else:
      np.testing.assert_array_equal(g, w)
  for gc, wc in zip(got[3:], want[3:]):
    for name in ("codes", "scale", "zero"):
      g, w = np.asarray(getattr(gc, name)), np.asarray(getattr(wc, name))
      if name == "scale" and f32:
        np.testing.assert_allclose(g, w, rtol=2 ** -20, atol=0)
      else:
        np.testing.assert_array_equal(g, w, err_msg=name)


# b, t, n, kv_heads, s, h, dtype, head transform, slot, block_tokens
_CASES = [
    (1, 32, 4, 4, 40, 64, jnp.bfloat16, True, 3, 16),     # MHA, 2 blocks
    (2, 16, 8, 2, 16, 128, jnp.bfloat16, True, 0, None),  # GQA G = 4
    (2, 32, 6, 2, 33, 64, jnp.float32, True, 1, None),    # G = 3, f32
    (1, 48, 2, 2, 50, 64, jnp.bfloat16, False, 9, 16),    # clamped to S - T
    (1, 16, 2, 1, 20, 64, jnp.float16, True, -4, None),   # from the end
]


@pytest.mark.parametrize("b, t, n, kv_heads, s, h, dtype, had, at, bt",
                         _CASES)
def test_kernel_equals_reference(b, t, n, kv_heads, s, h, dtype, had, at,
                                 bt):
  if jax.default_backend() == "gpu":
    pytest.skip("exact on the CPU only (XLA:GPU orders GEMM sums otherwise)")
  qkv, cos, sin, _, _, (kc, vc) = _case(b, t, n, kv_heads, s, h, dtype)
  signs = jnp.asarray(hadamard.hadamard_matrix(h)) if had else None
  args = (qkv, cos, sin, signs, kc, vc, jnp.int32(at))
  kw = dict(num_heads=n, k_clip_ratio=0.95, v_clip_ratio=0.9)
  got = pq.prefill_qkv(*args, **kw, block_tokens=bt, interpret=True,
                       implementation="pallas")
  want = pq.prefill_qkv_reference(*args, **kw)
  assert got[0].shape == (b, t, n, h) and got[1].shape == (b, t, kv_heads, h)
  _assert_same(got, want, f32=dtype == jnp.float32)
  # Slots outside [at, at + T) keep the old cache.
  start = min(at % s if at < 0 else at, s - t)
  keep = np.ones(s, bool)
  keep[start:start + t] = False
  np.testing.assert_array_equal(np.asarray(got[3].codes)[:, :, keep],
                                np.asarray(kc.codes)[:, :, keep])


@pytest.mark.parametrize("block_heads", [1, 2])
def test_fewer_heads_a_program_give_the_same_result(block_heads):
  if jax.default_backend() == "gpu":
    pytest.skip("exact on the CPU only")
  b, t, n, kv_heads, s, h = 1, 32, 8, 4, 40, 64
  qkv, cos, sin, _, _, (kc, vc) = _case(b, t, n, kv_heads, s, h,
                                        jnp.bfloat16, seed=2)
  signs = jnp.asarray(hadamard.hadamard_matrix(h))
  args = (qkv, cos, sin, signs, kc, vc, jnp.int32(4))
  got = pq.prefill_qkv(*args, num_heads=n, block_heads=block_heads,
                       block_tokens=16, interpret=True,
                       implementation="pallas")
  _assert_same(got, pq.prefill_qkv_reference(*args, num_heads=n), f32=False)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_half_rope_reads_one_half_and_gives_the_same_result(dtype):
  """rope_halves_equal on HF's cos/sin (each half the H / 2 frequencies)
  is the full read bit for bit; on halves that differ it is not, so the
  kernel does use only the first halves."""
  if jax.default_backend() == "gpu":
    pytest.skip("exact on the CPU only")
  b, t, n, kv_heads, s, h = 2, 32, 4, 2, 40, 64
  qkv, cos, sin, _, _, (kc, vc) = _case(b, t, n, kv_heads, s, h, dtype,
                                        seed=11)
  signs = jnp.asarray(hadamard.hadamard_matrix(h))
  run = lambda c, sn, half: pq.prefill_qkv(
      qkv, c, sn, signs, kc, vc, jnp.int32(2), num_heads=n,
      block_tokens=16, rope_halves_equal=half, interpret=True,
      implementation="pallas")
  _assert_same(run(cos, sin, True), run(cos, sin, False), f32=False)
  # Second halves changed: the full read sees it, the half read does not.
  cos2, sin2 = (x.at[..., h // 2:].multiply(0.5) for x in (cos, sin))
  _assert_same(run(cos2, sin2, True), run(cos, sin, True), f32=False)
  q_full, q_half = run(cos2, sin2, False)[0], run(cos2, sin2, True)[0]
  assert not np.array_equal(np.asarray(q_full, np.float32),
                            np.asarray(q_half, np.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_subtracts_the_key_center(dtype):
  if jax.default_backend() == "gpu":
    pytest.skip("exact on the CPU only")
  b, t, n, kv_heads, s, h = 2, 16, 4, 2, 16, 64
  qkv, cos, sin, _, _, (kc, vc) = _case(b, t, n, kv_heads, s, h, dtype,
                                        seed=5)
  signs = jnp.asarray(hadamard.hadamard_matrix(h))
  center = 4.0 * jax.random.normal(jax.random.key(9), (kv_heads, h))
  args = (qkv, cos, sin, signs, kc, vc, jnp.int32(0))
  got = pq.prefill_qkv(*args, num_heads=n, k_center=center, interpret=True,
                       implementation="pallas")
  want = pq.prefill_qkv_reference(*args, num_heads=n, k_center=center)
  _assert_same(got, want, f32=dtype == jnp.float32)
  uncentered = pq.prefill_qkv_reference(*args, num_heads=n)
  assert not np.array_equal(np.asarray(want[1]), np.asarray(uncentered[1]))


def test_reference_equals_model_ops():
  """The reference is the model's unfused prefill: apply_rope on
  [B, T, heads, H], the head Hadamard einsum, write_kv4, and
  fake_quantize_kv4 for what flash attention reads."""
  b, t, n, kv_heads, s, h = 2, 16, 8, 2, 24, 64
  qkv, cos, sin, positions, inv_freq, (kc, vc) = _case(
      b, t, n, kv_heads, s, h, jnp.bfloat16, seed=3)
  signs = jnp.asarray(hadamard.hadamard_matrix(h))
  got = pq.prefill_qkv_reference(qkv, cos, sin, signs, kc, vc, jnp.int32(5),
                                 num_heads=n)
  heads = qkv.reshape(b, t, n + 2 * kv_heads, h)
  q, k, v = jnp.split(heads, [n, n + kv_heads], axis=2)

  def head_had(x):
    y = jnp.einsum("...i,ij->...j", x, signs.astype(x.dtype),
                   preferred_element_type=jnp.float32)
    return (y * jnp.float32(1.0 / np.sqrt(h))).astype(x.dtype)

  q = head_had(layers.apply_rope(q, positions, inv_freq))
  k = head_had(layers.apply_rope(k, positions, inv_freq))
  want = (q, kv4_lib.fake_quantize_kv4(k).astype(k.dtype),
          kv4_lib.fake_quantize_kv4(v).astype(v.dtype),
          kv4_lib.write_kv4(kc, k, jnp.int32(5)),
          kv4_lib.write_kv4(vc, v, jnp.int32(5)))
  _assert_same(got, want, f32=False)


def test_heads_per_program_keep_queries_keys_and_values_apart():
  # LLaMA-2-7B (MHA), LLaMA-3-8B (G = 4), odd head counts.
  assert [pq.heads_per_program(n, k) for n, k in
          ((32, 32), (32, 8), (12, 2), (6, 2), (5, 5), (40, 40))] == [
              2, 2, 2, 2, 1, 2]
  assert pq.heads_per_program(32, 8, most=8) == 8


def test_default_block_tokens_and_what_the_kernel_takes():
  assert [pq.default_block_tokens(t) for t in (2048, 48, 16, 8, 100)] == [
      64, 16, 16, 0, 0]
  assert pq.kernel_takes(128, 2048) and not pq.kernel_takes(128, 8)
  assert not pq.kernel_takes(96, 64)  # H / 2 = 48 is no power of two


def test_errors():
  qkv, cos, sin, _, _, (kc, vc) = _case(1, 16, 2, 2, 16, 64, jnp.bfloat16)
  args = (cos, sin, None, kc, vc, jnp.int32(0))
  with pytest.raises(ValueError, match=r"qkv must be \[B, T, \(N \+ 2K\)"):
    pq.prefill_qkv(qkv[..., :-64], *args, num_heads=2)
  with pytest.raises(ValueError, match="cos must be f32"):
    pq.prefill_qkv(qkv, cos[:, :8], sin, None, kc, vc, 0, num_heads=2)
  with pytest.raises(ValueError, match="block_tokens=24 must be a power"):
    pq.prefill_qkv(qkv, *args, num_heads=2, block_tokens=24,
                   interpret=True)
  with pytest.raises(ValueError, match="block_heads=3 must divide N=2"):
    pq.prefill_qkv(qkv, *args, num_heads=2, block_heads=3, interpret=True)
  small = kv4_lib.empty_kv4(1, 2, 8, 64)
  with pytest.raises(ValueError, match="T=16 new tokens do not fit"):
    pq.prefill_qkv(qkv, cos, sin, None, small, small, 0, num_heads=2)


@pytest.mark.gpu
@pytest.mark.parametrize("bt, warps, half", [(None, 4, False),
                                             (None, 4, True),
                                             (128, 4, False), (128, 8, False),
                                             (256, 8, False)])
def test_gpu_matches_reference(bt, warps, half):
  # 7B-like heads at 256 tokens: XLA:GPU's GEMM may order the head
  # transform's f32 sums otherwise, so a bf16 q or k may round the other
  # way now and then; codes then move by one at most. bt: the default
  # block (64 tokens) and larger ones.
  b, t, n, kv_heads, s, h = 2, 256, 8, 8, 300, 128
  qkv, cos, sin, _, _, (kc, vc) = _case(b, t, n, kv_heads, s, h,
                                        jnp.bfloat16, seed=7)
  signs = jnp.asarray(hadamard.hadamard_matrix(h))
  args = (qkv, cos, sin, signs, kc, vc, jnp.int32(10))
  hlo = jax.jit(pq.prefill_qkv, static_argnames="num_heads").lower(
      *args, num_heads=n).as_text()
  assert "prefill_qkv" in hlo
  got = pq.prefill_qkv(*args, num_heads=n, block_tokens=bt,
                       num_warps=warps, rope_halves_equal=half)
  want = pq.prefill_qkv_reference(*args, num_heads=n)
  for g, w in zip(got[:3], want[:3]):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.mean(g != w) < 1e-3
    np.testing.assert_allclose(g, w, rtol=2 ** -7, atol=1e-2)
  for gc, wc in zip(got[3:], want[3:]):
    codes = lambda c: np.asarray(kv4_lib.dequantize_kv4(c))
    assert np.mean(codes(gc) != codes(wc)) < 1e-3
