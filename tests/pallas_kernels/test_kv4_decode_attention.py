"""kv4_decode_attention (Pallas, interpret mode) against its reference."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kv4_cache as kv4_lib
from pallas_kernels import kv4_decode_attention as attn

Config = attn.KV4DecodeAttentionConfig


@functools.lru_cache
def _case(b, s, kv_heads, g, h, seed=0, dtype=jnp.bfloat16):
  """q [B, N, H] and KV4 keys/values quantized from random [B, S, K, H]."""
  n = kv_heads * g
  # One draw, split on the host: [2, B, S, K, H] normals, [B, S, K, 1]
  # offsets, [B, N, H] queries.
  x = np.asarray(jax.random.normal(
      jax.random.key(seed), (b * (2 * s * kv_heads * h + s * kv_heads
                                  + n * h),)))
  kv, x = np.split(x, [2 * b * s * kv_heads * h])
  off, x = np.split(x, [b * s * kv_heads])
  kv = kv.reshape(2, b, s, kv_heads, h)
  off = off.reshape(b, s, kv_heads, 1)
  # Offsets per head so that zero points vary; keys scaled so that the
  # softmax is neither flat nor one-hot.
  keys = kv4_lib.quantize_kv4(jnp.asarray(2.0 * kv[0] + off))
  values = kv4_lib.quantize_kv4(jnp.asarray(kv[1] - off))
  q = jnp.asarray(x[:b * n * h].reshape(b, n, h), dtype)
  return q, keys, values


# S not a block multiple; G in {1, 4, 8}; H in {64, 128}; several splits;
# per-row ranges, one of them short (3 or 5 slots), one ending at S. G = 1
# takes the dot-free path: MHA rows with an empty range (row 3 of the
# second case), one slot, and blocks of 64 and 128 shifted back to end at S.
_CASES = [
    # b, s, kv_heads, g, h, block_s, num_splits, start, end
    (2, 100, 2, 1, 64, 16, 3, [0, 40], [100, 43]),
    (4, 200, 4, 1, 128, 64, 3, [0, 17, 150, 90], [200, 130, 155, 90]),
    (3, 300, 2, 1, 64, 128, 2, [0, 5, 280], [300, 290, 281]),
    (3, 77, 1, 4, 128, 32, 2, [5, 0, 60], [70, 77, 65]),
    (2, 50, 1, 8, 64, 16, 4, [10, 0], [15, 50]),
    (2, 40, 2, 3, 64, 16, 1, [3, 0], [40, 25]),  # G = 3 (SmolLM2), 1 split
]


@pytest.mark.parametrize("path", ["dot", "dot_free"])
def test_g1_either_path_matches_reference(path, interpret):
  # MHA through the padded tensor-core dots or the dot-free path.
  q, k, v = _case(2, 100, 2, 1, 64)
  start, end = jnp.array([0, 40], jnp.int32), jnp.array([100, 43], jnp.int32)
  cfg = Config(block_s=16, num_splits=2, path=path)
  got = attn.kv4_decode_attention(q, k, v, start, end, config=cfg,
                                  interpret=interpret,
                                  implementation="pallas")
  want = attn.kv4_decode_attention_reference(q.astype(jnp.float32), k, v,
                                             start, end)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want),
                             rtol=0, atol=1e-2 * np.abs(want).max())
  if path == "dot":
    return
  q4, k4, v4 = _case(2, 100, 2, 4, 64)
  with pytest.raises(ValueError, match="path='dot_free' takes one query"
                     " head per kv head, got G=4"):
    attn.kv4_decode_attention(q4, k4, v4, start, end, config=cfg,
                              interpret=interpret, implementation="pallas")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16,
                                   jnp.int32])
def test_nibbles_of_every_byte(dtype):
  # Each byte's low and high nibble, exactly, in every dtype.
  byte = np.arange(256, dtype=np.uint8).reshape(16, 16)
  lo, hi = jax.jit(attn._nibbles, static_argnums=1)(jnp.asarray(byte), dtype)
  assert lo.dtype == dtype and hi.dtype == dtype
  np.testing.assert_array_equal(np.asarray(lo, np.float32), byte & 15)
  np.testing.assert_array_equal(np.asarray(hi, np.float32), byte >> 4)


def test_bits_nibbles_of_every_byte():
  # The jnp form of the 'bits' nibbles (what the GPU asm computes): 128 + c.
  byte = np.arange(256, dtype=np.uint8).reshape(16, 16)
  lo, hi = jax.jit(attn._nibbles_bits, static_argnums=1)(jnp.asarray(byte),
                                                          False)
  assert lo.dtype == jnp.bfloat16 and hi.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(lo, np.float32), 128 + (byte & 15))
  np.testing.assert_array_equal(np.asarray(hi, np.float32), 128 + (byte >> 4))


def _bits_against_convert(b, s, kv_heads, g, h, cfg, start, end, interpret):
  """Runs the dot path with both nibble forms: they differ only by the f32
  rounding of the 128 offset in the sums (<< 1e-4 of the output), which on
  the GPU can move the bf16 output by one rounding step (2^-7 relative; H200:
  1 of 2048 values), and both match the reference."""
  q, k, v = _case(b, s, kv_heads, g, h)
  start, end = jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32)
  run = lambda c: np.asarray(attn.kv4_decode_attention(
      q, k, v, start, end, config=c, interpret=interpret,
      implementation="pallas"), np.float32)
  bits = run(dataclasses.replace(cfg, nibbles="bits"))
  conv = run(dataclasses.replace(cfg, nibbles="convert"))
  want = np.asarray(attn.kv4_decode_attention_reference(
      q.astype(jnp.float32), k, v, start, end))
  scale = np.abs(want).max()
  assert not np.any(np.isnan(bits))
  # Interpreted, the dots are exact f32 and the outputs agree to 1e-4.
  np.testing.assert_allclose(bits, conv, rtol=0 if interpret else 2.0**-7,
                             atol=1e-4 * scale)
  np.testing.assert_allclose(bits, want, rtol=0, atol=1e-2 * scale)
  if g == 1:  # the softmax on the one real row: the same numbers
    for nib, base in (("convert", conv), ("bits", bits)):
      one = run(dataclasses.replace(cfg, nibbles=nib, softmax_rows="one"))
      np.testing.assert_allclose(one, base, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("g", [1, 4])
def test_bits_nibbles_match_convert(g, interpret):
  _bits_against_convert(2, 100, 2, g, 64, Config(block_s=16, num_splits=2,
                                                 path="dot"),
                        [0, 40], [100, 43], interpret)


@pytest.mark.parametrize("b, s, kv_heads, g, h, block_s, splits, start, end",
                         _CASES)
def test_kernel_matches_reference(b, s, kv_heads, g, h, block_s, splits,
                                  start, end, interpret):
  q, k, v = _case(b, s, kv_heads, g, h)
  start, end = jnp.array(start, jnp.int32), jnp.array(end, jnp.int32)
  cfg = Config(block_s=block_s, num_splits=splits)
  got = attn.kv4_decode_attention(q, k, v, start, end, config=cfg,
                                  interpret=interpret)
  assert got.shape == q.shape and got.dtype == jnp.bfloat16
  # The reference on the same bf16 q (exact in f32), kept in f32.
  want = np.asarray(attn.kv4_decode_attention_reference(
      q.astype(jnp.float32), k, v, start, end))
  got = np.asarray(got, np.float32)
  # The kernel rounds the output to bf16 (<= 2^-9 relative) and the
  # probabilities times v's scale to bf16 for the PV dot (<= 2^-9 of each
  # term of Σ_t p_t |v_t| <= max |v|); max |v| is ~2x max |out| here, so
  # 2^-9 * 3 < 6e-3 of the output scale bounds both; 1e-2 leaves margin.
  # A wrong mask or nibble order is off by O(1) of the scale.
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * scale)


@pytest.mark.parametrize("b, s, kv_heads, g, h, block_s, splits, start, end",
                         _CASES)
def test_f32_kernel_is_the_reference(b, s, kv_heads, g, h, block_s, splits,
                                     start, end, interpret):
  q, k, v = _case(b, s, kv_heads, g, h)
  q = q.astype(jnp.float32)
  start, end = jnp.array(start, jnp.int32), jnp.array(end, jnp.int32)
  got = attn.kv4_decode_attention(q, k, v, start, end, interpret=interpret,
                                  config=Config(block_s=block_s,
                                                num_splits=splits))
  assert got.dtype == jnp.float32
  want = attn.kv4_decode_attention_reference(q, k, v, start, end)
  # With f32 q (and so f32 p') nothing is rounded to bf16: only the f32
  # summation order differs (~1e-7 relative; the bound leaves 10x).
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                             atol=2e-6 * float(jnp.abs(want).max()))


# The merge (grid (B, K, G)) over NS = 3 or 5 splits, padded to NSp = 4 or
# 8; G = 1 through both paths (partials of Gp = 1 and 16 rows) and G = 4:
# rows with different starts, a row shorter than one block (its later
# splits empty) and a row with every split empty (start == end).
_MERGE_CASES = [
    # b, s, kv_heads, g, path, splits, start, end
    (2, 150, 2, 1, "dot_free", 5, [0, 37], [150, 120]),
    (2, 150, 2, 1, "dot", 3, [9, 60], [140, 150]),
    (2, 150, 2, 4, "auto", 5, [0, 37], [150, 120]),
    (3, 90, 2, 4, "auto", 3, [3, 40, 70], [90, 44, 70]),
    (3, 90, 1, 1, "auto", 5, [0, 88, 50], [90, 90, 50]),
]


@pytest.mark.parametrize("b, s, kv_heads, g, path, splits, start, end",
                         _MERGE_CASES)
def test_merge_of_splits_not_a_power_of_two(b, s, kv_heads, g, path, splits,
                                            start, end, interpret):
  q, k, v = _case(b, s, kv_heads, g, 64, seed=s + g, dtype=jnp.float32)
  start, end = jnp.array(start, jnp.int32), jnp.array(end, jnp.int32)
  got = np.asarray(attn.kv4_decode_attention(
      q, k, v, start, end, interpret=interpret, implementation="pallas",
      config=Config(block_s=16, num_splits=splits, path=path)))
  want = np.asarray(attn.kv4_decode_attention_reference(q, k, v, start,
                                                        end))
  assert not np.any(np.isnan(got))
  np.testing.assert_array_equal(got[np.asarray(start >= end)], 0.0)
  # f32 q: only the summation order differs, as in
  # test_f32_kernel_is_the_reference.
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=2e-6 * float(np.abs(want).max()))


def test_empty_and_scalar_end_and_tiny_cache(interpret):
  # S = 12 < 16 (the cache is padded to one block of 16); row 1 is empty
  # (start == end) and gives 0, not NaN; more splits than blocks.
  q, k, v = _case(2, 12, 2, 4, 64, seed=1, dtype=jnp.float32)
  start = jnp.array([3, 12], jnp.int32)
  cfg = Config(block_s=32, num_splits=3)
  got = attn.kv4_decode_attention(q, k, v, start, jnp.int32(12), config=cfg,
                                  interpret=interpret)
  want = attn.kv4_decode_attention_reference(q, k, v, start,
                                             jnp.array([12, 12]))
  assert not np.any(np.isnan(np.asarray(got)))
  np.testing.assert_array_equal(np.asarray(got[1]), 0.0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                             atol=2e-6 * float(jnp.abs(want).max()))


def test_g1_default_config_and_empty_rows(interpret):
  # MHA (G = 1) with the default config (block_s 256, lowered to 128 < S =
  # 150, so blocks are shifted back to end at S; one split); rows 1
  # (start == end) and 3 (start > end) are empty and give exactly 0.
  q, k, v = _case(4, 150, 2, 1, 64, seed=5, dtype=jnp.float32)
  start = jnp.array([0, 150, 31, 60], jnp.int32)
  end = jnp.array([150, 150, 149, 20], jnp.int32)
  got = attn.kv4_decode_attention(q, k, v, start, end, interpret=interpret)
  want = attn.kv4_decode_attention_reference(q, k, v, start, end)
  assert not np.any(np.isnan(np.asarray(got)))
  np.testing.assert_array_equal(np.asarray(got[1]), 0.0)
  np.testing.assert_array_equal(np.asarray(got[3]), 0.0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                             atol=2e-6 * float(jnp.abs(want).max()))


def test_slots_outside_the_range_do_not_matter(interpret):
  q, k, v = _case(1, 40, 1, 4, 64, seed=2, dtype=jnp.float32)
  start, end = jnp.array([7], jnp.int32), jnp.array([29], jnp.int32)
  cfg = Config(block_s=16, num_splits=2)
  run = lambda kk, vv: attn.kv4_decode_attention(
      q, kk, vv, start, end, config=cfg, interpret=interpret)
  garbage = lambda c: jax.tree.map(
      lambda a: a.at[:, :, :7].set(9).at[:, :, 29:].set(9), c)
  np.testing.assert_array_equal(np.asarray(run(k, v)),
                                np.asarray(run(garbage(k), garbage(v))))


def _hand_kv4(codes, scale, zero):
  """A KV4 of B = 1, K = 1, S = 2, H = 2 from per-token [lo, hi] codes."""
  byte = [lo | hi << 4 for lo, hi in codes]
  return kv4_lib.KV4(
      codes=jnp.array(byte, jnp.uint8).reshape(1, 1, 2, 1),
      scale=jnp.array(scale, jnp.float32).reshape(1, 1, 2),
      zero=jnp.array(zero, jnp.uint8).reshape(1, 1, 2))


def test_reference_hand_worked():
  # S = 2, H = 2, N = 2 query heads on K = 1 kv head (G = 2).
  # keys: codes (3, 1) and (1, 5), scale 0.5, zero 1
  #   -> k0 = ((3-1)*.5, (1-1)*.5) = (1, 0), k1 = (0, 2).
  # values: codes (4, 0), scale 0.25, zero 2 -> v0 = (0.5, -0.5);
  #         codes (6, 2), scale 1, zero 2    -> v1 = (4, 0).
  k = _hand_kv4([(3, 1), (1, 5)], [0.5, 0.5], [1, 1])
  v = _hand_kv4([(4, 0), (6, 2)], [0.25, 1.0], [2, 2])
  # Head 0: q = (2, 1): q·k0 = 2, q·k1 = 2 -> equal weights 1/2:
  #   out = (0.5 + 4, -0.5 + 0) / 2 = (2.25, -0.25).
  # Head 1: q = (0, √2 ln 3): scores q·k/√2 = (0, 2 ln 3) -> weights
  #   (1, 9) / 10: out = 0.1 * (0.5, -0.5) + 0.9 * (4, 0) = (3.65, -0.05).
  q = jnp.array([[[2.0, 1.0], [0.0, math.sqrt(2) * math.log(3)]]])
  out = attn.kv4_decode_attention_reference(q, k, v, jnp.array([0]),
                                            jnp.array([2]))
  np.testing.assert_allclose(out, [[[2.25, -0.25], [3.65, -0.05]]],
                             rtol=1e-6, atol=1e-6)
  # start = 1: only slot 1 is seen, so both heads give v1 = (4, 0).
  out = attn.kv4_decode_attention_reference(q, k, v, jnp.array([1]),
                                            jnp.int32(2))
  np.testing.assert_array_equal(out, [[[4.0, 0.0], [4.0, 0.0]]])
  # end = 1: only slot 0 -> v0; start == end -> 0.
  out = attn.kv4_decode_attention_reference(q, k, v, jnp.array([0]), 1)
  np.testing.assert_array_equal(out, [[[0.5, -0.5], [0.5, -0.5]]])
  out = attn.kv4_decode_attention_reference(q, k, v, jnp.array([1]), 1)
  np.testing.assert_array_equal(out, np.zeros((1, 2, 2)))


def _attention_f64(q, k, v, start, end):
  """Decode attention written out in numpy f64, independent of the kernel
  module: unpack the nibbles, (code - zero) * scale, softmax over
  start <= s < end (0 for an empty range), query head n reads kv head
  n // G."""
  q = np.asarray(q, np.float64)
  b, n, h = q.shape

  def dequantize(c):  # codes [B, K, S, H // 2] -> [B, K, S, H]
    codes = np.asarray(c.codes).astype(np.int64)
    values = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(
        codes.shape[:3] + (h,))
    zero = np.asarray(c.zero, np.float64)[..., None]
    return (values - zero) * np.asarray(c.scale, np.float64)[..., None]

  keys, values = dequantize(k), dequantize(v)
  g = n // keys.shape[1]
  end = np.broadcast_to(np.asarray(end), (b,))
  out = np.zeros((b, n, h))
  for i in range(b):
    lo, hi = int(start[i]), int(end[i])
    if lo >= hi:
      continue
    for j in range(n):
      kk, vv = keys[i, j // g, lo:hi], values[i, j // g, lo:hi]
      s = kk @ q[i, j] / np.sqrt(h)
      p = np.exp(s - s.max())
      out[i, j] = p @ vv / p.sum()
  return out


@pytest.mark.parametrize("g", [1, 4])
def test_reference_is_attention_over_the_dequantized_cache(g):
  q, k, v = _case(3, 40, 2, g, 64, seed=3, dtype=jnp.float32)
  start = jnp.array([0, 4, 30], jnp.int32)
  end = jnp.array([40, 17, 30], jnp.int32)  # row 2 is empty
  got = np.asarray(attn.kv4_decode_attention_reference(q, k, v, start, end))
  want = _attention_f64(q, k, v, start, end)
  np.testing.assert_array_equal(got[2], 0.0)
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("g, splits", [(3, 1), (3, 3), (1, 1), (1, 2)])
def test_kernel_is_attention_over_the_dequantized_cache(g, splits,
                                                        interpret):
  # The kernel against the f64 numpy attention: G = 3 (16 rows computed, 3
  # written back) and MHA, one split (normalized in the kernel) and several
  # (the merge kernel); a shared scalar end past S and a negative start,
  # both clamped in the kernel, and an empty row (start > end).
  q, k, v = _case(3, 40, 2, g, 64, seed=6, dtype=jnp.float32)
  start = jnp.array([-5, 9, 41], jnp.int32)
  got = np.asarray(attn.kv4_decode_attention(
      q, k, v, start, jnp.int32(50), interpret=interpret,
      config=Config(block_s=16, num_splits=splits)))
  want = _attention_f64(q, k, v, np.array([0, 9, 40]), 40)
  np.testing.assert_array_equal(got[2], 0.0)
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=1e-5 * np.abs(want).max())


