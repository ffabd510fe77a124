"""w4a4_matmul.triton (interpret mode on the CPU) against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int4_layout
from pallas_kernels.w4a4_matmul import reference
from pallas_kernels.w4a4_matmul import triton
from quarot_jax import quant
from tests.pallas_kernels.w4a4_matmul import operands

_SMALL = triton.W4A4TritonConfig(block_m=16, block_n=32, block_k=32)
pack = int4_layout.pack_int4


# Not block multiples on purpose (M 40 vs 16, N 72 vs 32, K 320 vs 64).
@pytest.mark.parametrize("m, n, k", [(40, 72, 320), (16, 32, 64), (1, 8, 6)])
def test_kernel_matches_reference_exactly(m, n, k, interpret):
  x, w, sx, sw = operands.codes(m, n, k)
  xq, wq = pack(x), pack(w)
  got = triton.w4a4_matmul_triton(xq, wq, sx, sw, out_dtype=jnp.float32,
                                  config=_SMALL, interpret=interpret)
  want = reference.w4a4_matmul_reference(xq, wq, sx, sw,
                                         out_dtype=jnp.float32)
  # int32 accumulation is exact; the epilogue is the same two f32 products.
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bf16_output_and_quantized_inputs(interpret):
  x = jax.random.normal(jax.random.key(0), (24, 128))
  w = jax.random.normal(jax.random.key(1), (48, 128))
  qx = quant.quantize(x, quant.QuantSpec(bits=4))
  qw = quant.quantize(w, quant.QuantSpec(bits=4))
  args = (pack(qx.values), pack(qw.values), qx.scale[:, 0], qw.scale[:, 0])
  got = triton.w4a4_matmul_triton(*args, config=_SMALL, interpret=interpret)
  want = reference.w4a4_matmul_reference(*args)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))
  # And it is the product of the dequantized operands (up to bf16 output).
  deq = quant.dequantize(qx) @ quant.dequantize(qw).T
  np.testing.assert_allclose(np.asarray(got, np.float32), deq, rtol=1e-2,
                             atol=1e-2 * float(jnp.abs(deq).max()))


def test_pallas_really_runs():
  x, w, sx, sw = operands.codes(16, 32, 64)
  jaxpr = str(jax.make_jaxpr(lambda *a: triton.w4a4_matmul_triton(
      *a, config=_SMALL, interpret=True))(pack(x), pack(w), sx, sw))
  assert "pallas_call" in jaxpr and "w4a4_matmul_triton" in jaxpr


# K 512 in groups of 128 (the 128G mode) and of 64; M, N not tile multiples.
@pytest.mark.parametrize("m, n, k, group", [(40, 72, 512, 128),
                                            (16, 32, 256, 64)])
@pytest.mark.parametrize("which", ["both", "x", "w"])
def test_group_scales_match_reference(m, n, k, group, which, interpret):
  x, w, sx, sw = operands.codes(m, n, k, seed=k + group)
  xq, wq = pack(x), pack(w)
  if which in ("both", "x"):
    sx = operands.group_scales(m, k // group, 1)
  if which in ("both", "w"):
    sw = operands.group_scales(n, k // group, 2)
  got = triton.w4a4_matmul_triton(xq, wq, sx, sw, out_dtype=jnp.float32,
                                  config=_SMALL, interpret=interpret)
  want = reference.w4a4_matmul_reference(xq, wq, sx, sw,
                                         out_dtype=jnp.float32)
  # Same exact int32 group dots, scaled and summed over G in the same order;
  # only f32 rounding of those few terms may differ (FMA contraction).
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6,
                             atol=1e-6 * float(jnp.abs(want).max()))


def test_errors():
  x, w, sx, sw = operands.codes(16, 32, 256)
  xq, wq = pack(x), pack(w)
  run = triton.w4a4_matmul_triton
  with pytest.raises(ValueError, match="x_q must be uint8"):
    run(x, wq, sx, sw)
  with pytest.raises(ValueError, match="K differs"):
    run(xq[:, :8], wq, sx, sw)
  with pytest.raises(ValueError, match="scales must be"):
    run(xq, wq, sx[:3], sw)
  with pytest.raises(ValueError, match="group scales must share G"):
    run(xq, wq, operands.group_scales(16, 2, 0),
        operands.group_scales(32, 4, 0))
  with pytest.raises(ValueError, match="group_size=1 must be even"):
    run(xq, wq, operands.group_scales(16, 256, 0), sw)


@pytest.mark.gpu
def test_lowers_to_the_named_gpu_kernel():
  x, w, sx, sw = operands.codes(256, 256, 512)
  xq, wq = pack(x), pack(w)
  fn = jax.jit(triton.w4a4_matmul_triton)
  assert "w4a4_matmul_triton" in fn.lower(xq, wq, sx, sw).as_text()
  np.testing.assert_array_equal(
      np.asarray(fn(xq, wq, sx, sw), np.float32),
      np.asarray(reference.w4a4_matmul_reference(xq, wq, sx, sw),
                 np.float32))
