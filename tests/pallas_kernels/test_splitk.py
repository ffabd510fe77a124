"""splitk: the deferred epilogue of `decode_matmul` (W4A4 codes) equals its
own epilogue, and `splitk.load` in a kernel equals `splitk.combine`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import decode_matmul as dm
from pallas_kernels import int4_layout
from pallas_kernels import splitk


def _codes(m, mp, k, n, seed):
  """int8 codes [Mp, K] (padding rows zero), scales f32[Mp] (padding 1),
  packed int4 weights [N, K // 2] and their scales f32[N]."""
  kx, kw, ks, kt = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.randint(kx, (mp, k), -8, 8).astype(jnp.int8)
  x = jnp.where(jnp.arange(mp)[:, None] < m, x, 0)
  s_x = jnp.where(jnp.arange(mp) < m,
                  jax.random.uniform(ks, (mp,), minval=0.01, maxval=0.1), 1.0)
  w = jax.random.randint(kw, (n, k), -8, 8).astype(jnp.int8)
  s_w = jax.random.uniform(kt, (n,), minval=1e-3, maxval=1e-2)
  return x, s_x, int4_layout.pack_int4(w), s_w


def _impl(interpret):
  return "triton" if interpret else "mosaic"


@pytest.mark.parametrize("token_major", [True, False])
@pytest.mark.parametrize("m, k, n", [(1, 1024, 192), (5, 2048, 256),
                                     (16, 1024, 128)])
def test_combine_is_decode_matmuls_own_result(m, k, n, token_major,
                                              interpret):
  impl = _impl(interpret)
  mp = dm.padded_rows(m, impl)
  x, s_x, w_q, s_w = _codes(m, mp, k, n, seed=m + k)
  cfg = dm.DecodeMatmulConfig(split_k=2)
  sk = dm.decode_matmul_splitk(x, w_q, s_w, s_x, config=cfg,
                               implementation=impl, interpret=interpret,
                               token_major=token_major)
  assert sk.partials.shape == ((2, mp, n) if token_major else (2, n, mp))
  assert sk.width == n and sk.padded_rows == mp
  got = splitk.combine(sk, m, jnp.bfloat16)
  want = dm.decode_matmul(x, w_q, s_w, s_x, rows=m, config=cfg,
                          implementation=impl, interpret=interpret)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  ref = dm.decode_matmul_reference(x[:m], w_q, s_w, s_x[:m])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def _rows_kernel(p_ref, sx_ref, sw_ref, o_ref, *, rows, token_major):
  for i in range(rows):
    row = jnp.int32(i)
    o_ref[i] = splitk.load(p_ref, sx_ref, sw_ref, (slice(None),) * 2, row,
                           token_major=token_major).astype(o_ref.dtype)


@pytest.mark.parametrize("token_major", [True, False])
@pytest.mark.parametrize("s, a, r, mp, rows", [(3, 4, 64, 8, 2),
                                               (1, 2, 32, 16, 16)])
def test_load_in_a_kernel_is_combine(s, a, r, mp, rows, token_major,
                                     interpret):
  kp, kx, kw = jax.random.split(jax.random.key(s * a), 3)
  shape = (s, mp, a * r) if token_major else (s, a * r, mp)
  partials = jax.random.randint(kp, shape, -5000, 5000).astype(jnp.float32)
  sk = splitk.SplitK(partials, jax.random.uniform(kx, (mp,)),
                     jax.random.uniform(kw, (a * r,)), token_major)
  p, s_w = splitk.view(sk, a, r)
  got = pl.pallas_call(
      functools.partial(_rows_kernel, rows=rows, token_major=token_major),
      grid=(1,), in_specs=[splitk.whole(p), splitk.whole(sk.s_x),
                           splitk.whole(s_w)],
      out_specs=pl.BlockSpec((rows, a, r), lambda i: (0, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((rows, a, r), jnp.bfloat16),
      interpret=interpret)(p, sk.s_x, s_w)
  want = splitk.combine(sk, rows, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got).reshape(rows, -1),
                                np.asarray(want))


def test_errors():
  x, s_x, w_q, s_w = _codes(1, 8, 256, 128, seed=0)
  with pytest.raises(ValueError, match="takes int8 codes"):
    dm.decode_matmul_splitk(x.astype(jnp.bfloat16), w_q, s_w, None,
                            implementation="triton", interpret=True)
  with pytest.raises(ValueError, match="must come padded"):
    dm.decode_matmul_splitk(x[:3], w_q, s_w, s_x[:3],
                            implementation="triton", interpret=True)
  sk = splitk.SplitK(jnp.zeros((2, 128, 8)), s_x, s_w)
  with pytest.raises(ValueError, match=r"a view \(3, 32\) of the N=128"):
    splitk.view(sk, 3, 32)