def _primitives_outside_pallas(fn, *args):
  """Names of the primitives of fn's jaxpr, looking into jit calls but not
  into pallas_call (their kernels), with multiplicity."""
  names = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      inner = eqn.params.get("jaxpr")
      if name != "pallas_call" and inner is not None:
        walk(getattr(inner, "jaxpr", inner))
      else:
        names.append(name)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return sorted(names)


@pytest.mark.parametrize("g", [1, 4])
def test_one_split_is_one_launch(g):
  # Decode is launch-bound: with one split nothing but the pallas_call and
  # free reshapes (q [B, N, H] -> [B, K, G, H], the output back, a scalar
  # end -> [1]) may run around the kernel: no slicing of q into even / odd
  # columns, no Σ q, no clamping of start / end, no merge, no interleave.
  # With more splits, one merge kernel follows.
  q, k, v = _case(2, 48, 2, g, 64)
  start = jnp.array([0, 5], jnp.int32)
  for end in (jnp.array([48, 30], jnp.int32), jnp.int32(48)):
    for splits, calls in ((1, ["pallas_call"]),
                          (3, ["pallas_call", "pallas_call"])):
      run = lambda *a, splits=splits: attn.kv4_decode_attention(
          *a, config=Config(block_s=16, num_splits=splits), interpret=True)
      names = _primitives_outside_pallas(run, q, k, v, start, end)
      assert [x for x in names if x != "reshape"] == calls, names


