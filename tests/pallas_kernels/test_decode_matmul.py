"""decode_matmul: the Triton kernel in interpret mode against the reference
(same quantized inputs, W4A4 bit-exact), the reference by hand, the Pallas
path in the jaxpr, the errors, and the Mosaic GPU kernel on the GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_matmul as dm
from pallas_kernels import int4_layout

# block_k = 64 K values per step; split_k = 2 over K = 320 (5 blocks) gives
# splits of 3 and 2 blocks; block_n = 64 does not divide N = 200.
_CFG = dm.DecodeMatmulConfig(block_n=64, block_k=64, split_k=2)


def _operands(m, n, k, seed, *, codes):
  """x bf16[M, K] (or int8 codes + s_x f32[M]), packed w_q, s_w f32[N]."""
  kx, kw, ks, kt = jax.random.split(jax.random.key(seed), 4)
  w = jax.random.randint(kw, (n, k), -8, 8, jnp.int32)
  # Scales in [0.5, 2): dropping or doubling one moves y far off.
  s_w = jax.random.uniform(ks, (n,), jnp.float32, 0.5, 2.0)
  if codes:
    x = jax.random.randint(kx, (m, k), -8, 8, jnp.int32).astype(jnp.int8)
    s_x = jax.random.uniform(kt, (m,), jnp.float32, 0.5, 2.0)
  else:
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    s_x = None
  return x, int4_layout.pack_int4(w), s_w, s_x


@pytest.mark.parametrize("m", [1, 3, 16])
def test_w4a16_matches_reference(m, interpret):
  x, w_q, s_w, _ = _operands(m, 200, 320, seed=m, codes=False)
  got = dm.decode_matmul(x, w_q, s_w, config=_CFG, implementation="triton",
                         interpret=interpret, out_dtype=jnp.float32)
  want = dm.decode_matmul_reference(x, w_q, s_w, out_dtype=jnp.float32)
  assert got.shape == (m, 200) and got.dtype == jnp.float32
  # bf16 x times int4 w is exact in f32; only the order of the f32 sums
  # differs: a few ulps of the largest |partial sum| (<= sqrt(K) spread).
  atol = 1e-6 * np.sqrt(320) * float(jnp.abs(want).max())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                             atol=atol)


@pytest.mark.parametrize("m", [1, 16])
def test_w4a4_bit_exact(m, interpret):
  x, w_q, s_w, s_x = _operands(m, 200, 320, seed=10 + m, codes=True)
  got = dm.decode_matmul(x, w_q, s_w, s_x, config=_CFG,
                         implementation="triton", interpret=interpret,
                         out_dtype=jnp.float32)
  # The int32 reference: acc exact, then (acc * s_x) * s_w in f32.
  w = int4_layout.unpack_int4(w_q, signed=True)
  acc = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32)
  want = acc.astype(jnp.float32) * s_x[:, None] * s_w[None, :]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(
      np.asarray(dm.decode_matmul_reference(x, w_q, s_w, s_x,
                                            out_dtype=jnp.float32)),
      np.asarray(want))


@pytest.mark.parametrize("implementation", ["triton", "xla"])
def test_padded_rows_give_the_unpadded_result(implementation, interpret):
  m = 3
  mp = dm.padded_rows(m, implementation)
  assert (mp, dm.padded_rows(5, "mosaic"), dm.padded_rows(9, "mosaic")) == (
      16 if implementation == "triton" else 3, 8, 16)
  x, w_q, s_w, s_x = _operands(m, 200, 320, seed=7, codes=True)
  want = dm.decode_matmul(x, w_q, s_w, s_x, config=_CFG,
                          implementation=implementation, interpret=interpret,
                          out_dtype=jnp.float32)
  # Padding rows hold junk here: rows= must keep them out of y entirely.
  xp = jnp.concatenate([x, jnp.full((mp - m + 2, 320), 7, jnp.int8)])[:mp]
  sp = jnp.concatenate([s_x, jnp.full((mp - m + 2,), 9.0)])[:mp]
  got = dm.decode_matmul(xp, w_q, s_w, sp, config=_CFG, rows=m,
                         implementation=implementation, interpret=interpret,
                         out_dtype=jnp.float32)
  assert got.shape == (m, 200)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="rows=4"):
    dm.decode_matmul(x, w_q, s_w, s_x, rows=4, implementation="xla")


def test_reference_hand_worked():
  # w row 0 = [1, -2, 3, -8] packs to bytes [0xE1, 0x83]; row 1 = [7, 0, -1,
  # 2] to [0x07, 0x2F]. x = [[1, 2, 3, 4]], s_w = [0.5, 2]:
  #   row 0: 1 - 4 + 9 - 32 = -26, * 0.5 = -13
  #   row 1: 7 + 0 - 3 + 8 = 12, * 2 = 24
  w_q = jnp.array([[0xE1, 0x83], [0x07, 0x2F]], jnp.uint8)
  s_w = jnp.array([0.5, 2.0], jnp.float32)
  y = dm.decode_matmul_reference(jnp.array([[1.0, 2.0, 3.0, 4.0]]), w_q, s_w)
  np.testing.assert_array_equal(np.asarray(y), [[-13.0, 24.0]])
  # The same codes as W4A4 with s_x = 0.25: [-26 * 0.25 * 0.5, 12 * 0.25 * 2].
  y4 = dm.decode_matmul_reference(jnp.array([[1, 2, 3, 4]], jnp.int8), w_q,
                                  s_w, jnp.array([0.25], jnp.float32),
                                  out_dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(y4), [[-3.25, 6.0]])


def test_pallas_call_in_jaxpr():
  x, w_q, s_w, _ = _operands(3, 128, 256, seed=0, codes=False)
  jaxpr = jax.make_jaxpr(lambda *a: dm.decode_matmul(
      *a, implementation="triton", interpret=True))(x, w_q, s_w)
  assert "pallas_call" in str(jaxpr)
  jaxpr = jax.make_jaxpr(lambda *a: dm.decode_matmul(
      *a, implementation="xla"))(x, w_q, s_w)
  assert "pallas_call" not in str(jaxpr)


def test_errors():
  x, w_q, s_w, _ = _operands(3, 128, 256, seed=0, codes=False)
  with pytest.raises(ValueError, match="w_q packs K=128"):
    dm.decode_matmul(x, w_q[:, :64], s_w, implementation="xla")
  with pytest.raises(ValueError, match=r"s_w must be \[N\]=\[128\]"):
    dm.decode_matmul(x, w_q, s_w[:5], implementation="xla")
  with pytest.raises(ValueError, match="int8 codes x need s_x"):
    dm.decode_matmul(x.astype(jnp.int8), w_q, s_w, implementation="xla")
  with pytest.raises(ValueError, match="takes no s_x"):
    dm.decode_matmul(x, w_q, s_w, jnp.ones(3), implementation="xla")
  with pytest.raises(ValueError, match="cannot take M=17"):
    dm.decode_matmul(jnp.ones((17, 256), jnp.bfloat16), w_q, s_w,
                     implementation="triton", interpret=True)
  with pytest.raises(ValueError, match="no interpret mode"):
    dm.decode_matmul(x, w_q, s_w, implementation="mosaic", interpret=True)
  with pytest.raises(ValueError, match="block_k=96"):
    dm.DecodeMatmulConfig(block_k=96)
  # M > 16 without an explicit backend falls back to the reference.
  xl = jnp.ones((17, 256), jnp.bfloat16)
  np.testing.assert_array_equal(
      np.asarray(dm.decode_matmul(xl, w_q, s_w, interpret=True)),
      np.asarray(dm.decode_matmul_reference(xl, w_q, s_w)))


@pytest.mark.parametrize("w4a4_mma", ["bf16", "int8"])
def test_mosaic_kernel_traces_on_cpu(w4a4_mma):
  """No CPU runs the Mosaic kernel, but tracing its body to a jaxpr
  catches a wrong argument or scratch name before a GPU call does."""
  m, n, k = 5, 256, 2048  # 8 blocks of 256: splits of 3, 3 and 2
  x = jnp.zeros((m, k), jnp.int8)
  w_q = jnp.zeros((n, k // 2), jnp.uint8)
  cfg = dm.DecodeMatmulConfig(block_n=64, split_k=3, w4a4_mma=w4a4_mma)
  plan = dm._plan(m, n, k, cfg, "mosaic")  # pylint: disable=protected-access
  fn = lambda x, w: dm._partials_mosaic(x, w, plan, cfg)  # pylint: disable=protected-access
  assert f"f32[3,{n},8]" in str(jax.make_jaxpr(fn)(x, w_q))


def test_triton_tiles_lie_inside_n():
  # Natively, Pallas Triton does not mask a block's rows past N: the last
  # tile's partial sums overwrote the next split's first rows (H200). The
  # tile divides N where a power of two >= 16 does; else N is padded.
  for n, want in ((200, 16), (576, 64), (192, 64), (4096, 128)):
    plan = dm._plan(1, n, 512, dm.DecodeMatmulConfig(), "triton")
    assert plan.block_n == want, (n, plan.block_n)
  x, w_q, s_w, s_x = _operands(1, 200, 320, seed=3, codes=True)
  jaxpr = str(jax.make_jaxpr(lambda *a: dm.decode_matmul(
      *a, config=_CFG, implementation="triton", interpret=True))(
          x, w_q, s_w, s_x))
  assert "i8[208,160]" in jaxpr  # 200 rows = 12.5 tiles of 16: padded


@pytest.mark.gpu
@pytest.mark.parametrize("warp_specialized", [False, True])
@pytest.mark.parametrize("w4a4_mma", ["bf16", "int8"])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_mosaic_on_gpu(m, w4a4_mma, warp_specialized):
  if not dm.is_hopper():
    pytest.skip("the Mosaic GPU kernel needs a Hopper GPU")
  cfg = dm.DecodeMatmulConfig(block_n=64, block_k=128, split_k=3,
                              w4a4_mma=w4a4_mma,
                              warp_specialized=warp_specialized)
  # K = 11 blocks of 128: splits of 4, 4 and 3 blocks (a dynamic grid).
  x, w_q, s_w, _ = _operands(m, 192, 1408, seed=m, codes=False)
  got = dm.decode_matmul(x, w_q, s_w, config=cfg, implementation="mosaic",
                         out_dtype=jnp.float32)
  want = dm.decode_matmul_reference(x, w_q, s_w, out_dtype=jnp.float32)
  atol = 1e-6 * np.sqrt(1408) * float(jnp.abs(want).max())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                             atol=atol)
  xc, w_q, s_w, s_x = _operands(m, 192, 1408, seed=m + 1, codes=True)
  got = dm.decode_matmul(xc, w_q, s_w, s_x, config=cfg,
                         implementation="mosaic")
  want = dm.decode_matmul_reference(xc, w_q, s_w, s_x)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))
  jaxpr_text = jax.jit(lambda *a: dm.decode_matmul(
      *a, implementation="mosaic")).lower(x, w_q, s_w).as_text()
  assert "decode_matmul" in jaxpr_text
