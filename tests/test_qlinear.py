"""Packed int4 linears: packing, the real linear against simulated
quantization, and the errors for configs the kernels do not run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_matmul
from pallas_kernels import hadamard_quant as hq
from pallas_kernels.w4a4_matmul import api as w4a4_api
from quarot_jax import hadamard
from quarot_jax import kernels
from quarot_jax import layers
from quarot_jax import qlinear
from quarot_jax import quant

_W_SPEC = quant.QuantSpec(bits=4, mse_clip=False)
_A_SPEC = quant.activation_spec(4)


def _weight_and_input(k=64, n=48, m=5, seed=0):
  kw, kx = jax.random.split(jax.random.key(seed))
  kernel = jax.random.normal(kw, (k, n)) / np.sqrt(k)  # [in, out]
  x = jax.random.normal(kx, (m, k))
  return kernel, x


def _simulated(x, kernel, a_spec, online_hadamard, w_spec=_W_SPEC):
  """What the float model computes with fake quantization."""
  if online_hadamard:
    x = hadamard.fast_hadamard_transform(x)
  if a_spec is not None:
    x = quant.fake_quant(x, a_spec)
  w = quant.fake_quant_weight(kernel, w_spec)
  return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)


def test_pack_weight_keeps_codes_and_scales():
  kernel, _ = _weight_and_input()
  q = quant.quantize_weight(kernel, _W_SPEC)
  p = qlinear.pack_weight(q)
  assert p["qweight"].shape == (48, 32) and p["qweight"].dtype == jnp.uint8
  np.testing.assert_array_equal(
      np.asarray(quant.unpack_int4(p["qweight"], signed=True)),
      np.asarray(q.values))
  np.testing.assert_array_equal(np.asarray(p["wscale"]),
                                np.asarray(q.scale[:, 0]))


@pytest.mark.parametrize("group_size", [None, 16])
def test_pack_weight_takes_asymmetric_weights_already_packed(group_size):
  # quant.pack'd asymmetric QArrays (unsigned codes in nibbles) pack to the
  # same params as the unpacked ones.
  kernel, _ = _weight_and_input(seed=5)
  w_spec = quant.QuantSpec(bits=4, symmetric=False, group_size=group_size,
                           mse_clip=False)
  q = quant.quantize_weight(kernel + 0.05, w_spec)
  want = qlinear.pack_weight(q)
  got = qlinear.pack_weight(quant.pack(q))
  assert set(got) == set(want) == {"qweight", "wscale", "wzero"}
  for name in want:
    np.testing.assert_array_equal(np.asarray(got[name]),
                                  np.asarray(want[name]))


@pytest.mark.parametrize("online_hadamard", [False, True])
@pytest.mark.parametrize("a_bits", [4, 16])
def test_linear_matches_simulated_quantization(online_hadamard, a_bits):
  kernel, x = _weight_and_input()
  p = qlinear.pack_weight(quant.quantize_weight(kernel, _W_SPEC))
  a_spec = _A_SPEC if a_bits == 4 else None
  want = _simulated(x, kernel, a_spec, online_hadamard)
  got = qlinear.linear(x, p, a_spec=a_spec, online_hadamard=online_hadamard)
  # Same integer codes and scales; only f32 summation order differs.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                             rtol=1e-5, atol=1e-5 * float(
                                 jnp.abs(want).max()))


@pytest.mark.parametrize("setting", ["xla", "interpret"])
@pytest.mark.parametrize("a_bits", [4, 16])
@pytest.mark.parametrize("m", [3, 40])  # decode-sized and prefill-sized
def test_group_scaled_linear_matches_simulated_quantization(setting, a_bits,
                                                            m):
  # Weight scales per group of 16 inputs: packed as wscale [out, in / 16];
  # W4A4 runs the grouped prefill kernel at every m (no decode_matmul),
  # W4A16 one XLA dot per group on the int4 values.
  kernel, x = _weight_and_input(m=m)
  w_spec = quant.QuantSpec(bits=4, group_size=16, mse_clip=False)
  p = qlinear.pack_weight(quant.quantize_weight(kernel, w_spec))
  assert p["wscale"].shape == (48, 4) and qlinear.is_grouped(p)
  a_spec = _A_SPEC if a_bits == 4 else None
  want = _simulated(x, kernel, a_spec, True, w_spec)
  got = qlinear.linear(x, p, a_spec=a_spec, online_hadamard=True,
                       kernels=kernels.resolve(setting))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                             rtol=1e-5, atol=1e-5 * float(
                                 jnp.abs(want).max()))
  # The simulated twin holds the same weights.
  back = qlinear.dequantize_weight(p)
  np.testing.assert_array_equal(
      np.asarray(back), np.asarray(quant.fake_quant_weight(kernel, w_spec).T))


@pytest.mark.parametrize("online_hadamard", [False, True])
def test_decode_codes_come_padded_from_the_quantizer(online_hadamard,
                                                     monkeypatch):
  # o_proj / down_proj at decode: hadamard_quant writes decode_matmul's
  # padding rows (no pad of x or of the codes in a launch of its own), and
  # the result is the unpadded linear's.
  kernel, x = _weight_and_input(k=64, n=40, m=3)
  p = qlinear.pack_weight(quant.quantize_weight(kernel, _W_SPEC))
  interpret = kernels.resolve("interpret")
  run = lambda: qlinear.linear(x, p, a_spec=_A_SPEC,
                               online_hadamard=online_hadamard,
                               kernels=interpret)
  want = qlinear.linear(x, p, a_spec=_A_SPEC, online_hadamard=online_hadamard,
                        kernels=kernels.XLA)
  seen, real = [], decode_matmul.decode_matmul
  def spy(x, *args, rows=None, **kw):
    seen.append((x.shape[0], rows))
    return real(x, *args, rows=rows, **kw)
  monkeypatch.setattr(decode_matmul, "decode_matmul", spy)
  got = run()
  mp = decode_matmul.padded_rows(3, interpret.decode_matmul)
  assert mp > 3 and seen == [(mp, 3)], seen
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("a_bits, m, dtype, names", [
    # Up to 16 tokens: the decode matmul (W4A16 only for bf16 inputs).
    (4, 3, jnp.float32, ("hadamard_quant", "decode_matmul")),
    (16, 3, jnp.bfloat16, ("decode_matmul",)),
    (16, 3, jnp.float32, ("w4a16_matmul",)),
    (4, 20, jnp.float32, ("hadamard_quant", "w4a4_matmul_triton")),
    (16, 20, jnp.float32, ("w4a16_matmul",)),
])
def test_linear_runs_the_kernels_it_is_given(a_bits, m, dtype, names):
  kernel, x = _weight_and_input(k=576, n=40, m=m, seed=1)
  p = qlinear.pack_weight(quant.quantize_weight(kernel, _W_SPEC))
  p["bias"] = jax.random.normal(jax.random.key(2), (40,))
  x = x.reshape(1, m, 576).astype(dtype)
  a_spec = _A_SPEC if a_bits == 4 else None
  run = lambda k: qlinear.linear(x, p, a_spec=a_spec, online_hadamard=True,
                                 kernels=k)
  interpret = kernels.resolve("interpret")
  jaxpr = str(jax.make_jaxpr(lambda: run(interpret))())
  assert all(name in jaxpr for name in names), names
  other = "decode_matmul" if m > 16 or "decode_matmul" not in names else (
      "w4a4_matmul_triton")
  assert other not in jaxpr
  assert "pallas_call" not in str(jax.make_jaxpr(lambda: run(kernels.XLA))())
  want = run(kernels.XLA)
  got = run(interpret)
  assert got.shape == (1, m, 40) and got.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=tol,
                             atol=tol * float(jnp.abs(want).max()))


@pytest.mark.parametrize("a_bits, m", [(4, 3), (4, 20), (16, 3), (16, 20)])
@pytest.mark.parametrize("setting", ["xla", "interpret"])
def test_a_residual_is_the_linear_plus_the_residual(a_bits, m, setting,
                                                    monkeypatch):
  # o_proj/down_proj take the decoder's residual stream: the result is
  # `linear + residual` bit for bit (bf16, as the model runs), at decode
  # and prefill; `w4a4_matmul` (prefill, or decode without decode_matmul)
  # is handed the residual to add in its epilogue, the rest add it after.
  kernel, x = _weight_and_input(k=256, n=40, m=m, seed=3)
  p = qlinear.pack_weight(quant.quantize_weight(kernel, _W_SPEC))
  x = x.reshape(1, m, 256).astype(jnp.bfloat16)
  r = (jax.random.normal(jax.random.key(4), (1, m, 40)) * 8).astype(
      jnp.bfloat16)
  a_spec = _A_SPEC if a_bits == 4 else None
  k = kernels.resolve(setting)
  handed, real = [], w4a4_api.w4a4_matmul
  def spy(*args, residual=None, **kw):
    handed.append(residual is not None)
    return real(*args, residual=residual, **kw)
  monkeypatch.setattr(w4a4_api, "w4a4_matmul", spy)
  run = lambda **kw: qlinear.linear(x, p, a_spec=a_spec,
                                    online_hadamard=True, kernels=k, **kw)
  y = run()
  handed.clear()
  got = run(residual=r)
  w4a4 = a_bits == 4 and (m > kernels.DECODE_ROWS
                          or k.decode_matmul == "xla")
  assert handed == ([True] if w4a4 else []), handed
  assert got.shape == (1, m, 40) and got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(y + r, np.float32))


@pytest.mark.parametrize("a_bits, m", [(4, 3), (4, 20), (16, 20)])
@pytest.mark.parametrize("setting", ["xla", "interpret"])
def test_gate_up_input_is_the_linear_of_its_swiglu(a_bits, m, setting):
  # down_proj handed the fused gate/up output: the linear of the model's
  # SwiGLU of it, bit for bit, at decode and prefill, W4A4 and W4A16.
  kernel, x = _weight_and_input(k=256, n=40, m=m, seed=5)
  p = qlinear.pack_weight(quant.quantize_weight(kernel, _W_SPEC))
  gate_up = (3 * jax.random.normal(jax.random.key(6), (1, m, 512))).astype(
      jnp.bfloat16)
  a_spec = _A_SPEC if a_bits == 4 else None
  run = lambda v, **kw: qlinear.linear(
      v, p, a_spec=a_spec, online_hadamard=True,
      kernels=kernels.resolve(setting), **kw)
  got = run(gate_up, gate_up=True)
  want = run(layers.swiglu(gate_up[..., :256], gate_up[..., 256:]))
  assert got.shape == (1, m, 40)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))
  with pytest.raises(ValueError, match="takes no pre-norm"):
    qlinear.linears(gate_up, [p], a_spec=a_spec, online_hadamard=False,
                    norm=(jnp.ones(512), 1e-5), gate_up=True)


def test_a_residual_must_match_the_output():
  kernel, x = _weight_and_input(k=64, n=48, m=5)
  p = qlinear.pack_weight(quant.quantize_weight(kernel, _W_SPEC))
  with pytest.raises(ValueError, match=r"residual must be float32\[5, 48\]"):
    qlinear.linear(x, p, a_spec=_A_SPEC, online_hadamard=False,
                   residual=jnp.zeros((5, 40)))
  with pytest.raises(ValueError, match="for 2 linears"):
    qlinear.linears(x, [p, p], a_spec=_A_SPEC, online_hadamard=False,
                    residual=jnp.zeros((5, 48)))


def test_linears_quantize_the_input_once(monkeypatch):
  x = jax.random.normal(jax.random.key(3), (2, 64))
  ps = [qlinear.pack_weight(quant.quantize_weight(
      _weight_and_input(k=64, n=n, seed=s)[0], _W_SPEC))
        for s, n in ((4, 48), (5, 16), (6, 16))]
  interpret = kernels.resolve("interpret")
  calls = []
  quantize = qlinear.hq_lib.hadamard_quant
  monkeypatch.setattr(qlinear.hq_lib, "hadamard_quant",
                      lambda *a, **k: calls.append(1) or quantize(*a, **k))
  ys = qlinear.linears(x, ps, a_spec=_A_SPEC, online_hadamard=False,
                       kernels=interpret)
  assert len(calls) == 1
  for p, y in zip(ps, ys):
    one = qlinear.linear(x, p, a_spec=_A_SPEC, online_hadamard=False,
                         kernels=interpret)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(one))
  assert len(calls) == 4


@pytest.mark.parametrize("a_bits, m, fused", [
    (4, 3, True),     # decode: one rms_norm_quant launch
    (4, 20, True),    # prefill: one rms_norm_quant launch too
    (16, 3, False),   # float activations: the norm, then the matmul
])
def test_linears_with_a_pre_norm_are_the_norm_then_linears(a_bits, m, fused):
  ps = [qlinear.pack_weight(quant.quantize_weight(
      _weight_and_input(k=576, n=n, seed=s)[0], _W_SPEC))
        for s, n in ((7, 64), (8, 40))]
  kx, kw = jax.random.split(jax.random.key(m))
  x = (4.0 * jax.random.normal(kx, (1, m, 576))).astype(jnp.bfloat16)
  w = (1.0 + 0.3 * jax.random.normal(kw, (576,))).astype(jnp.bfloat16)
  a_spec = _A_SPEC if a_bits == 4 else None
  interpret = kernels.resolve("interpret")
  run = lambda x, k, norm=None: qlinear.linears(
      x, ps, a_spec=a_spec, online_hadamard=False, kernels=k, norm=norm)
  jaxpr = str(jax.make_jaxpr(lambda: run(x, interpret, (w, 1e-5)))())
  assert ("rms_norm_quant" in jaxpr) == fused
  if fused and m <= 16:  # codes padded to decode_matmul's rows: no pad
    seen = []
    real = decode_matmul.decode_matmul
    def spy(x, *args, rows=None, **kw):
      seen.append((x.shape[0], rows))
      return real(x, *args, rows=rows, **kw)
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(decode_matmul, "decode_matmul", spy)
      run(x, interpret, (w, 1e-5))
    mp_rows = decode_matmul.padded_rows(m, interpret.decode_matmul)
    assert mp_rows > m and seen == [(mp_rows, m)] * len(ps), seen
  normed = layers.rms_norm(x, w, eps=1e-5)
  for k in (interpret, kernels.XLA):
    got, want = run(x, k, (w, 1e-5)), run(normed, k)
    for g, y in zip(got, want):  # the same codes and scales: bit for bit
      assert g.shape == y.shape and g.dtype == jnp.bfloat16
      np.testing.assert_array_equal(np.asarray(g, np.float32),
                                    np.asarray(y, np.float32))


def test_pack_params_replaces_kernels_only():
  params = {"layers": {"mlp": {
      "down_proj": {"kernel": jnp.ones((2, 8, 4))},
      "up_proj": {"kernel": jnp.ones((2, 4, 8))}}}, "norm": {"scale": 1.0}}
  qarrays = qlinear.quantize_weights_rtn(params, [("mlp", "down_proj")],
                                         _W_SPEC)
  packed = qlinear.pack_params(params, qarrays)
  assert set(packed["layers"]["mlp"]["down_proj"]) == {"qweight", "wscale"}
  assert packed["layers"]["mlp"]["down_proj"]["qweight"].shape == (2, 4, 4)
  assert packed["layers"]["mlp"]["up_proj"] is params["layers"]["mlp"][
      "up_proj"]
  assert "kernel" in params["layers"]["mlp"]["down_proj"]  # input untouched
  assert qlinear.is_packed(packed) and not qlinear.is_packed(params)


def test_unsupported_weights_and_activations_raise():
  kernel, x = _weight_and_input()
  with pytest.raises(NotImplementedError, match="4-bit weights, got bits=8"):
    qlinear.pack_weight(quant.quantize_weight(
        kernel, quant.QuantSpec(bits=8)))
  with pytest.raises(NotImplementedError, match="even weight group size"):
    qlinear.pack_weight(quant.quantize_weight(
        kernel, quant.QuantSpec(bits=4, group_size=1)))
  p = qlinear.pack_weight(quant.quantize_weight(kernel, _W_SPEC))
  with pytest.raises(NotImplementedError, match="4-bit symmetric per token"):
    qlinear.linear(x, p, a_spec=quant.activation_spec(8),
                   online_hadamard=False)
  # Asymmetric weights carry zero points that only the float-activation
  # (W4A16) path applies.
  asym = qlinear.pack_weight(quant.quantize_weight(
      kernel, quant.QuantSpec(bits=4, symmetric=False)))
  with pytest.raises(NotImplementedError,
                     match="asymmetric weights .*float activations"):
    qlinear.linear(x, asym, a_spec=_A_SPEC, online_hadamard=False)


def test_dequantize_params_is_the_simulated_model():
  params = {"layers": {"mlp": {"down_proj": {
      "kernel": jax.random.normal(jax.random.key(3), (2, 8, 6)),
      "bias": jnp.arange(6.0)}}}}
  qarrays = qlinear.quantize_weights_rtn(params, [("mlp", "down_proj")],
                                         _W_SPEC)
  back = qlinear.dequantize_params(qlinear.pack_params(params, qarrays))
  want = jax.vmap(lambda w: quant.fake_quant_weight(w, _W_SPEC))(
      params["layers"]["mlp"]["down_proj"]["kernel"])
  node = back["layers"]["mlp"]["down_proj"]
  assert set(node) == {"kernel", "bias"}
  np.testing.assert_array_equal(np.asarray(node["kernel"]), np.asarray(want))


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("setting", ["xla", "interpret"])
@pytest.mark.parametrize("m, dtype", [(3, jnp.bfloat16), (3, jnp.float32),
                                      (40, jnp.float32)])
def test_asymmetric_w4a16_linear_matches_simulated(group_size, setting, m,
                                                   dtype):
  # The paper's weight-only setting: w = s (q - z), q in [0, 15]. Packed as
  # signed codes c = q - 8 and zero points z - 8 per channel (or group), so
  # y = s (x . c) - s (z - 8) (sum of x).
  kernel, x = _weight_and_input(m=m, seed=3)
  kernel = kernel + 0.05  # a skewed range, so zero points are not 8
  w_spec = quant.QuantSpec(bits=4, symmetric=False, group_size=group_size,
                           mse_clip=False)
  q = quant.quantize_weight(kernel, w_spec)
  assert not np.all(np.asarray(q.zero) == 8)
  p = qlinear.pack_weight(q)
  assert set(p) == {"qweight", "wscale", "wzero"}
  assert p["wzero"].shape == p["wscale"].shape
  np.testing.assert_array_equal(  # the twin holds the same weights
      np.asarray(qlinear.dequantize_weight(p)),
      np.asarray(quant.fake_quant_weight(kernel, w_spec).T))
  x = x.astype(dtype)
  want = _simulated(x.astype(jnp.float32), kernel, None, True, w_spec)
  got = qlinear.linear(x, p, a_spec=None, online_hadamard=True,
                       kernels=kernels.resolve(setting))
  assert got.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want),
                             rtol=tol, atol=tol * float(jnp.abs(want).max()))
  # Not vacuous: without its zero points the packed linear is far off.
  p_no = {k: v for k, v in p.items() if k != "wzero"}
  off = qlinear.linear(x, p_no, a_spec=None, online_hadamard=True,
                       kernels=kernels.resolve(setting))
  assert float(jnp.abs(off.astype(jnp.float32) - want).max()) > 0.1 * float(
      jnp.abs(want).max())


def test_the_linear_passes_its_hadamard_config_to_the_quantizer(monkeypatch):
  # Kernels.hadamard_config reaches hadamard_quant: the persistent grid (1
  # program an SM on a 2-SM "device", so each loops) runs, and the linear
  # is the default grid's bit for bit.
  monkeypatch.setattr(hq.device_info, "num_sms", lambda: 2)
  kernel, x = _weight_and_input(k=576, n=40, m=20, seed=3)
  p = qlinear.pack_weight(quant.quantize_weight(kernel, _W_SPEC))
  x = x.reshape(1, 20, 576).astype(jnp.bfloat16)
  interpret = kernels.resolve("interpret")
  looped = dataclasses.replace(interpret, hadamard_config=(
      hq.HadamardQuantConfig(programs_per_sm=1, column_splits=1)))
  run = lambda k: qlinear.linear(x, p, a_spec=_A_SPEC, online_hadamard=True,
                                 kernels=k)
  assert "hadamard_quant_loop" in str(jax.make_jaxpr(lambda: run(looped))())
  assert "hadamard_quant_loop" not in str(
      jax.make_jaxpr(lambda: run(interpret))())
  np.testing.assert_array_equal(np.asarray(run(looped), np.float32),
                                np.asarray(run(interpret), np.float32))