def test_implementation_choice_off_the_kernel():
  # 'xla', and 'pallas' outside interpret mode for a head dim the kernel
  # does not take (H / 2 = 48 is no power of two), run the jnp reference:
  # no pallas_call, and the attention it stands for.
  for h, implementation in ((64, "xla"), (96, "pallas")):
    q, k, v = _case(2, 20, 2, 2, h, seed=3, dtype=jnp.float32)
    start, end = jnp.array([0, 4], jnp.int32), jnp.int32(20)
    run = lambda *a, impl=implementation: attn.kv4_decode_attention(
        *a, implementation=impl)
    assert "pallas_call" not in str(jax.make_jaxpr(run)(q, k, v, start, end))
    want = _attention_f64(q, k, v, start, end)
    np.testing.assert_allclose(np.asarray(run(q, k, v, start, end)), want,
                               rtol=0, atol=1e-5 * np.abs(want).max())
  assert attn.kernel_takes(64) and not attn.kernel_takes(96)


def test_bf16_baseline_is_attention_over_the_float_cache():
  q, k, v = _case(2, 20, 2, 4, 64, seed=4, dtype=jnp.float32)
  start, end = jnp.array([0, 4], jnp.int32), jnp.array([20, 11], jnp.int32)
  # [B, K, S, H] -> [B, S, K, H], the model's layout.
  kf = jnp.swapaxes(kv4_lib.dequantize_kv4(k), 1, 2)
  vf = jnp.swapaxes(kv4_lib.dequantize_kv4(v), 1, 2)
  got = attn.bf16_decode_attention(q, kf, vf, start, end)
  want = attn.kv4_decode_attention_reference(q, k, v, start, end)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                             atol=1e-5 * float(jnp.abs(want).max()))


