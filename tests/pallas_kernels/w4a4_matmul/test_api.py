"""w4a4_matmul.api: each backend it runs, and what it picks by itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int4_layout
from pallas_kernels.w4a4_matmul import api
from pallas_kernels.w4a4_matmul import mosaic_gpu
from tests.pallas_kernels.w4a4_matmul import operands

pack = int4_layout.pack_int4


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _implementations():
  """The backends this machine runs ('triton' in interpret mode off GPU)."""
  return ["xla", "triton"] + (
      ["mosaic"] if mosaic_gpu.can_use_w4a4_mosaic() else [])


def _assert_every_backend_computes(x, w, sx, sw, codes, *, rtol, atol):
  """Each implementation's f32 y against the dequantized product; atol is a
  fraction of its largest magnitude."""
  want = operands.dequantized_product(x, w, sx, sw)
  x_in = pack(x) if codes == "packed" else x
  for implementation in _implementations():
    got = api.w4a4_matmul(x_in, pack(w), sx, sw, out_dtype=jnp.float32,
                          implementation=implementation,
                          interpret=implementation == "triton"
                          and not _on_gpu())
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol,
                               atol=atol * np.abs(want).max(),
                               err_msg=implementation)


@pytest.mark.parametrize("codes", ["packed", "int8"])
def test_every_backend_is_the_float_computation(codes):
  # M, N, K not tile multiples; int8 codes are what hadamard_quant writes
  # for the Mosaic kernel. Exact int32 dots; only the two f32 scale
  # products round.
  x, w, sx, sw = operands.codes(12, 40, 256, seed=4)
  _assert_every_backend_computes(x, w, sx, sw, codes, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("codes", ["packed", "int8"])
def test_every_backend_takes_group_scales(codes):
  # The 128G mode: K 512 in 4 groups, both sides grouped; 'mosaic' runs
  # one group per pipeline step of the wt kernel (packed x widened first).
  # Exact int32 group dots; the f32 scale products and the 4-term sum round.
  x, w, _, _ = operands.codes(12, 40, 512, seed=5)
  sx, sw = operands.group_scales(12, 4, 1), operands.group_scales(40, 4, 2)
  _assert_every_backend_computes(x, w, sx, sw, codes, rtol=1e-5, atol=1e-6)


def test_none_picks_by_platform():
  x, w, sx, sw = operands.codes(8, 16, 64)
  args = (pack(x), pack(w), sx, sw)
  jaxpr = lambda **kw: str(jax.make_jaxpr(
      lambda *a: api.w4a4_matmul(*a, **kw))(*args))
  assert api.default_implementation(interpret=True) == "triton"
  assert "w4a4_matmul_triton" in jaxpr(interpret=True)
  if mosaic_gpu.can_use_w4a4_mosaic():
    assert api.default_implementation() == "mosaic"
  elif _on_gpu():
    assert api.default_implementation() == "triton"
  else:  # The CPU falls back to the XLA reference: no kernel at all.
    assert api.default_implementation() == "xla"
    assert "pallas_call" not in jaxpr()
    got = api.w4a4_matmul(*args, out_dtype=jnp.float32)
    np.testing.assert_allclose(
        np.asarray(got), operands.dequantized_product(x, w, sx, sw),
        rtol=1e-6)


def test_errors():
  x, w, sx, sw = operands.codes(8, 16, 64)
  args = (pack(x), pack(w), sx, sw)
  with pytest.raises(ValueError, match="implementation='cutlass' must be"):
    api.w4a4_matmul(*args, implementation="cutlass")
  with pytest.raises(ValueError, match="'mosaic' has no interpret mode"):
    api.w4a4_matmul(*args, implementation="mosaic", interpret=True)
  with pytest.raises(ValueError, match="K differs"):
    api.w4a4_matmul(args[0][:, :8], *args[1:], implementation="xla")


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16])
def test_a_residual_is_added_as_xla_adds_it(out_dtype):
  # Every backend's y + residual equals its own y, then XLA's add, bit for
  # bit ('mosaic' adds it in the epilogue; the others after). 16-bit
  # outputs, as the model's: y is rounded before the add (in f32 XLA may
  # fuse the last scale product and the add into one FMA).
  x, w, sx, sw = operands.codes(12, 40, 256, seed=5)
  r = jax.random.normal(jax.random.key(5), (12, 40), jnp.float32)
  r = (r * 30).astype(out_dtype)
  for implementation in _implementations():
    run = lambda **kw: api.w4a4_matmul(
        x, pack(w), sx, sw, out_dtype=out_dtype,
        implementation=implementation,
        interpret=implementation == "triton" and not _on_gpu(), **kw)
    y = run()
    got = run(residual=r)
    assert got.dtype == jnp.dtype(out_dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(y + r, np.float32),
                                  err_msg=implementation)


def test_a_residual_of_another_shape_or_dtype_is_refused():
  x, w, sx, sw = operands.codes(8, 16, 64)
  args = (pack(x), pack(w), sx, sw)
  with pytest.raises(ValueError, match=r"residual must be bfloat16\[8, 16\]"):
    api.w4a4_matmul(*args, implementation="xla",
                    residual=jnp.zeros((16, 8), jnp.bfloat16))
  with pytest.raises(ValueError, match="got float32"):
    api.w4a4_matmul(*args, implementation="xla",
                    residual=jnp.zeros((8, 16), jnp.float32))
