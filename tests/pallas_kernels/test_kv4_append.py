"""kv4_append (Pallas, interpret mode on CPU) against write_kv4, bit for bit."""

import functools

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
import numpy as np
import pytest

from pallas_kernels import kv4_append as append_lib
from pallas_kernels import kv4_cache as kv4_lib


@functools.lru_cache
def _case(b, kv_heads, s, h, seed=0, dtype=jnp.bfloat16):
  """Random KV4 caches (every slot filled) and new rows [B, K, H]."""
  # One draw, split on the host: [2, B, S, K, H] old keys/values,
  # [2, B, S, K, 1] per-(token, head) offsets, [2, B, K, H] new rows.
  sizes = [2 * b * s * kv_heads * h, 2 * b * s * kv_heads,
           2 * b * kv_heads * h]
  x = np.asarray(jax.random.normal(jax.random.key(seed), (sum(sizes),)))
  old, off, new = np.split(x, np.cumsum(sizes)[:2])
  old = (old.reshape(2, b, s, kv_heads, h)
         + off.reshape(2, b, s, kv_heads, 1))
  k_cache = kv4_lib.quantize_kv4(jnp.asarray(old[0]))
  v_cache = kv4_lib.quantize_kv4(jnp.asarray(old[1]))
  # New rows with varied ranges: all-positive, all-negative and mixed heads.
  shift = np.linspace(-3.0, 3.0, b * kv_heads).reshape(b, kv_heads, 1)
  new = new.reshape(2, b, kv_heads, h)
  k_new = jnp.asarray(2.0 * new[0] + shift, dtype)
  v_new = jnp.asarray(new[1] - 0.5 * shift, dtype)
  return k_cache, v_cache, k_new, v_new


def _assert_same(got, want):
  for name in ("codes", "scale", "zero"):
    for i in (0, 1):
      g, w = getattr(got[i], name), getattr(want[i], name)
      assert g.dtype == w.dtype and g.shape == w.shape, name
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w),
                                    err_msg=f"{'kv'[i]}.{name}")


def _slot(at, s):
  """The slot `lax.dynamic_update_slice` writes: negative from the end, then
  clamped to [0, S - 1]."""
  at = at + s if at < 0 else at
  return min(max(at, 0), s - 1)


# b, kv_heads, s, h, dtype, clip ratios (k, v). S is no power of two.
_CASES = [
    (2, 3, 37, 64, jnp.bfloat16, (0.95, 0.95)),
    (1, 8, 20, 128, jnp.float32, (0.95, 0.9)),
    (3, 2, 9, 128, jnp.float16, (1.0, 0.95)),
]


