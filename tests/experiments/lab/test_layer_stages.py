"""The layer prefill stages on a tiny config (CPU): they take inputs of the
layer's shapes (traced here; `test_speed` runs each once), and the attention
stages follow kernels.attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.lab import layer_stages
from experiments.lab import speed
from pallas_kernels import kv4_cache as kv4_lib
from quarot_jax import attention
from quarot_jax import kernels as kernels_lib
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax.config import LlamaConfig

_TINY = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
_B, _T = 2, 12


@functools.cache  # Built once per kernels (eager random inputs compile).
def _stages(kernels):
  fparams = model.init_params(_TINY, jax.random.key(0), dtype=jnp.bfloat16)
  qparams = speed.packed_like(fparams, jax.random.key(1))
  layer = lambda p: jax.tree.map(lambda a: a[0], p["layers"])
  caches = (kv_cache.cache_for(_TINY, _B, _T, dtype=jnp.bfloat16),
            kv_cache.cache_for(_TINY, _B, _T, packed=True))
  return layer_stages.prefill_stages(
      _TINY, layer(fparams), layer(qparams), _B, _T,
      options=speed.W4A4KV4.run_options(_TINY.head_dim), kernels=kernels,
      caches=caches, key=jax.random.key(2))


@pytest.fixture
def flash_calls(monkeypatch):
  """Records each `attention.flash_attention` trace; on a CPU it runs jax's
  'xla' implementation of the same call (cuDNN has no CPU path)."""
  calls = []
  real = attention.flash_attention

  def flash(*args, **kwargs):
    calls.append(kwargs)
    return real(*args, **{**kwargs, "implementation": "xla"})

  monkeypatch.setattr(attention, "flash_attention", flash)
  return calls


def test_matmul_stages_take_the_layers_shapes():
  stages = _stages(kernels_lib.Kernels(attention="xla"))
  assert {t: list(d) for t, d in stages.items()} == {
      "ours": ["quantize_qkv_in", "matmuls_qkv", "kv4_write_and_attention",
               "hadamard_quantize_o_in", "matmul_o", "quantize_gate_up_in",
               "matmuls_gate_up", "hadamard_quantize_down_in",
               "matmul_down"],
      "xla_int8": ["matmuls_qkv", "matmul_o", "matmuls_gate_up",
                   "matmul_down", "unpack_weights"],
      "baseline": ["matmuls_qkv", "write_and_attention", "matmul_o",
                   "matmuls_gate_up", "matmul_down"]}
  m, nh, kh, f = _B * _T, 4 * 16, 2 * 16, 128
  widths = {"matmuls_qkv": [nh, kh, kh], "matmul_o": [64],
            "matmuls_gate_up": [f, f], "matmul_down": [64]}
  for name, outs in widths.items():
    for table in ("ours", "xla_int8"):
      got = jax.eval_shape(stages[table][name].fn,
                           *stages[table][name].args)
      assert [(y.shape, y.dtype) for y in got] == [
          ((m, o), jnp.bfloat16) for o in outs], (table, name)
    got = jax.eval_shape(stages["baseline"][name].fn,
                         *stages["baseline"][name].args)
    assert [(y.shape, y.dtype) for y in got] == [
        ((_B, _T, o), jnp.bfloat16) for o in outs], name
  # The XLA-matmul layer's quantizer writes packed codes (two per byte).
  x_q = stages["xla_int8"]["matmul_down"].args[0]
  assert (x_q.shape, x_q.dtype) == ((m, f // 2), jnp.uint8)
  unpacked = jax.eval_shape(stages["xla_int8"]["unpack_weights"].fn,
                            *stages["xla_int8"]["unpack_weights"].args)
  assert [w.shape for w in unpacked] == [
      (nh, 64), (kh, 64), (kh, 64), (64, nh), (f, 64), (f, 64), (64, f)]


@pytest.mark.parametrize("setting", ["xla", "cudnn"])
def test_attention_stages_follow_kernels(flash_calls, setting):
  kernels = kernels_lib.Kernels(attention=setting)
  stages = _stages(kernels)
  assert layer_stages.attention_used(_TINY, kernels) == setting
  out = {}
  for table, name in (("ours", "kv4_write_and_attention"),
                      ("baseline", "write_and_attention")):
    stage = stages[table][name]
    assert ("cuDNN flash" in stage.what) == (setting == "cudnn"), stage.what
    flash_calls.clear()
    out[table] = stage.fn(*stage.args)
    # The flash path is traced (all three of `_flash_prefill`'s branches)
    # exactly when the layer would take it.
    assert bool(flash_calls) == (setting == "cudnn"), table
  (o, kc, vc), (fo, fkc, fvc) = out["ours"], out["baseline"]
  q, k, v = stages["ours"]["kv4_write_and_attention"].args[:3]
  assert o.shape == fo.shape == q.shape
  # Both stages write this step's keys and values into their caches.
  np.testing.assert_array_equal(fkc, k)
  np.testing.assert_array_equal(fvc, v)
  assert kc.codes.shape == (_B, 2, _T, 8) and bool(jnp.any(kc.codes != 0))
  assert bool(jnp.any(vc.codes != 0))
  # Each attends, causally, over exactly what its cache now holds (checked
  # against the einsum `attend` in f32; the stages compute in bf16).
  f32 = lambda a: a.astype(jnp.float32)
  kv = lambda c: f32(jnp.swapaxes(kv4_lib.dequantize_kv4(c), 1, 2))
  mask = jnp.tril(jnp.ones((_T, _T), bool))[None].repeat(_B, axis=0)
  for got, keys, values in ((o, kv(kc), kv(vc)), (fo, f32(k), f32(v))):
    want = model.attend(f32(q), keys, values, mask)
    np.testing.assert_allclose(f32(got), want, atol=2e-2, rtol=2e-2)