def test_pallas_call_is_in_the_jaxpr():
  q, k, v = _case(1, 32, 1, 4, 64)
  jaxpr = jax.make_jaxpr(lambda *a: attn.kv4_decode_attention(
      *a, config=Config(block_s=16, num_splits=2), interpret=True))(
          q, k, v, jnp.array([0]), jnp.array([32]))
  assert "pallas_call" in str(jaxpr)
  assert "kv4_decode_attention" in str(jaxpr)


def _kernel_jaxpr(g):
  """The jaxpr of the wrapper (pallas_call and kernel) for G = g."""
  q, k, v = _case(1, 32, 2, g, 64)
  return str(jax.make_jaxpr(lambda *a: attn.kv4_decode_attention(
      *a, config=Config(block_s=16, num_splits=2), interpret=True))(
          q, k, v, jnp.array([0]), jnp.array([32])))


def test_g1_takes_the_dot_free_path():
  assert attn.uses_dot_free_path(32, 32)
  assert not attn.uses_dot_free_path(32, 8)
  assert not attn.uses_dot_free_path(2, 1)
  # The kernel's jaxpr is printed inside the pallas_call: no dot for G = 1,
  # whose partial outputs o [B, K, splits, Gp, H / 2] have Gp = 1 row, not
  # 16; the dot path for G = 2 has dots.
  g1, g2 = _kernel_jaxpr(1), _kernel_jaxpr(2)
  assert "pallas_call" in g1 and "dot_general" not in g1
  assert "f32[1,2,2,1,32]" in g1 and "f32[1,2,2,16,32]" not in g1
  assert "pallas_call" in g2 and "dot_general" in g2
  assert "f32[1,2,2,16,32]" in g2


