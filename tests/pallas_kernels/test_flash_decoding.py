"""flash_decoding's merge (Pallas, interpret mode) against a numpy
log-sum-exp of hand-built partials."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np
import pytest

from pallas_kernels import flash_decoding


def test_padded_splits():
  assert [flash_decoding.padded_splits(n) for n in (1, 2, 3, 5, 8, 9)] == [
      1, 2, 4, 8, 8, 16]


def _partials(b, kv_heads, ns, g, gp, x, parts, seed=0):
  """Random partials f32[B, K, NSp, Gp, X] and m, l f32[B, K, NSp, Gp] as
  the attention kernels leave them: split 1 of every row empty (m = -inf,
  l = 0, o = 0), row (1, 0, G - 1) empty in every split, and NaN where
  nothing was written (splits >= NS) or only padding rows live (>= G), so
  a merge that reads either gives NaN."""
  nsp = flash_decoding.padded_splits(ns)
  rng = np.random.default_rng(seed)
  os_ = [rng.normal(size=(b, kv_heads, nsp, gp, x)) for _ in range(parts)]
  m = 3.0 * rng.normal(size=(b, kv_heads, nsp, gp))
  l = rng.uniform(0.5, 4.0, size=(b, kv_heads, nsp, gp))
  empty = np.zeros(m.shape, bool)
  empty[:, :, 1] = True
  empty[1, 0, :, g - 1] = True
  m[empty], l[empty] = -np.inf, 0.0
  for o in os_:
    o[empty] = 0.0
  for a in (m, l, *os_):
    a[:, :, ns:] = np.nan
    a[:, :, :, g:] = np.nan
  return [o.astype(np.float32) for o in os_], m.astype(np.float32), l.astype(
      np.float32)


def _merge_f64(o, m, l, ns, g):
  """Σ_t w_t o_t / Σ_t w_t l_t over the real splits and rows, in f64."""
  o, m, l = (np.asarray(a, np.float64)[:, :, :ns, :g] for a in (o, m, l))
  m_all = m.max(axis=2, keepdims=True)
  m_all = np.where(np.isfinite(m_all), m_all, 0.0)
  w = np.where(l > 0, np.exp(m - m_all), 0.0)  # [B, K, NS, G]
  den = (w * l).sum(axis=2)
  num = (w[..., None] * o).sum(axis=2)  # [B, K, G, X]
  return np.where(den[..., None] > 0,
                  num / np.where(den > 0, den, 1.0)[..., None], 0.0)


@pytest.mark.parametrize("ns, g, gp", [(3, 1, 1), (5, 4, 16), (8, 3, 16),
                                       (2, 1, 16)])
def test_merge_is_the_log_sum_exp(ns, g, gp, interpret):
  # NS a power of two or not, MHA (Gp = 1 and 16) and GQA; the one part of
  # the float kernel.
  (o,), m, l = _partials(2, 2, ns, g, gp, 32, 1, seed=ns)
  out = jax.ShapeDtypeStruct((2, 2, g, 32), jnp.float32)
  got = np.asarray(flash_decoding.merge(
      (jnp.asarray(o),), jnp.asarray(m), jnp.asarray(l), num_splits=ns,
      out_shape=out, interpret=interpret))
  want = _merge_f64(o, m, l, ns, g)
  assert not np.any(np.isnan(got))
  np.testing.assert_array_equal(got[1, 0, g - 1], 0.0)  # every split empty
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=1e-6 * np.abs(want).max())


def test_merge_of_two_parts_with_a_store(interpret):
  # The KV4 kernel's two halves, written by the caller's store (here: the
  # first half to h < X, the second to h >= X) in bf16.
  ns, g, x = 5, 4, 16
  (oa, ob), m, l = _partials(2, 1, ns, g, 16, x, 2, seed=7)

  def store(o_ref, a, b):
    o_ref[pl.ds(0, x)] = a.astype(o_ref.dtype)
    o_ref[pl.ds(x, x)] = b.astype(o_ref.dtype)

  out = jax.ShapeDtypeStruct((2, 1, g, 2 * x), jnp.bfloat16)
  got = flash_decoding.merge(
      (jnp.asarray(oa), jnp.asarray(ob)), jnp.asarray(m), jnp.asarray(l),
      num_splits=ns, out_shape=out, store=store, interpret=interpret)
  assert got.dtype == jnp.bfloat16
  want = np.concatenate([_merge_f64(oa, m, l, ns, g),
                         _merge_f64(ob, m, l, ns, g)], axis=-1)
  # bf16 output: <= 2^-9 relative.
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2**-8,
                             atol=1e-6)
