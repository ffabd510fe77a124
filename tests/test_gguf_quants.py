"""The k-quant block formats that `gguf.dequantize` reads (Q4_K, Q6_K).

Two independent checks of the loader's dequantization: blocks packed by
hand from known integer fields must give d·scale·q - dmin·min exactly, and
random blocks must match a line-by-line transcription of ggml's
`dequantize_row_q4_K` / `dequantize_row_q6_K` (ggml-quants.c).
"""

import gguf as gguf_lib
import numpy as np
import pytest

from quarot_jax import gguf

Q4_K = gguf_lib.GGMLQuantizationType.Q4_K
Q6_K = gguf_lib.GGMLQuantizationType.Q6_K


def _f16_bytes(x: float) -> bytes:
  return np.float16(x).tobytes()


def _f16(b: bytes) -> np.float32:
  return np.frombuffer(b, np.float16)[0].astype(np.float32)


# ----- ggml-quants.c, transcribed one statement at a time (float32).


def _get_scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
  if j < 4:
    return q[j] & 63, q[j + 4] & 63
  return ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
          (q[j + 4] >> 4) | ((q[j] >> 6) << 4))


def _q4_k_row(block: bytes) -> np.ndarray:
  d, dmin = _f16(block[0:2]), _f16(block[2:4])
  scales, q = block[4:16], block[16:144]
  y = []
  for j in range(4):  # for (j = 0; j < QK_K; j += 64), is = 2j
    sc, m = _get_scale_min_k4(2 * j, scales)
    d1, m1 = d * np.float32(sc), dmin * np.float32(m)
    sc, m = _get_scale_min_k4(2 * j + 1, scales)
    d2, m2 = d * np.float32(sc), dmin * np.float32(m)
    y += [d1 * np.float32(b & 0xF) - m1 for b in q[32 * j:32 * j + 32]]
    y += [d2 * np.float32(b >> 4) - m2 for b in q[32 * j:32 * j + 32]]
  return np.asarray(y, np.float32)


def _q6_k_row(block: bytes) -> np.ndarray:
  ql, qh = block[0:128], block[128:192]
  sc = np.frombuffer(block[192:208], np.int8)
  d = _f16(block[208:210])
  y = np.zeros(256, np.float32)
  for n in range(2):  # for (n = 0; n < QK_K; n += 128)
    l0, h0, s0, y0 = 64 * n, 32 * n, 8 * n, 128 * n
    for l in range(32):
      s = s0 + l // 16
      q1 = ((ql[l0 + l] & 0xF) | (((qh[h0 + l] >> 0) & 3) << 4)) - 32
      q2 = ((ql[l0 + l + 32] & 0xF) | (((qh[h0 + l] >> 2) & 3) << 4)) - 32
      q3 = ((ql[l0 + l] >> 4) | (((qh[h0 + l] >> 4) & 3) << 4)) - 32
      q4 = ((ql[l0 + l + 32] >> 4) | (((qh[h0 + l] >> 6) & 3) << 4)) - 32
      y[y0 + l] = d * np.float32(sc[s]) * np.float32(q1)
      y[y0 + l + 32] = d * np.float32(sc[s + 2]) * np.float32(q2)
      y[y0 + l + 64] = d * np.float32(sc[s + 4]) * np.float32(q3)
      y[y0 + l + 96] = d * np.float32(sc[s + 6]) * np.float32(q4)
  return y


def _random_blocks(rng, n: int, size: int, f16_at: tuple[int, ...]):
  blocks = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
  for at in f16_at:  # finite super-block scales of either sign
    d = rng.uniform(1e-3, 1e-1, size=n) * rng.choice([-1, 1], size=n)
    blocks[:, at:at + 2] = np.frombuffer(
        d.astype(np.float16).tobytes(), np.uint8).reshape(n, 2)
  return blocks


@pytest.mark.parametrize("qtype,size,f16_at,row_fn", [
    (Q4_K, 144, (0, 2), _q4_k_row), (Q6_K, 210, (208,), _q6_k_row)])