def test_merge_grid_is_one_program_a_query_row():
  # G = 2, 3 splits: the attention grid (B, K, NS) = (1, 2, 3) writes
  # partials whose split axis is NSp = 4 long; the merge grid is
  # (B, K, G) = (1, 2, 2), one program a real query row.
  q, k, v = _case(1, 32, 2, 2, 64)
  jaxpr = str(jax.make_jaxpr(lambda *a: attn.kv4_decode_attention(
      *a, config=Config(block_s=16, num_splits=3), interpret=True))(
          q, k, v, jnp.array([0]), jnp.array([32])))
  assert "grid=(1, 2, 3)" in jaxpr and "grid=(1, 2, 2)" in jaxpr
  assert "f32[1,2,4,16,32]" in jaxpr
  assert "kv4_decode_attention_merge" in jaxpr


def test_default_config_and_can_use():
  cfg = attn.default_kv4_decode_attention_config(8, 8, 32768, 128)
  assert cfg.num_splits == 5 and cfg.block_s == 64  # 264 / 64 -> 5
  # The dot-free path (N = K) takes larger blocks, the dot path 64.
  assert attn.default_kv4_decode_attention_config(
      8, 32, 32768, 128, query_heads=32).block_s == 256
  assert attn.default_kv4_decode_attention_config(
      8, 8, 32768, 128, query_heads=32).block_s == 64
  cfg = attn.default_kv4_decode_attention_config(
      8, 8, 32768, 128, query_heads=32, dtype=jnp.bfloat16)
  assert (cfg.block_s, cfg.path, cfg.nibbles) == (128, "auto", "bits")
  cfg = attn.default_kv4_decode_attention_config(16, 32, 8192, 128)
  assert cfg.num_splits == 1
  # Splits keep >= 128 slots each: 600 slots -> 4, not the 264 wanted.
  assert attn.default_kv4_decode_attention_config(1, 1, 600, 64
                                                  ).num_splits == 4
  # LLaMA-2-7B at B = 1, 1088 slots: 8 splits of 136 slots; f32 q keeps
  # the dot-free path, which drops to 128-slot blocks.
  cfg = attn.default_kv4_decode_attention_config(1, 32, 1088, 128,
                                                 query_heads=32)
  assert (cfg.num_splits, cfg.block_s, cfg.path) == (8, 128, "auto")
  # bf16 q takes the 'bits' dot path at every batch (measured best on an
  # H200): short splits with 2 stages, one long split with 3.
  cfg = attn.default_kv4_decode_attention_config(
      1, 32, 1088, 128, query_heads=32, dtype=jnp.bfloat16)
  assert (cfg.num_splits, cfg.block_s, cfg.path, cfg.nibbles,
          cfg.softmax_rows, cfg.num_stages) == (8, 128, "dot", "bits", "one",
                                                2)
  cfg = attn.default_kv4_decode_attention_config(
      16, 32, 4160, 128, query_heads=32, dtype=jnp.bfloat16)
  assert (cfg.num_splits, cfg.block_s, cfg.path, cfg.nibbles,
          cfg.softmax_rows, cfg.num_stages) == (1, 128, "dot", "bits", "one",
                                                3)
  assert attn.default_kv4_decode_attention_config(
      16, 32, 4160, 128, query_heads=32, dtype=jnp.float32).path == "auto"
  if jax.default_backend() != "gpu":
    assert not attn.can_use_kv4_decode_attention(128)
  assert not attn.can_use_kv4_decode_attention(96)  # H / 2 = 48


