"""Tests for quarot_jax/attention.py (flash attention for prefill).

cuDNN does not run on a CPU, so the CPU tests check `flash_attention`'s
mask and shape plumbing (the row shift, the per-row lengths, GQA, T != S)
through jax's 'xla' implementation of the same `dot_product_attention` call
against `model.attend` with the model's mask; the GPU test runs cuDNN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kv4_cache as kv4_lib
from quarot_jax import attention
from quarot_jax import kernels as kernels_lib
from quarot_jax import layers
from quarot_jax import model
from quarot_jax import quant
from quarot_jax.config import LlamaConfig

# One compiled call each (eager jnp would compile op by op).
_attend = jax.jit(model.attend)
_flash_xla = jax.jit(lambda q, k, v, start, end: attention.flash_attention(
    q, k, v, start=start, end=end, implementation="xla"))


def _qkv(b, t, s, n, kv_heads, h, dtype=jnp.float32, seed=0):
  """Normal q [B, T, N, H], k and v [B, S, K, H] (numpy RNG: no compiles)."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
               for shape in ((b, t, n, h), (b, s, kv_heads, h),
                             (b, s, kv_heads, h)))


def _model_mask(start, end, t, s):
  """bool[B, T, S]: the mask `model.forward` builds for a cache."""
  slots = end + np.arange(t)
  key_slots = np.arange(s)
  return jnp.asarray((key_slots[None, None, :] <= slots[None, :, None])
                     & (key_slots[None, None, :]
                        >= np.asarray(start)[:, None, None]))


def _valid(start, end, t):
  """bool[B, T, 1, 1]: queries at a slot >= start (not a pad token)."""
  slots = end + np.arange(t)
  return (slots[None, :] >= np.asarray(start)[:, None])[:, :, None, None]


