"""kernels.resolve: every setting, on a CPU and on (pretended) GPUs, and the
errors; forward/generate/perplexity resolve their `kernels` argument."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarot_jax import evaluate
from quarot_jax import generation
from quarot_jax import kernels
from quarot_jax import model
from quarot_jax.config import LlamaConfig


def _pretend(monkeypatch, *, gpu: bool, hopper: bool = False,
             cuda: bool = True):
  """Makes `resolve` see this platform (it asks only these two)."""
  monkeypatch.setattr(kernels, "_platform", lambda: (gpu, hopper))
  monkeypatch.setattr(kernels, "_cuda", lambda: gpu and cuda)


def _pallas(w4a4, *, gpu=True, **kw):
  return kernels.Kernels(w4a4=w4a4, w4a16="pallas", hadamard_quant="pallas",
                         kv4_attention="pallas", decode_attention="pallas",
                         decode_matmul=w4a4, rms_norm_quant="pallas",
                         prefill_qkv="pallas",
                         layer_loop="unrolled" if gpu else "scan", **kw)


@pytest.mark.parametrize("setting", ["auto", None, "xla", "reference"])
def test_cpu_settings_run_xla(monkeypatch, setting):
  _pretend(monkeypatch, gpu=False)
  assert kernels.resolve(setting) == kernels.XLA
  assert kernels.XLA.w4a4 == "xla" and kernels.XLA.attention == "xla"
  assert not kernels.XLA.interpret


def test_interpret_runs_every_triton_kernel_in_interpret_mode(monkeypatch):
  for gpu in (False, True):
    _pretend(monkeypatch, gpu=gpu, hopper=gpu)
    assert kernels.resolve("interpret") == _pallas("triton", gpu=gpu,
                                                   interpret=True)


@pytest.mark.parametrize("setting", ["mosaic", "triton"])
def test_gpu_settings_on_a_cpu_are_errors(monkeypatch, setting):
  _pretend(monkeypatch, gpu=False)
  with pytest.raises(ValueError, match=f"kernels='{setting}' needs a GPU"):
    kernels.resolve(setting)


@pytest.mark.parametrize("hopper, auto", [(True, "mosaic"),
                                          (False, "triton")])
def test_gpu_settings(monkeypatch, hopper, auto):
  _pretend(monkeypatch, gpu=True, hopper=hopper)
  assert kernels.resolve("auto") == _pallas(auto, attention="cudnn")
  assert kernels.resolve(None) == kernels.resolve("auto")
  assert kernels.resolve("triton") == _pallas("triton", attention="cudnn")
  # XLA's ops, but a GPU decodes over per-layer weights.
  assert kernels.resolve("xla") == dataclasses.replace(
      kernels.XLA, layer_loop="unrolled")
  if hopper:
    assert kernels.resolve("mosaic") == _pallas("mosaic", attention="cudnn")
  else:
    with pytest.raises(ValueError, match="'mosaic' needs a Hopper GPU"):
      kernels.resolve("mosaic")
  _pretend(monkeypatch, gpu=True, hopper=hopper, cuda=False)  # e.g. ROCm
  assert kernels.resolve("auto").attention == "xla"


def test_resolved_kernels_pass_through_and_are_static():
  choice = kernels.Kernels(w4a4="triton", interpret=True)
  assert kernels.resolve(choice) is choice
  # Hashable and compared by value: usable as a jit static argument.
  assert hash(choice) == hash(dataclasses.replace(choice))
  f = jax.jit(lambda x, k: x + (k.w4a4 == "triton"), static_argnames="k")
  assert float(f(jnp.float32(1), k=choice)) == 2.0


def test_this_platform():
  try:
    gpu = bool(jax.devices("gpu"))
  except RuntimeError:
    gpu = False
  if not gpu:
    assert kernels.resolve(None) == kernels.XLA


@pytest.mark.parametrize("fields, match", [
    (dict(w4a4="cutlass"), "w4a4='cutlass' must be"),
    (dict(w4a16="triton"), "w4a16='triton' must be 'pallas' or 'xla'"),
    (dict(hadamard_quant="cuda"), "hadamard_quant='cuda' must be"),
    (dict(kv4_attention="mosaic"), "kv4_attention='mosaic' must be"),
    (dict(decode_attention="cudnn"), "decode_attention='cudnn' must be"),
    (dict(attention="flash"), "attention='flash' must be"),
    (dict(decode_matmul="pallas"), "decode_matmul='pallas' must be"),
    (dict(layer_loop="while"), "layer_loop='while' must be"),
    (dict(w4a4="mosaic", interpret=True),
     "'mosaic' kernels have no interpret mode"),
    (dict(decode_matmul="mosaic", interpret=True),
     "'mosaic' kernels have no interpret mode"),
])
def test_kernels_errors(fields, match):
  with pytest.raises(ValueError, match=match):
    kernels.Kernels(**fields)


def test_unknown_setting():
  with pytest.raises(ValueError, match=r"kernels='cuda' must be one of"
                     r" \('auto', 'mosaic', 'triton', 'xla', 'reference',"
                     r" 'interpret'\)"):
    kernels.resolve("cuda")


_TINY = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                    num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8)


def test_entry_points_resolve_their_setting(monkeypatch):
  _pretend(monkeypatch, gpu=False)
  params = model.init_params(_TINY, jax.random.key(0))
  tokens = jnp.array([[1, 2, 3, 4]], jnp.int32)
  want, _ = model.forward(params, tokens, _TINY)
  for setting in ("xla", "auto", kernels.XLA):
    got, _ = model.forward(params, tokens, _TINY, kernels=setting)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="kernels='cuda' must be one of"):
    model.forward(params, tokens, _TINY, kernels="cuda")
  with pytest.raises(ValueError, match="kernels='triton' needs a GPU"):
    generation.generate_tokens(params, _TINY, [[1, 2]], max_new_tokens=2,
                               kernels="triton")
  with pytest.raises(ValueError, match="kernels='mosaic' needs a GPU"):
    evaluate.perplexity(params, _TINY, np.ones((1, 4), np.int32),
                        kernels="mosaic", progress=False)
