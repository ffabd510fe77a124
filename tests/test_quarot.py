"""The QuaRot recipe end to end on tiny models: invariance, then quantization
error with and without rotation."""

import dataclasses

import jax
import numpy as np
import pytest

from quarot_jax import hf
from quarot_jax import model
from quarot_jax import quarot
from tests import hf_models


def _kl(p_logits, q_logits):
  """Mean per-token KL(p || q) from two f32[..., V] logit arrays."""
  p = jax.nn.log_softmax(p_logits, -1)
  q = jax.nn.log_softmax(q_logits, -1)
  return float((np.exp(p) * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def outlier_model():
  """The tiny SmolLM-like model with two outlier residual channels."""
  params, config = hf.load_hf(hf_models.tiny_hf_model("smollm")[0])
  params = jax.tree.map(np.array, params)
  for name in ("input_layernorm", "post_attention_layernorm"):
    params["layers"][name]["scale"][:, [3, 40]] *= 30.0
  tokens = hf_models.random_tokens(config.vocab_size, 2, 32, seed=5)
  logits = np.asarray(model.forward(params, tokens, config)[0])
  return params, config, tokens, logits


def _run(params, config, tokens, qconfig, calib=None):
  qparams, options = quarot.quantize(params, config, qconfig, calib,
                                     progress=False)
  return np.asarray(model.forward(qparams, tokens, config,
                                  options=options)[0])


def test_16_bit_rotated_model_is_the_float_model(outlier_model):
  params, config, tokens, want = outlier_model
  got = _run(params, config, tokens, quarot.QuaRotConfig(rotate=True))
  assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_8_bit_is_nearly_lossless_with_rotation(outlier_model):
  params, config, tokens, want = outlier_model
  got = _run(params, config, tokens, quarot.QuaRotConfig(
      w_bits=8, a_bits=8, k_bits=8, v_bits=8))
  assert _kl(want, got) < 1e-3


def test_rotation_reduces_w4a4kv4_error(outlier_model):
  params, config, tokens, want = outlier_model
  w4a4 = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4)
  kl_rot = _kl(want, _run(params, config, tokens, w4a4))
  kl_plain = _kl(want, _run(params, config, tokens,
                            dataclasses.replace(w4a4, rotate=False)))
  assert kl_rot < 0.5 * kl_plain, (kl_rot, kl_plain)


def test_gptq_beats_rtn_on_calibration_text(outlier_model):
  params, config, tokens, want = outlier_model
  calib = hf_models.random_tokens(config.vocab_size, 8, 32, seed=6)
  w4 = quarot.QuaRotConfig(w_bits=4, w_clip=False)
  calib_want = np.asarray(model.forward(params, calib, config)[0])
  kl_rtn = _kl(calib_want, _run(params, config, calib, w4))
  kl_gptq = _kl(calib_want, _run(params, config, calib, dataclasses.replace(
      w4, w_method="gptq"), calib))
  assert kl_gptq < kl_rtn, (kl_gptq, kl_rtn)


@pytest.mark.parametrize("kwargs, match", [
    (dict(w_bits=1), "w_bits=1"),
    (dict(a_bits=12), "a_bits=12"),
    (dict(w_method="awq"), "w_method='awq'"),
    (dict(rotate_mode="givens"), "rotate_mode='givens'"),
])
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    quarot.QuaRotConfig(**kwargs)


def test_gptq_needs_calibration(outlier_model):
  params, config, _, _ = outlier_model
  with pytest.raises(ValueError, match="calib_tokens"):
    quarot.quantize(params, config, quarot.QuaRotConfig(
        w_bits=4, w_method="gptq"))