def test_random_blocks_match_ggml(qtype, size, f16_at, row_fn):
  # 3 rows of 2 super-blocks: the GGUF shape is [cols, rows] = [512, 3].
  rng = np.random.default_rng(0)
  data = _random_blocks(rng, 6, size, f16_at).reshape(3, 2 * size)
  got = gguf.dequantize(data, qtype, [512, 3])
  assert got.shape == (3, 512) and got.dtype == np.float32
  want = np.stack([np.concatenate([row_fn(bytes(r[:size])),
                                   row_fn(bytes(r[size:]))]) for r in data])
  # Same float32 operations up to association: within one rounding.
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert np.abs(want).max() > 1  # the check is not trivially on zeros


def _pack_q4_k(d, dmin, sc, m, q) -> bytes:
  """One Q4_K block from 6-bit sc[8], m[8] and 4-bit q[256]."""
  s = [0] * 12
  for j in range(4):  # low 6 bits of scales/mins 0-3 in bytes 0-7
    s[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
    s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6)
    s[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4)
  qs = [0] * 128
  for i in range(256):
    sub, k = divmod(i, 32)  # sub-block 2j: low nibbles of bytes 32j + k
    qs[32 * (sub // 2) + k] |= q[i] << (4 * (sub % 2))
  return _f16_bytes(d) + _f16_bytes(dmin) + bytes(s) + bytes(qs)


def test_hand_made_q4_k_block():
  # Scales/mins use all six bits, q is random; d = 0.5 and
  # dmin = 0.25 are exact in f16, so x = 0.5·sc·q - 0.25·m is exact.
  sc = [1, 63, 17, 32, 48, 5, 60, 33]
  m = [0, 2, 63, 31, 16, 47, 1, 62]
  q = np.random.default_rng(1).integers(0, 16, 256).tolist()
  block = np.frombuffer(_pack_q4_k(0.5, 0.25, sc, m, q), np.uint8)
  got = gguf.dequantize(block[None], Q4_K, [256, 1])[0]
  want = [0.5 * sc[i // 32] * q[i] - 0.25 * m[i // 32] for i in range(256)]
  np.testing.assert_array_equal(got, np.asarray(want, np.float32))


def test_hand_made_q6_k_block():
  # q in [0, 64) split into 4 low bits (ql) and 2 high bits (qh); value
  # i of each 128-half comes from ql[l (+32)] nibble i // 64 and qh[l]
  # bits 2·(i // 32), l = i % 32.
  q = np.random.default_rng(2).integers(0, 64, 256).tolist()
  sc = [-128, 127, -1, 1, 64, -64, 3, -3, 100, -100, 2, 50, -50, 7, -7, 9]
  ql, qh = [0] * 128, [0] * 64
  for i in range(256):
    half, r = divmod(i, 128)
    quarter, l = divmod(r, 32)  # quarter 0..3: q1..q4 in ggml
    lo_byte = 64 * half + l + 32 * (quarter % 2)
    ql[lo_byte] |= (q[i] & 0xF) << (4 * (quarter // 2))
    qh[32 * half + l] |= (q[i] >> 4) << (2 * quarter)
  block = bytes(ql) + bytes(qh) + np.asarray(sc, np.int8).tobytes() + (
      _f16_bytes(0.125))
  got = gguf.dequantize(np.frombuffer(block, np.uint8)[None], Q6_K,
                        [256, 1])[0]
  want = [0.125 * sc[i // 16] * (q[i] - 32) for i in range(256)]
  np.testing.assert_array_equal(got, np.asarray(want, np.float32))


@pytest.mark.parametrize("shape", [(1, 1), (300, 7), (513, 1030)])
def test_copy_transposed_equals_numpy_transpose(shape):
  """The loader's blocked transpose (5x faster than assigning w.T) is a
  plain copy: every element lands where w.T puts it, any shape, any
  dtype conversion the destination asks for."""
  w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  out = np.full(shape[::-1], np.nan, np.float64)
  gguf.copy_transposed(out, w)
  np.testing.assert_array_equal(out, w.T.astype(np.float64))
  with pytest.raises(ValueError, match=r"\(7, 300\)"):
    gguf.copy_transposed(np.zeros((300, 7)), np.zeros((300, 7)))
