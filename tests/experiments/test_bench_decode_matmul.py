"""The decode-matmul benchmark's XLA int4 candidates compute our op."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_decode_matmul as bench
from pallas_kernels import decode_matmul as dm
from pallas_kernels import int4_layout


def test_as_int4_is_the_packed_layout():
  codes = jax.random.randint(jax.random.key(0), (8, 64), -8, 8, jnp.int8)
  w4 = bench.as_int4(int4_layout.pack_int4(codes))
  assert w4.dtype == jnp.int4 and w4.shape == (8, 64)
  np.testing.assert_array_equal(np.asarray(w4.astype(jnp.int8)),
                                np.asarray(codes))


def test_xla_int4_candidates_match_the_reference():
  ops = bench.make_operands(jax.random.key(1), 3, 256, 128, buffers=1)
  (w4,) = bench.weights_for("xla_int4", ops)
  args = (ops["x"], ops["x_codes"], ops["s_x"], w4, ops["s_w"][0])
  # W4A4: the int32 dot and the scales, bit for bit.
  got = jax.jit(bench.op_fn("xla_int4", None, False))(*args)
  want = dm.decode_matmul_reference(ops["x_codes"], ops["w_q"][0],
                                    ops["s_w"][0], ops["s_x"])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert bench.check("xla_int4", bench.op_fn("xla_int4", None, False), ops,
                     w4) == "bit-exact"
  # W4A16: bf16 x, f32 accumulation; the output rounded to bf16.
  got = jax.jit(bench.op_fn("xla_int4_bf16", None, False))(*args)
  want = dm.decode_matmul_reference(ops["x"], ops["w_q"][0], ops["s_w"][0],
                                    out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want),
                             rtol=2**-8, atol=2**-8 * float(
                                 jnp.abs(want).max()))
  assert bench.op_bytes("xla_int4", 3, 256, 128) == (
      128 * 128 + 4 * 128 + 4 * 128 + 3 * 256 + 4 * 3 + 2 * 3 * 128)
