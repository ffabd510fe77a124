"""rms_norm_quant: the fused kernel (interpret mode on CPU) against the
unfused path it replaces (`layers.rms_norm`, then the quantizer of
`hadamard_quant`), a hand-worked case, the padded rows, and the errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import hadamard_quant as hq
from pallas_kernels import rms_norm_quant as rq
from quarot_jax import layers
from quarot_jax import quant

_EPS = 1e-5


def _case(m, k, dtype, seed):
  """Un-normalized rows (not unit scale) and a norm weight that is not
  ones, both fresh per case."""
  kx, kw = jax.random.split(jax.random.key(seed))
  x = (3.0 * jax.random.normal(kx, (m, k)) + 0.5).astype(dtype)
  w = (1.0 + 0.2 * jax.random.normal(kw, (k,))).astype(dtype)
  return x, w


def _unfused(x, w, *, clip_ratio=0.9, packed=False, quantize=None):
  """The path the kernel replaces: the model's norm, then the quantizer."""
  y = layers.rms_norm(x, w, eps=_EPS)
  quantize = quantize or hq.hadamard_quant_reference
  return quantize(y, None, clip_ratio=clip_ratio, packed=packed)


def _assert_equal(got, want):
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, (g, w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("k", [4096, 1536, 576])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_kernel_is_the_unfused_path_bit_for_bit(m, k, interpret):
  # bf16, the decode dtype: the f32 norm is cast to bf16 twice, as in
  # layers.rms_norm, so codes and scales must agree exactly.
  x, w = _case(m, k, jnp.bfloat16, seed=100 * k + m)
  got = rq.rms_norm_quant(x, w, eps=_EPS, interpret=interpret)
  assert got[0].dtype == jnp.int8 and got[0].shape == (m, k)
  want = _unfused(x, w)
  if interpret:
    _assert_equal(got, want)
    return
  # On the GPU the kernel's two-step f32 sum and XLA's reduction add the
  # squares in different orders, so the inverse rms may differ by an ulp;
  # that can move the bf16 rounding of one x * rsqrt (a 2^-8 step) and so a
  # code at a tie, or the scale when it is the row's absmax (H200,
  # 2026-12-01: 1 code of 20480 at m=5, k=4096). Everything else is exact.
  for g, w_ in zip(got, want):
    assert g.shape == w_.shape and g.dtype == w_.dtype, (g, w_)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]),
                             rtol=2.0**-8)
  diff = np.abs(np.asarray(got[0], np.int32) - np.asarray(want[0], np.int32))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (
      diff.max(), (diff > 0).mean())


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("clip_ratio", [1.0, 0.85])
def test_16_bit_dtypes_and_clip_ratios(dtype, clip_ratio, interpret):
  x, w = _case(3, 1536, dtype, seed=7)
  got = rq.rms_norm_quant(x, w, eps=_EPS, clip_ratio=clip_ratio,
                          interpret=interpret)
  _assert_equal(got, _unfused(x, w, clip_ratio=clip_ratio))


@pytest.mark.parametrize("k", [4096, 576])
def test_f32_rows_agree_to_the_ulp(k, interpret):
  # In f32 the casts of rms_norm are no-ops that XLA drops, and it may then
  # fuse and reassociate x * rsqrt(.) * w differently in each program (the
  # unfused reference jitted whole differs from itself jitted in two parts
  # by an ulp in some scales), so f32 agrees to an ulp or two: scales to
  # 2.4e-7, and a code may move by one only where y / s sits at a tie.
  x, w = _case(16, k, jnp.float32, seed=k)
  (got_q, got_s) = rq.rms_norm_quant(x, w, eps=_EPS, interpret=interpret)
  want_q, want_s = _unfused(x, w)
  np.testing.assert_allclose(np.asarray(got_s), np.asarray(want_s),
                             rtol=2.4e-7)
  diff = np.abs(np.asarray(got_q, np.int32) - np.asarray(want_q, np.int32))
  assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())


def test_packed_codes_are_the_int8_codes_packed(interpret):
  x, w = _case(5, 576, jnp.bfloat16, seed=11)
  packed_q, packed_s = rq.rms_norm_quant(x, w, eps=_EPS, packed=True,
                                         interpret=interpret)
  assert packed_q.dtype == jnp.uint8 and packed_q.shape == (5, 288)
  _assert_equal((packed_q, packed_s), _unfused(x, w, packed=True))
  codes, _ = rq.rms_norm_quant(x, w, eps=_EPS, interpret=interpret)
  np.testing.assert_array_equal(
      np.asarray(quant.unpack_int4(packed_q, signed=True)), np.asarray(codes))


@pytest.mark.parametrize("m, out_rows, block_elements", [
    (5, 8, 8192),    # one row a program, three padding programs
    (4, 16, 16384),  # four rows a program: one real block, three padding
    (16, 16, 8192),  # nothing to pad
])
def test_out_rows_pads_with_zero_codes_and_unit_scales(m, out_rows,
                                                       block_elements,
                                                       interpret):
  x, w = _case(m, 4096, jnp.bfloat16, seed=m)
  cfg = rq.RmsNormQuantConfig(block_elements=block_elements)
  got_q, got_s = rq.rms_norm_quant(x, w, eps=_EPS, out_rows=out_rows,
                                   config=cfg, interpret=interpret)
  assert got_q.shape == (out_rows, 4096) and got_s.shape == (out_rows,)
  _assert_equal((got_q[:m], got_s[:m]), _unfused(x, w))
  assert not np.asarray(got_q[m:]).any()
  np.testing.assert_array_equal(np.asarray(got_s[m:]), 1.0)
  _assert_equal((got_q, got_s), rq.rms_norm_quant_reference(
      x, w, eps=_EPS, out_rows=out_rows))


