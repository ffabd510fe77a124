"""decode_qkv (Pallas, interpret mode on CPU) against its reference and
against the model's unfused ops (apply_rope, the head Hadamard einsum,
kv4_append)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_qkv as qkv_lib
from pallas_kernels import kv4_append as append_lib
from pallas_kernels import kv4_cache as kv4_lib
from quarot_jax import hadamard
from quarot_jax import layers


def _case(b, n, kv_heads, s, h, dtype, seed=0):
  """Random qkv [B, (N + 2K) H], positions, caches of S slots."""
  kq, kc, kp = jax.random.split(jax.random.key(seed), 3)
  width = (n + 2 * kv_heads) * h
  # Heads of different ranges, so per-head scales differ.
  spread = jnp.repeat(jnp.linspace(0.3, 3.0, n + 2 * kv_heads), h)
  qkv = (jax.random.normal(kq, (b, width)) * spread).astype(dtype)
  old = jax.random.normal(kc, (2, b, s, kv_heads, h))
  caches = tuple(kv4_lib.quantize_kv4(x) for x in old)
  positions = jax.random.randint(kp, (b,), 0, 5000)
  inv_freq = layers.rope_inv_freq(h, 10000.0)
  cos, sin = layers.rope_cos_sin(positions, inv_freq)  # [B, H]
  return qkv, cos, sin, positions, inv_freq, caches


def _same_caches(got, want, scale_rtol=0.0):
  for i in (0, 1):
    for name in ("codes", "scale", "zero"):
      g, w = (np.asarray(getattr(c[i], name)) for c in (got, want))
      if name == "scale" and scale_rtol:
        np.testing.assert_allclose(g, w, rtol=scale_rtol, atol=0,
                                   err_msg=f"{'kv'[i]}.{name}")
      else:
        np.testing.assert_array_equal(g, w, err_msg=f"{'kv'[i]}.{name}")


# b, n, kv_heads, s, h, dtype, head transform, slot
_CASES = [
    (1, 4, 4, 9, 64, jnp.bfloat16, True, 3),      # MHA (G = 1)
    (2, 8, 2, 12, 128, jnp.bfloat16, True, -1),   # GQA G = 4, last slot
    (2, 6, 2, 5, 64, jnp.float32, True, 0),       # G = 3, f32
    (1, 16, 1, 7, 64, jnp.bfloat16, False, 6),    # G = 16, no transform
    (3, 2, 2, 4, 64, jnp.float16, False, 9),      # slot clamped to S - 1
]


@pytest.mark.parametrize("b, n, kv_heads, s, h, dtype, had, at", _CASES)
def test_kernel_equals_reference(b, n, kv_heads, s, h, dtype, had, at):
  if jax.default_backend() == "gpu":
    # Bit for bit only where XLA:CPU runs both dots: XLA:GPU orders the f32
    # sums of the [16, H] x [H, H / 2] and [B, N, H] x [H, H] GEMMs
    # differently. test_gpu_matches_reference covers the GPU.
    pytest.skip("exact on the CPU only")
  qkv, cos, sin, _, _, (kc, vc) = _case(b, n, kv_heads, s, h, dtype)
  signs = jnp.asarray(hadamard.hadamard_matrix(h)) if had else None
  args = (qkv, cos, sin, signs, kc, vc, jnp.int32(at))
  kw = dict(num_heads=n, k_clip_ratio=0.95, v_clip_ratio=0.9)
  q, k2, v2 = qkv_lib.decode_qkv(*args, **kw, interpret=True,
                                 implementation="pallas")
  q_ref, k_ref, v_ref = qkv_lib.decode_qkv_reference(*args, **kw)
  assert q.shape == (b, n, h) and q.dtype == dtype
  got, want = (np.asarray(x.astype(jnp.float32)) for x in (q, q_ref))
  if dtype == jnp.float32:
    # The kernel's head transform sums two half-width dots, the reference
    # one einsum: f32 sums of H = 64 terms |x| < 8 in another order, within
    # the reordering bound H * 2^-24 * sum|x| (~2e-4 here).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    _same_caches((k2, v2), (k_ref, v_ref), scale_rtol=2 ** -20)
  else:  # 16-bit: rounding the f32 sums to x's dtype hides their order
    np.testing.assert_array_equal(got, want)
    _same_caches((k2, v2), (k_ref, v_ref))


def test_reference_equals_model_ops():
  """The reference is the model's unfused decode path: apply_rope on
  [B, 1, heads, H], the head Hadamard einsum, then kv4_append."""
  b, n, kv_heads, s, h = 2, 8, 2, 6, 64
  qkv, cos, sin, positions, inv_freq, (kc, vc) = _case(
      b, n, kv_heads, s, h, jnp.bfloat16, seed=3)
  signs = jnp.asarray(hadamard.hadamard_matrix(h))
  q_ref, k_ref, v_ref = qkv_lib.decode_qkv_reference(
      qkv, cos, sin, signs, kc, vc, jnp.int32(2), num_heads=n)

  heads = qkv.reshape(b, 1, n + 2 * kv_heads, h)
  q, k, v = jnp.split(heads, [n, n + kv_heads], axis=2)
  pos = positions[:, None]

  def head_had(x):
    y = jnp.einsum("...i,ij->...j", x, signs.astype(x.dtype),
                   preferred_element_type=jnp.float32)
    return (y * jnp.float32(1.0 / np.sqrt(h))).astype(x.dtype)

  q = head_had(layers.apply_rope(q, pos, inv_freq))
  k = head_had(layers.apply_rope(k, pos, inv_freq))
  k_want, v_want = append_lib.kv4_append_reference(
      kc, vc, k[:, 0], v[:, 0], jnp.int32(2), k_clip_ratio=0.95,
      v_clip_ratio=0.95)
  np.testing.assert_array_equal(np.asarray(q_ref.astype(jnp.float32)),
                                np.asarray(q[:, 0].astype(jnp.float32)))
  _same_caches((k_ref, v_ref), (k_want, v_want))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_subtracts_the_key_center(dtype):
  """A key center [K, H] (`quarot_jax.key_center`) is subtracted from each
  rotated key before it is quantized, as the model's unfused path does
  (k - center.astype(k.dtype)); queries and values do not see it."""
  if jax.default_backend() == "gpu":
    pytest.skip("exact on the CPU only")
  b, n, kv_heads, s, h = 2, 8, 2, 6, 64
  qkv, cos, sin, positions, inv_freq, (kc, vc) = _case(
      b, n, kv_heads, s, h, dtype, seed=5)
  signs = jnp.asarray(hadamard.hadamard_matrix(h))
  center = 4.0 * jax.random.normal(jax.random.key(9), (kv_heads, h))
  args = (qkv, cos, sin, signs, kc, vc, jnp.int32(4))
  q, k2, v2 = qkv_lib.decode_qkv(*args, num_heads=n, k_center=center,
                                 interpret=True, implementation="pallas")
  q_ref, k_ref, v_ref = qkv_lib.decode_qkv_reference(
      *args, num_heads=n, k_center=center)
  np.testing.assert_allclose(np.asarray(q.astype(jnp.float32)),
                             np.asarray(q_ref.astype(jnp.float32)),
                             rtol=0, atol=1e-5 if dtype == jnp.float32 else 0)
  _same_caches((k2, v2), (k_ref, v_ref),
               scale_rtol=2 ** -20 if dtype == jnp.float32 else 0.0)

  # The reference is the model's order: rotate, transform, subtract, append.
  heads = qkv.reshape(b, 1, n + 2 * kv_heads, h)
  _, k, v = jnp.split(heads, [n, n + kv_heads], axis=2)
  y = jnp.einsum("...i,ij->...j",
                 layers.apply_rope(k, positions[:, None], inv_freq),
                 signs.astype(dtype), preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST)
  k = (y * jnp.float32(1.0 / np.sqrt(h))).astype(dtype)
  k = k - center.astype(dtype)
  k_want, v_want = append_lib.kv4_append_reference(
      kc, vc, k[:, 0], v[:, 0], jnp.int32(4), k_clip_ratio=0.95,
      v_clip_ratio=0.95)
  _same_caches((k_ref, v_ref), (k_want, v_want),
               scale_rtol=2 ** -20 if dtype == jnp.float32 else 0.0)
  # Not vacuous: without the center the key codes differ.
  _, k_plain, _ = qkv_lib.decode_qkv_reference(*args, num_heads=n)
  assert not np.array_equal(np.asarray(k_plain.codes), np.asarray(k2.codes))


def test_kernel_takes():
  assert qkv_lib.kernel_takes(128, 1) and qkv_lib.kernel_takes(128, 16)
  assert not qkv_lib.kernel_takes(128, 17)
  assert not qkv_lib.kernel_takes(96, 4)  # H / 2 = 48


@pytest.mark.parametrize("bad, match", [
    (dict(qkv_width=100), "qkv must be"),
    (dict(num_heads=5), "multiple of"),
    (dict(cos_shape=(2, 32)), "cos must be"),
])
def test_rejects_bad_shapes(bad, match):
  b, n, kv_heads, s, h = 2, 4, 2, 4, 64
  qkv, cos, sin, _, _, (kc, vc) = _case(b, n, kv_heads, s, h, jnp.bfloat16)
  if "qkv_width" in bad:
    qkv = qkv[:, :bad["qkv_width"]]
  if "cos_shape" in bad:
    cos = jnp.zeros(bad["cos_shape"], jnp.float32)
  num_heads = bad.get("num_heads", n)
  if num_heads != n:  # keep the width right so the heads check fires
    qkv = jnp.zeros((b, (num_heads + 2 * kv_heads) * h), jnp.bfloat16)
  with pytest.raises(ValueError, match=match):
    qkv_lib.decode_qkv(qkv, cos, sin, None, kc, vc, jnp.int32(0),
                       num_heads=num_heads, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("n, kv_heads, centered",
                         [(32, 32, False), (32, 8, False), (32, 8, True)])
def test_gpu_matches_reference(n, kv_heads, centered):
  """On the GPU: the Triton kernel against the XLA reference (the dot's
  f32 sums may be ordered differently: q within one bf16 step, codes equal
  where the rotated key rounds the same), with and without a key center."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  b, s, h = 4, 256, 128
  qkv, cos, sin, _, _, (kc, vc) = _case(b, n, kv_heads, s, h, jnp.bfloat16)
  signs = jnp.asarray(hadamard.hadamard_matrix(h))
  center = (jax.random.normal(jax.random.key(2), (kv_heads, h))
            if centered else None)
  args = (qkv, cos, sin, signs, kc, vc, jnp.int32(17))
  kw = dict(num_heads=n, k_center=center)
  q, k2, v2 = qkv_lib.decode_qkv(*args, **kw, implementation="pallas")
  q_ref, k_ref, v_ref = qkv_lib.decode_qkv_reference(*args, **kw)
  hlo = jax.jit(lambda *a: qkv_lib.decode_qkv(
      *a, **kw, implementation="pallas")).lower(*args).as_text()
  assert "decode_qkv" in hlo
  qf, qr = (np.asarray(x.astype(jnp.float32)) for x in (q, q_ref))
  np.testing.assert_allclose(qf, qr, rtol=2 ** -7, atol=0)
  mismatch = np.mean(qf != qr)
  assert mismatch < 0.01, mismatch
  # Values do not pass through a dot: their codes are exact.
  for name in ("codes", "scale", "zero"):
    np.testing.assert_array_equal(np.asarray(getattr(v2, name)),
                                  np.asarray(getattr(v_ref, name)))
  same = np.mean(np.asarray(k2.codes) == np.asarray(k_ref.codes))
  assert same > 0.99, same