def test_errors():
  q, k, v = _case(2, 16, 2, 2, 64)
  s, e = jnp.array([0, 0]), jnp.array([16, 16])
  run = attn.kv4_decode_attention
  with pytest.raises(ValueError, match="query heads n=3 must be a multiple"
                     " of kv heads kv_heads=2"):
    run(q[:, :3], k, v, s, e)
  with pytest.raises(ValueError, match="head dim h=63 must be even"):
    run(q[..., :63], k, v, s, e)
  with pytest.raises(ValueError, match="q must be \\[B, N, H\\]"):
    run(q[0], k, v, s, e)
  with pytest.raises(ValueError, match="k.codes must be \\[B, K, S, H // 2\\]"
                     " with B=2, H=32"):
    run(q[..., :32], k, v, s, e)
  with pytest.raises(ValueError, match="v.codes must be uint8"):
    run(q, k, kv4_lib.KV4(codes=v.codes.astype(jnp.int8), scale=v.scale,
                          zero=v.zero), s, e)
  with pytest.raises(ValueError, match="k.scale/zero must be \\[B, K, S\\]"):
    run(q, kv4_lib.KV4(codes=k.codes, scale=k.scale[:, :, :3], zero=k.zero),
        v, s, e)
  short = jax.tree.map(lambda a: a[:, :, :8], v)
  with pytest.raises(ValueError, match="k and v differ"):
    run(q, k, short, s, e)
  with pytest.raises(ValueError, match="start must be \\[B\\]=\\[2\\]"):
    run(q, k, v, s[:1], e)
  with pytest.raises(ValueError, match="end must be \\[\\] or \\[B\\]=\\[2\\]"):
    run(q, k, v, s, e[:1])
  with pytest.raises(ValueError, match="block_s=48 must be a power of two"):
    Config(block_s=48)
  with pytest.raises(ValueError, match="block_s=8 must be a power of two"):
    Config(block_s=8)
  with pytest.raises(ValueError, match="num_splits=0 must be >= 1"):
    Config(num_splits=0)
  with pytest.raises(ValueError, match="num_warps=3 must be a power of two"):
    Config(num_warps=3)
  with pytest.raises(ValueError, match="num_stages=0 must be >= 1"):
    Config(num_stages=0)
  with pytest.raises(ValueError, match="path='mma' must be"):
    Config(path="mma")


