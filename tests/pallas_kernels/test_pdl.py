"""Programmatic dependent launch: the quantizers before the decode matmul
trigger it (inline PTX, compiled only) and the numbers do not change."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_matmul as dm
from pallas_kernels import hadamard_quant as hq
from pallas_kernels import rms_norm_quant as rq
from quarot_jax import hadamard
from quarot_jax import kernels as kernels_lib
from quarot_jax import qlinear
from quarot_jax import quant


def _base(k):
  return jnp.asarray(hadamard.hadamard_matrix(hadamard.factorize(k)[1]))


def _x(m, k, seed):
  return jax.random.normal(jax.random.key(seed), (m, k), jnp.bfloat16)


# The decode quantizers that run right before a decode matmul: the pre-norm
# one (q/k/v, gate/up), the o_proj input's fused Hadamard (K = 4096) and
# the down_proj input's split Hadamard's quantize (K = 11008, one row).
_QUANTIZERS = {
    "rms_norm_quant": lambda x, **kw: rq.rms_norm_quant(
        x, jnp.ones((x.shape[1],), x.dtype), eps=1e-5, out_rows=8,
        implementation="pallas", **kw),
    "hadamard_quant": lambda x, **kw: hq.hadamard_quant(
        x, _base(x.shape[1]), packed=False, out_rows=8,
        implementation="pallas", **kw),
}
_CASES = [("rms_norm_quant", 4096), ("hadamard_quant", 4096),
          ("hadamard_quant", 11008)]


@pytest.mark.parametrize("name, k", _CASES)
def test_compiled_quantizers_trigger_dependents(name, k):
  """Lowered for CUDA (on any machine), the kernel carries the PTX; without
  the flag it does not."""
  x = _x(1, k, seed=k)
  lower = lambda flag: jax.jit(functools.partial(
      _QUANTIZERS[name], launch_dependents=flag)).trace(x).lower(
          lowering_platforms=("cuda",)).as_text()
  assert lower(True).count("griddepcontrol.launch_dependents") == 1
  assert "griddepcontrol" not in lower(False)


@pytest.mark.parametrize("name, k", _CASES)
def test_interpreted_trigger_changes_nothing(name, k):
  x = _x(1, k, seed=k + 1)
  run = functools.partial(_QUANTIZERS[name], interpret=True)
  for got, want in zip(run(x, launch_dependents=True), run(x)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_mosaic_kernel_with_pdl_lowers_on_cpu(prefetch):
  m, n, k = 1, 256, 2048
  cfg = dm.DecodeMatmulConfig(block_n=64, split_k=3, w4a4_mma="int8",
                              pdl=True, pdl_prefetch=prefetch)
  plan = dm._plan(m, n, k, cfg, "mosaic")  # pylint: disable=protected-access
  fn = lambda x, w: dm._partials_mosaic(x, w, plan, cfg)  # pylint: disable=protected-access
  jaxpr = str(jax.make_jaxpr(fn)(jnp.zeros((m, k), jnp.int8),
                                 jnp.zeros((n, k // 2), jnp.uint8)))
  assert "griddepcontrol_wait" in jaxpr
  assert jaxpr.count("async_prefetch") == prefetch
  # Mosaic GPU lowers on any machine: the wait and the TMA L2 prefetch are
  # in the kernel's code.
  text = jax.jit(fn).trace(jnp.zeros((m, k), jnp.int8), jnp.zeros(
      (n, k // 2), jnp.uint8)).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("griddepcontrol.wait") == 1
  assert ("cp.async.bulk.prefetch.tensor" in text) == (prefetch > 0)


def test_pdl_settings_are_checked():
  with pytest.raises(ValueError, match="pdl_prefetch=2 must be >= 0, and 0"
                     " without pdl"):
    dm.DecodeMatmulConfig(pdl_prefetch=2)
  with pytest.raises(ValueError, match="decode_pdl_prefetch=1 must be >= 0,"
                     " and 0 without decode_pdl"):
    kernels_lib.Kernels(decode_pdl_prefetch=1)


@pytest.mark.parametrize("online_hadamard", [False, True])
def test_linears_pass_pdl_to_the_quantizer_and_the_matmul(
    monkeypatch, online_hadamard):
  """Kernels(decode_pdl=True) with the Mosaic decode matmul: the quantizer
  gets launch_dependents and the matmul a pdl config; without it, neither
  (the kernels themselves stubbed: no CPU runs Mosaic)."""
  seen = []
  fake_quant = lambda x, *a, out_rows=None, launch_dependents=False, **kw: (
      seen.append(("quantizer", launch_dependents))
      or (jnp.zeros((out_rows or x.shape[0], x.shape[1]), jnp.int8),
          jnp.ones((out_rows or x.shape[0],), jnp.float32)))
  monkeypatch.setattr(qlinear.rq_lib, "rms_norm_quant", fake_quant)
  monkeypatch.setattr(qlinear.hq_lib, "hadamard_quant", fake_quant)
  monkeypatch.setattr(qlinear.decode_lib, "can_use_decode_matmul",
                      lambda *a: True)

  def fake_matmul(x, w_q, s_w, s_x=None, *, config=None, rows=None, **kw):
    seen.append(("matmul", config is not None and config.pdl))
    return jnp.zeros((rows or x.shape[0], w_q.shape[0]), jnp.bfloat16)
  monkeypatch.setattr(qlinear.decode_lib, "decode_matmul", fake_matmul)
  p = {"qweight": jnp.zeros((128, 128), jnp.uint8),
       "wscale": jnp.ones((128,), jnp.float32)}
  spec = quant.QuantSpec(bits=4, clip_ratio=0.9)
  extra = {} if online_hadamard else dict(
      norm=(jnp.ones((256,), jnp.bfloat16), 1e-5))
  for flag in (True, False):
    kernels = kernels_lib.Kernels(decode_matmul="mosaic",
                                  hadamard_quant="pallas",
                                  rms_norm_quant="pallas", decode_pdl=flag)
    qlinear.linears(jnp.ones((1, 256), jnp.bfloat16), [p, p], a_spec=spec,
                    online_hadamard=online_hadamard, kernels=kernels,
                    **extra)
  assert seen == [("quantizer", True), ("matmul", True), ("matmul", True),
                  ("quantizer", False), ("matmul", False),
                  ("matmul", False)]


@pytest.mark.gpu
@pytest.mark.parametrize("name, k", _CASES)
def test_gpu_trigger_changes_nothing(name, k):
  x = _x(1, k, seed=k + 2)
  run = _QUANTIZERS[name]
  for got, want in zip(run(x, launch_dependents=True), run(x)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_decode_matmul_with_pdl_is_bit_equal(m, prefetch):
  if not dm.is_hopper():
    pytest.skip("the Mosaic GPU kernel needs a Hopper GPU")
  # K = 11 blocks of 128 over 3 splits: a short last split to prefetch in.
  base = dm.DecodeMatmulConfig(block_n=64, block_k=128, split_k=3,
                               w4a4_mma="int8")
  pdl = dataclasses.replace(base, pdl=True, pdl_prefetch=prefetch)
  kx, kw, ks = jax.random.split(jax.random.key(m), 3)
  x = jax.random.randint(kx, (m, 1408), -8, 8, jnp.int8)
  w_q = jax.random.randint(kw, (192, 704), 0, 256, jnp.int32).astype(
      jnp.uint8)
  s_w = jax.random.uniform(ks, (192,), jnp.float32, 0.5, 2.0)
  s_x = jnp.linspace(0.5, 1.5, m, dtype=jnp.float32)
  run = lambda cfg: dm.decode_matmul(x, w_q, s_w, s_x, config=cfg,
                                     implementation="mosaic")
  np.testing.assert_array_equal(np.asarray(run(pdl), np.float32),
                                np.asarray(run(base), np.float32))
  np.testing.assert_array_equal(
      np.asarray(run(pdl), np.float32),
      np.asarray(dm.decode_matmul_reference(x, w_q, s_w, s_x), np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_decode_linears_with_pdl_are_bit_equal(m, prefetch):
  """A packed q/k/v-like decode (norm + quantize, three matmuls) and an
  o_proj-like one (Hadamard + quantize), with and without PDL."""
  if not dm.is_hopper():
    pytest.skip("PDL runs the Mosaic decode matmul: a Hopper GPU")
  auto = kernels_lib.resolve("auto")
  pdl = dataclasses.replace(auto, decode_pdl=True,
                            decode_pdl_prefetch=prefetch)
  spec = quant.QuantSpec(bits=4, clip_ratio=0.9)
  keys = jax.random.split(jax.random.key(m), 4)
  ps = [qlinear.pack_weight(quant.quantize(
      jax.random.normal(kk, (n, 4096), jnp.float32),
      quant.QuantSpec(bits=4, symmetric=True)))
        for kk, n in zip(keys, (4096, 1024, 1024))]
  x = _x(m, 4096, seed=7)
  norm = (jnp.ones((4096,), jnp.bfloat16), 1e-5)
  for online_hadamard, extra in ((False, dict(norm=norm)), (True, {})):
    run = lambda kernels: jax.jit(lambda x: qlinear.linears(
        x, ps, a_spec=spec, online_hadamard=online_hadamard,
        kernels=kernels, **extra))(x)
    for got, want in zip(run(pdl), run(auto)):
      np.testing.assert_array_equal(np.asarray(got, np.float32),
                                    np.asarray(want, np.float32))