def test_unfused_pallas_path_is_matched_too(interpret):
  # What qlinear ran before: the XLA norm, then the quantize-only kernel.
  x, w = _case(5, 1536, jnp.bfloat16, seed=5)
  kernel = functools.partial(hq.hadamard_quant, interpret=interpret)
  _assert_equal(rq.rms_norm_quant(x, w, eps=_EPS, interpret=interpret),
                _unfused(x, w, quantize=kernel))


def test_reference_by_hand(interpret):
  # x = ±2: mean(x²) = 4, and with eps = 0, rsqrt(4) = 0.5, so the norm is
  # ±1 and y = w * (1, -1, 1, -1) = (2.5, -1, 7, 0). clip_ratio 1: s = 7 /
  # 7 = 1, codes = round_half_even(y) = (2, -1, 7, 0). The padded row 1:
  # codes 0, scale 1.
  x = jnp.array([[2.0, -2.0, 2.0, -2.0]], jnp.bfloat16)
  w = jnp.array([2.5, 1.0, 7.0, 0.0], jnp.bfloat16)
  want = ([[2, -1, 7, 0], [0, 0, 0, 0]], [1.0, 1.0])
  for fn in (rq.rms_norm_quant_reference,
             functools.partial(rq.rms_norm_quant, interpret=interpret)):
    q, s = fn(x, w, eps=0.0, clip_ratio=1.0, out_rows=2)
    np.testing.assert_array_equal(np.asarray(q), want[0])
    np.testing.assert_array_equal(np.asarray(s), want[1])


def test_pallas_call_is_in_the_jaxpr():
  x, w = _case(2, 576, jnp.bfloat16, seed=0)
  jaxpr = str(jax.make_jaxpr(functools.partial(
      rq.rms_norm_quant, eps=_EPS, interpret=True))(x, w))
  assert "pallas_call" in jaxpr and "rms_norm_quant" in jaxpr


def test_errors():
  x, w = _case(2, 8, jnp.bfloat16, seed=0)
  run = functools.partial(rq.rms_norm_quant, eps=_EPS, interpret=True)
  with pytest.raises(NotImplementedError, match="bits=3"):
    run(x, w, bits=3)
  with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
    run(x[None], w)
  with pytest.raises(ValueError, match="K=7 must be even"):
    run(x[:, :7], w[:7])
  with pytest.raises(ValueError, match=r"weight must be \[K\]=\[8\]"):
    run(x, w[:4])
  with pytest.raises(ValueError, match="clip_ratio=1.5"):
    run(x, w, clip_ratio=1.5)
  with pytest.raises(ValueError, match="out_rows=1 must be at least M=2"):
    run(x, w, out_rows=1)


@pytest.mark.gpu
def test_gpu_lowers_to_the_named_kernel_and_matches():
  # Triton adds the sum of squares in its own order and divides with its
  # own division (see test_hadamard_quant's GPU policy): scales to 2 ulp,
  # and a code may move by one where y / s sits at a rounding tie.
  for m, k, out_rows in ((1, 4096, 8), (5, 1536, 8), (16, 576, None)):
    x, w = _case(m, k, jnp.bfloat16, seed=m + k)
    fn = jax.jit(functools.partial(rq.rms_norm_quant, eps=_EPS,
                                   out_rows=out_rows,
                                   implementation="pallas"))
    assert "rms_norm_quant" in fn.lower(x, w).as_text()
    got_q, got_s = fn(x, w)
    for want_q, want_s in (_unfused(x, w), _unfused(
        x, w, quantize=functools.partial(hq.hadamard_quant,
                                         implementation="pallas"))):
      np.testing.assert_allclose(np.asarray(got_s[:m]), np.asarray(want_s),
                                 rtol=2.4e-7)
      diff = np.abs(np.asarray(got_q[:m], np.int32)
                    - np.asarray(want_q, np.int32))
      assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(),
                                                      diff.mean())
    assert not np.asarray(got_q[m:]).any()
  test_reference_by_hand(False)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_prefill_rows(packed):
  # Prefill runs the fused kernel too (qlinear): 2048 rows of K = 4096, the
  # int8 codes the Mosaic matmul takes or the packed ones of the Triton one.
  # As at decode, the two-step sum may move a code at a tie (see above).
  x, w = _case(2048, 4096, jnp.bfloat16, seed=2048)
  got = rq.rms_norm_quant(x, w, eps=_EPS, packed=packed)
  want = _unfused(x, w, packed=packed)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]),
                             rtol=2.0**-8)
  codes = lambda c: np.asarray(quant.unpack_int4(c, signed=True) if packed
                               else c, np.int32)
  diff = np.abs(codes(got[0]) - codes(want[0]))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (
      diff.max(), (diff > 0).mean())