@pytest.mark.parametrize("n,kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_causal_without_cache_matches_attend(n, kv_heads):
  q, k, v = _qkv(2, 12, 12, n, kv_heads, 16)
  mask = jnp.tril(jnp.ones((12, 12), bool))[None].repeat(2, 0)
  want = _attend(q, k, v, mask)
  got = jax.jit(lambda q, k, v: attention.flash_attention(
      q, k, v, implementation="xla"))(q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,kv_heads", [(4, 4), (8, 2)])
def test_left_padding_matches_attend(n, kv_heads):
  # A prompt chunk into an empty cache (end 0, keys = this chunk, T = S):
  # rows padded by 0, 3 and 7 slots.
  start, t = [0, 3, 7], 10
  q, k, v = _qkv(3, t, t, n, kv_heads, 16)
  want = _attend(q, k, v, _model_mask(start, 0, t, t))
  got = _flash_xla(q, k, v, jnp.asarray(start, jnp.int32), 0)
  valid = _valid(start, 0, t)
  np.testing.assert_allclose(np.where(valid, got, 0),
                             np.where(valid, want, 0), atol=1e-5, rtol=1e-5)
  # Pad queries see no key and get 0 (attend gives them a mean of values).
  np.testing.assert_array_equal(np.where(valid, 0, got), 0)
  assert np.abs(np.asarray(got)[1, 3:]).min() > 0


def test_chunk_after_cache_t_ne_s():
  # T = 5 queries at slots 6..10 of a 16-slot cache with left padding 0 and
  # 2 (and 8: the first two queries of row 2 are pad tokens); slots 11..15
  # hold garbage that the mask must hide.
  start, end, t, s = [0, 2, 8], 6, 5, 16
  q, k, v = _qkv(3, t, s, 8, 2, 16, seed=1)
  want = _attend(q, k, v, _model_mask(start, end, t, s))
  got = _flash_xla(q, k, v, jnp.asarray(start, jnp.int32), end)
  valid = _valid(start, end, t)
  assert not valid[2, :2].any() and valid[2, 2:].all()
  np.testing.assert_allclose(np.where(valid, got, 0),
                             np.where(valid, want, 0), atol=1e-5, rtol=1e-5)
  k_bad = k.at[:, end + t:].set(1e3)
  again = _flash_xla(q, k_bad, v, jnp.asarray(start, jnp.int32), end)
  np.testing.assert_array_equal(again, got)


def _spec(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_errors():
  def call(t, s, n, kv_heads, **kw):
    jax.eval_shape(lambda q, k: attention.flash_attention(
        q, k, k, implementation="xla", **kw),
                   _spec((1, t, n, 8)), _spec((1, s, kv_heads, 8)))
  with pytest.raises(ValueError, match="T == S"):
    call(4, 6, 4, 2)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    call(4, 4, 4, 3)
  with pytest.raises(ValueError, match="do not fit"):
    call(6, 4, 4, 2, end=0)


def test_can_use_cudnn():
  bf16 = jnp.bfloat16
  assert attention.can_use_cudnn(_spec((1, 4, 8, 128), bf16),
                                 _spec((1, 4, 2, 128), bf16))
  assert attention.can_use_cudnn(_spec((1, 4, 8, 64), jnp.float16),
                                 _spec((1, 4, 8, 64), jnp.float16))
  assert not attention.can_use_cudnn(_spec((1, 4, 8, 128)),
                                     _spec((1, 4, 2, 128)))
  assert not attention.can_use_cudnn(_spec((1, 4, 8, 12), bf16),
                                     _spec((1, 4, 2, 12), bf16))
  assert not attention.can_use_cudnn(_spec((1, 4, 8, 256), bf16),
                                     _spec((1, 4, 2, 256), bf16))


def test_kernels_attention_field():
  if jax.default_backend() == "cpu":
    assert kernels_lib.resolve("auto").attention == "xla"
  assert kernels_lib.resolve("xla").attention == "xla"
  assert kernels_lib.resolve("interpret").attention == "xla"
  assert kernels_lib.Kernels(attention="cudnn").attention == "cudnn"
  with pytest.raises(ValueError, match="attention='flash' must be"):
    kernels_lib.Kernels(attention="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("n,kv_heads", [(32, 32), (32, 8)])
def test_cudnn_matches_einsum(n, kv_heads):
  b, h = 3, 128
  # Without a cache: plain causal, T = S = 384.
  q, k, v = _qkv(b, 384, 384, n, kv_heads, h, dtype=jnp.bfloat16)
  mask = jnp.tril(jnp.ones((384, 384), bool))[None].repeat(b, 0)
  want = jax.jit(model.attend)(q, k, v, mask).astype(jnp.float32)
  got = jax.jit(attention.flash_attention)(q, k, v).astype(jnp.float32)
  np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
  # A left-padded prompt into an empty cache, then a chunk after it.
  start = jnp.asarray([0, 37, 200], jnp.int32)
  for end, t, s in ((0, 384, 384), (100, 160, 320)):
    q, k, v = _qkv(b, t, s, n, kv_heads, h, dtype=jnp.bfloat16, seed=end)
    want = jax.jit(model.attend)(q, k, v, _model_mask(start, end, t, s))
    got = jax.jit(attention.flash_attention)(q, k, v, start=start,
                                             end=jnp.int32(end))
    valid = _valid(start, end, t)
    np.testing.assert_allclose(
        np.where(valid, np.asarray(got, np.float32), 0),
        np.where(valid, np.asarray(want, np.float32), 0), atol=2e-2,
        rtol=2e-2)


# The model's routing (`model._attention_block` with kernels.attention
# 'cudnn'): on a CPU the flash path runs jax's 'xla' implementation of the
# same call, and is checked against the einsum path with `forward`'s mask.
_CONFIG = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)


@pytest.fixture
def flash_on_cpu(monkeypatch):
  real = attention.flash_attention
  monkeypatch.setattr(attention, "can_use_cudnn", lambda q, k: True)
  monkeypatch.setattr(
      attention, "flash_attention",
      lambda *a, **kw: real(*a, **{**kw, "implementation": "xla"}))


def _block(p, x, k_cache, v_cache, start, write_at, *, options,
           attention_kind):
  """`model._attention_block` as `forward` calls it at slot write_at."""
  b, t, _ = x.shape
  s = k_cache.codes.shape[2] if packed(k_cache) else k_cache.shape[1]
  slots = write_at + jnp.arange(t)
  positions = slots[None, :] - start[:, None]
  key_slots = jnp.arange(s)
  mask = ((key_slots[None, None, :] <= slots[None, :, None])
          & (key_slots[None, None, :] >= start[:, None, None]))
  inv_freq = layers.rope_inv_freq(_CONFIG.head_dim, _CONFIG.rope_theta, None)
  # pylint: disable-next=protected-access
  o, k_cache, v_cache, _ = model._attention_block(
      x, p, positions, mask, k_cache, v_cache, write_at, config=_CONFIG,
      options=options, inv_freq=inv_freq, start=start,
      kernels=kernels_lib.Kernels(attention=attention_kind))
  return o, k_cache, v_cache


def packed(cache):
  return isinstance(cache, kv4_lib.KV4)


@pytest.mark.parametrize("kv4", [False, True])
def test_model_flash_prefill_then_chunk_matches_einsum(flash_on_cpu, kv4):
  del flash_on_cpu
  b, s, h = 2, 12, _CONFIG.head_dim
  if kv4:
    options = model.RunOptions(k_spec=quant.kv_spec(4),
                               v_spec=quant.kv_spec(4))
    empty = kv4_lib.empty_kv4(b, 2, s, h)
  else:
    options = model.FLOAT
    empty = jnp.zeros((b, s, 2, h), jnp.float32)
  params = model.init_params(_CONFIG, jax.random.key(0))
  p = jax.tree.map(lambda a: a[0], params["layers"]["self_attn"])
  rng = np.random.default_rng(3)
  # A 6-token left-padded prompt into the empty cache (write_at 0: the
  # lax.cond reads this step's keys), then 6 more tokens at slot 6 (it
  # reads the cache).
  prompt, chunk = (jnp.asarray(rng.standard_normal((b, 6, 32), np.float32))
                   for _ in range(2))
  run = jax.jit(_block, static_argnames=("options", "attention_kind"))
  # Row 1 left-padded by 3 slots (the shifted flash path), then no padding
  # (plain causal cuDNN on this step's keys).
  for start in (jnp.asarray([0, 3], jnp.int32), jnp.zeros((2,), jnp.int32)):
    out = {}
    for kind in ("xla", "cudnn"):
      o, kc, vc = run(p, prompt, empty, empty, start, jnp.int32(0),
                      options=options, attention_kind=kind)
      o2, _, _ = run(p, chunk, kc, vc, start, jnp.int32(6), options=options,
                     attention_kind=kind)
      out[kind] = (o, o2, kc)
    valid = (jnp.arange(6)[None, :] >= start[:, None])[:, :, None]
    np.testing.assert_allclose(np.where(valid, out["cudnn"][0], 0),
                               np.where(valid, out["xla"][0], 0), atol=1e-5,
                               rtol=1e-5)
    np.testing.assert_allclose(out["cudnn"][1], out["xla"][1], atol=1e-5,
                               rtol=1e-5)
    # The same cache write (up to f32 rounding: two compiled programs).
    for got, want in zip(jax.tree.leaves(out["cudnn"][2]),
                         jax.tree.leaves(out["xla"][2])):
      np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