@pytest.mark.gpu
def test_gpu_lowers_to_the_named_kernel_and_matches():
  q, k, v = _case(4, 4096 + 200, 8, 4, 128)
  start = jnp.array([0, 100, 4000, 4296], jnp.int32)
  end = jnp.array([4296, 3000, 4010, 4296], jnp.int32)
  fn = jax.jit(lambda *a: attn.kv4_decode_attention(
      *a, implementation="pallas"))
  assert "kv4_decode_attention" in fn.lower(q, k, v, start, end).as_text()
  got = np.asarray(fn(q, k, v, start, end), np.float32)
  want = np.asarray(attn.kv4_decode_attention_reference(
      q.astype(jnp.float32), k, v, start, end))
  assert not np.any(np.isnan(got))
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=1e-2 * np.abs(want).max())
  for cfg in (Config(block_s=128, num_splits=8, num_warps=4, num_stages=3),
              Config(block_s=32, num_splits=1, num_warps=2, num_stages=2)):
    got = attn.kv4_decode_attention(q, k, v, start, end, config=cfg,
                                    implementation="pallas")
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0,
                               atol=1e-2 * np.abs(want).max())


@pytest.mark.gpu
def test_gpu_g1_dot_free_path_matches():
  # MHA (LLaMA-2-7B heads, fewer of them): rows with a full, a partial, a
  # short and an empty range; the default config and large/small blocks.
  q, k, v = _case(4, 4096 + 200, 8, 1, 128)
  start = jnp.array([0, 100, 4000, 4296], jnp.int32)
  end = jnp.array([4296, 3000, 4010, 4296], jnp.int32)
  want = np.asarray(attn.kv4_decode_attention_reference(
      q.astype(jnp.float32), k, v, start, end))
  fn = jax.jit(lambda *a: attn.kv4_decode_attention(
      *a, implementation="pallas"))
  hlo = fn.lower(q, k, v, start, end).as_text()
  assert "kv4_decode_attention" in hlo
  for cfg in (None,
              Config(block_s=256, num_splits=4, num_warps=8, num_stages=2),
              Config(block_s=128, num_splits=8, num_warps=4, num_stages=3),
              Config(block_s=16, num_splits=1, num_warps=2, num_stages=2),
              Config(block_s=64, num_splits=4, path="dot")):
    got = np.asarray(attn.kv4_decode_attention(
        q, k, v, start, end, config=cfg, implementation="pallas"),
                     np.float32)
    assert not np.any(np.isnan(got))
    np.testing.assert_array_equal(got[3], 0.0)
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=1e-2 * np.abs(want).max())


@pytest.mark.gpu
@pytest.mark.parametrize("g", [1, 4])
def test_gpu_bits_nibbles_match_convert(g):
  # The inline-asm nibbles (four bytes an instance) on the GPU: a wrong
  # byte or nibble order would move outputs by far more than 1e-4.
  _bits_against_convert(4, 1100, 4, g, 128,
                        Config(block_s=64, num_splits=4, path="dot"),
                        [0, 100, 1000, 1100], [1100, 900, 1010, 1100],
                        False)