@pytest.mark.parametrize("b, kv_heads, s, h, dtype, clips", _CASES)
def test_kernel_is_write_kv4_bit_for_bit(b, kv_heads, s, h, dtype, clips,
                                         interpret):
  k_cache, v_cache, k_new, v_new = _case(b, kv_heads, s, h, dtype=dtype)
  run = functools.partial(append_lib.kv4_append, k_clip_ratio=clips[0],
                          v_clip_ratio=clips[1], interpret=interpret,
                          implementation="pallas")
  ref = functools.partial(append_lib.kv4_append_reference,
                          k_clip_ratio=clips[0], v_clip_ratio=clips[1])
  # First, middle and last slot; past the end (clamped to S - 1); negative
  # (from the end, as jax's dynamic_update_slice); very negative (to 0).
  for at in (0, s // 2, s - 1, s + 5, -3, -100):
    got = run(k_cache, v_cache, k_new, v_new, jnp.int32(at))
    _assert_same(got, ref(k_cache, v_cache, k_new, v_new, jnp.int32(at)))
    # Every other slot keeps the old codes, scales and zeros.
    keep = np.arange(s) != _slot(at, s)
    for new, old in zip(got, (k_cache, v_cache)):
      for name in ("codes", "scale", "zero"):
        np.testing.assert_array_equal(
            np.asarray(getattr(new, name))[:, :, keep],
            np.asarray(getattr(old, name))[:, :, keep])
      # ... and the written slot changed (the new rows differ from the old).
      assert not np.array_equal(np.asarray(new.codes)[:, :, ~keep],
                                np.asarray(old.codes)[:, :, ~keep])


def test_ties_and_degenerate_rows(interpret):
  # Rows built so that x / scale lands on (or next to) half-integers, where
  # round-half-to-even decides the code, plus an all-zero row (scale 1) and
  # rows of one sign (zero point 0 or 15).
  b, kv_heads, s, h = 1, 6, 5, 64
  k_cache, v_cache, _, _ = _case(b, kv_heads, s, h, seed=1)
  lo_val, hi_val = -1.3, 2.9
  # The quantizer's scale and zero for a row whose min/max are these.
  lo, hi = np.float32(lo_val) * np.float32(0.95), np.float32(
      hi_val) * np.float32(0.95)
  scale = (hi - lo) * np.float32(1 / 15)
  zero = np.round(-lo / scale)
  j = np.arange(h - 2) % 15
  ties = (j + np.float32(0.5) - zero) * scale  # [H - 2] near-ties
  row = np.concatenate([[lo_val, hi_val], ties]).astype(np.float32)
  rows = np.stack([row, -row, np.zeros(h), np.abs(row), -np.abs(row),
                   row * 1e-3])
  k_new = jnp.asarray(rows, jnp.float32).reshape(b, kv_heads, h)
  v_new = k_new[:, ::-1]
  got = append_lib.kv4_append(k_cache, v_cache, k_new, v_new, jnp.int32(2),
                              interpret=interpret, implementation="pallas")
  want = append_lib.kv4_append_reference(k_cache, v_cache, k_new, v_new,
                                         jnp.int32(2))
  _assert_same(got, want)
  np.testing.assert_array_equal(np.asarray(got[0].scale[0, 2, 2]), 1.0)
  np.testing.assert_array_equal(np.asarray(got[0].codes[0, 2, 2]), 0)


def test_decode_loop_appends_like_write_kv4(interpret):
  # The decode use: a jitted fori_loop appends one token per step.
  b, kv_heads, s, h, steps = 2, 2, 12, 64, 6
  k_cache, v_cache, _, _ = _case(b, kv_heads, s, h, seed=2)
  rows = jax.random.normal(jax.random.key(3), (steps, 2, b, kv_heads, h))

  def loop(append):
    def body(i, caches):
      k_c, v_c = caches
      return append(k_c, v_c, rows[i, 0], rows[i, 1], i + 3)

    return jax.jit(lambda kc, vc: jax.lax.fori_loop(0, steps, body,
                                                    (kc, vc)))

  kernel = loop(functools.partial(append_lib.kv4_append,
                                  interpret=interpret,
                                  implementation="pallas"))
  assert "pallas_call" in str(jax.make_jaxpr(kernel)(k_cache, v_cache))
  got = kernel(k_cache, v_cache)
  want = loop(append_lib.kv4_append_reference)(k_cache, v_cache)
  _assert_same(got, want)
  # Slots 3..8 were written, the others kept.
  for new, old in zip(got, (k_cache, v_cache)):
    np.testing.assert_array_equal(np.asarray(new.codes[:, :, :3]),
                                  np.asarray(old.codes[:, :, :3]))
    np.testing.assert_array_equal(np.asarray(new.scale[:, :, 9:]),
                                  np.asarray(old.scale[:, :, 9:]))
    assert not np.array_equal(np.asarray(new.zero[:, :, 3:9]),
                              np.asarray(old.zero[:, :, 3:9]))


def test_reference_hand_worked(interpret):
  # One key row, H = 4, clip 1: x = (0.125, 0.375, -0.75, 3).
  #   lo = min(x, 0) = -0.75, hi = 3, scale = 3.75 * f32(1/15) = 0.25,
  #   zero = round(0.75 / 0.25) = 3;
  #   x / scale = (0.5, 1.5, -3, 12): round half to even -> (0, 2, -3, 12),
  #   + zero -> codes (3, 5, 0, 15) -> bytes (3 | 5 << 4, 0 | 15 << 4)
  #   = (83, 240).
  # The value row is 0: scale 1, zero 0, codes 0.
  cache = kv4_lib.KV4(codes=jnp.full((1, 1, 3, 2), 7, jnp.uint8),
                      scale=jnp.full((1, 1, 3), 0.5, jnp.float32),
                      zero=jnp.full((1, 1, 3), 9, jnp.uint8))
  k_new = jnp.array([[[0.125, 0.375, -0.75, 3.0]]], jnp.float32)
  v_new = jnp.zeros((1, 1, 4), jnp.float32)
  for fn in (append_lib.kv4_append_reference,
             functools.partial(append_lib.kv4_append, interpret=interpret,
                               implementation="pallas")):
    k, v = fn(cache, cache, k_new, v_new, jnp.int32(1), k_clip_ratio=1.0,
              v_clip_ratio=1.0)
    np.testing.assert_array_equal(k.codes[0, 0], [[7, 7], [83, 240], [7, 7]])
    np.testing.assert_array_equal(k.scale[0, 0], [0.5, 0.25, 0.5])
    np.testing.assert_array_equal(k.zero[0, 0], [9, 3, 9])
    np.testing.assert_array_equal(v.codes[0, 0], [[7, 7], [0, 0], [7, 7]])
    np.testing.assert_array_equal(v.scale[0, 0], [0.5, 1.0, 0.5])
    np.testing.assert_array_equal(v.zero[0, 0], [9, 0, 9])


def _outer_primitives(jaxpr) -> set[str]:
  """Primitive names of a jaxpr and its sub-jaxprs, not inside pallas_call."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    if eqn.primitive.name == "pallas_call":
      continue
    for sub in jex_core.jaxprs_in_params(eqn.params):
      names |= _outer_primitives(sub)
  return names


def test_pallas_call_is_in_the_jaxpr():
  k_cache, v_cache, k_new, v_new = _case(1, 2, 8, 64)
  closed = jax.make_jaxpr(functools.partial(
      append_lib.kv4_append, interpret=True))(
          k_cache, v_cache, k_new, v_new, jnp.int32(0))
  assert "kv4_append" in str(closed)
  # One launch: the pallas_call, and no reduction or dynamic_update_slice
  # outside it.
  outer = _outer_primitives(closed.jaxpr)
  assert "pallas_call" in outer
  assert not outer & {"dynamic_update_slice", "reduce_max", "reduce_min"}


def test_implementation_choice_off_the_kernel():
  # 'xla', and 'pallas' outside interpret mode for a head dim the kernel
  # does not take (H / 2 = 48), run the reference: no pallas_call.
  for h, implementation in ((64, "xla"), (96, "pallas")):
    k_cache, v_cache, k_new, v_new = _case(1, 2, 8, h)
    run = functools.partial(append_lib.kv4_append,
                            implementation=implementation)
    args = (k_cache, v_cache, k_new, v_new, jnp.int32(5))
    assert "pallas_call" not in str(jax.make_jaxpr(run)(*args))
    _assert_same(run(*args), append_lib.kv4_append_reference(*args))
  assert append_lib.kernel_takes(64) and append_lib.kernel_takes(128)
  assert not append_lib.kernel_takes(96) and not append_lib.kernel_takes(65)
  if jax.default_backend() != "gpu":
    assert not append_lib.can_use_kv4_append(128)


def test_errors():
  k_cache, v_cache, k_new, v_new = _case(2, 2, 8, 64)
  at = jnp.int32(0)
  run = append_lib.kv4_append
  with pytest.raises(ValueError, match=r"k_new must be \[B, K, H\]=\[2, 2,"
                     r" 64\] for caches of codes \[B, K, S, H // 2\]="
                     r"\[2, 2, 8, 32\], got \(2, 2, 32\)"):
    run(k_cache, v_cache, k_new[..., :32], v_new, at)
  with pytest.raises(ValueError, match=r"v_new must be \[B, K, H\]"):
    run(k_cache, v_cache, k_new, v_new[:1], at)
  with pytest.raises(ValueError, match="k_cache and v_cache differ"):
    run(k_cache, jax.tree.map(lambda a: a[:, :, :4], v_cache), k_new, v_new,
        at)
  with pytest.raises(ValueError, match=r"v_cache.codes must be uint8\[B, K,"
                     r" S, H // 2\], got int8\[2, 2, 8, 32\]"):
    run(k_cache, kv4_lib.KV4(codes=v_cache.codes.astype(jnp.int8),
                             scale=v_cache.scale, zero=v_cache.zero),
        k_new, v_new, at)
  with pytest.raises(ValueError, match=r"k_cache.scale must be f32\[B, K, S\]"
                     r"=\[2, 2, 8\], got float32\[2, 2, 7\]"):
    run(kv4_lib.KV4(codes=k_cache.codes, scale=k_cache.scale[..., :7],
                    zero=k_cache.zero), v_cache, k_new, v_new, at)
  with pytest.raises(ValueError, match=r"k_cache.zero must be uint8\[B, K,"
                     r" S\]=\[2, 2, 8\], got int32\[2, 2, 8\]"):
    run(kv4_lib.KV4(codes=k_cache.codes, scale=k_cache.scale,
                    zero=k_cache.zero.astype(jnp.int32)), v_cache, k_new,
        v_new, at)
  with pytest.raises(ValueError, match=r"at must be a scalar slot, got shape"
                     r" \(2,\)"):
    run(k_cache, v_cache, k_new, v_new, jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="num_warps=3 must be a power of two"):
    append_lib.KV4AppendConfig(num_warps=3)


@pytest.mark.gpu
def test_gpu_lowers_to_the_named_kernel_and_is_bit_exact():
  # LLaMA-3-8B-like heads (K = 8, H = 128) and MHA-like H = 64, bf16 rows.
  for b, kv_heads, s, h in ((4, 8, 1000, 128), (2, 32, 300, 64)):
    k_cache, v_cache, k_new, v_new = _case(b, kv_heads, s, h, seed=7)
    fn = jax.jit(functools.partial(append_lib.kv4_append,
                                   implementation="pallas"))
    args = (k_cache, v_cache, k_new, v_new, jnp.int32(0))
    assert "kv4_append" in fn.lower(*args).as_text()
    for at in (0, s // 2, s - 1, s + 3, -1):
      args = (k_cache, v_cache, k_new, v_new, jnp.int32(at))
      _assert_same(fn(*args), append_lib.kv4_append_reference(*args))
  test_ties_and_degenerate_rows(False)
  test_decode_loop_appends_like_write_kv4(False)
  test_reference_hand_worked(False)
