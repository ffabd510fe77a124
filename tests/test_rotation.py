"""Invariance tests: every rotation step leaves fp32 logits unchanged."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarot_jax import hf
from quarot_jax import model
from quarot_jax import rotation
from tests import hf_models


def _logits(params, config, tokens, options=model.FLOAT):
  return np.asarray(model.forward(params, tokens, config, options=options)[0])


def _assert_same(got, want):
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel <= 1e-4, rel


@pytest.fixture(scope="module", params=hf_models.FAMILIES)
def tiny(request):
  params, config = hf.load_hf(hf_models.tiny_hf_model(request.param)[0])
  tokens = hf_models.random_tokens(config.vocab_size, 2, 16)
  return params, config, tokens, _logits(params, config, tokens)


def test_fuse_norms_is_invariant(tiny):
  params, config, tokens, want = tiny
  fused = rotation.fuse_norms(params, config)
  assert "scale" not in fused["norm"] and "lm_head" in fused
  _assert_same(_logits(fused, config, tokens), want)


def test_rotate_residual_is_invariant(tiny):
  params, config, tokens, want = tiny
  from quarot_jax import hadamard  # pylint: disable=g-import-not-at-top
  q = hadamard.random_hadamard_matrix(config.hidden_size, jax.random.key(1))
  rotated = rotation.rotate_residual(rotation.fuse_norms(params, config), q)
  _assert_same(_logits(rotated, config, tokens), want)


def test_scale_norm_outputs_is_invariant(tiny):
  """Channel scales folded into the norm (1 / s) and the linears after it
  (rows times s) leave the float model's logits unchanged, whether the
  norm had a weight or not, and they do move the weights."""
  params, config, tokens, want = tiny
  n, d = config.num_hidden_layers, config.hidden_size
  s = jnp.exp(jax.random.uniform(jax.random.key(5), (n, 2, d),
                                 minval=-1.0, maxval=1.0))
  fused = rotation.fuse_norms(params, config)
  scaled = rotation.scale_norm_outputs(fused, s)
  _assert_same(_logits(scaled, config, tokens), want)
  np.testing.assert_allclose(
      scaled["layers"]["input_layernorm"]["scale"], 1 / s[:, 0])
  q_in = fused["layers"]["self_attn"]["q_proj"]["kernel"]
  assert np.abs(scaled["layers"]["self_attn"]["q_proj"]["kernel"]
                - q_in).max() > 1e-3
  twice = rotation.scale_norm_outputs(scaled, s)  # a norm with a weight
  _assert_same(_logits(twice, config, tokens), want)
  np.testing.assert_allclose(
      twice["layers"]["post_attention_layernorm"]["scale"],
      1 / s[:, 1] ** 2, rtol=1e-6)
  assert "scale" not in fused["layers"]["input_layernorm"]  # not mutated


def test_online_hadamards_are_invariant(tiny):
  params, config, tokens, want = tiny
  p = rotation.rotate_down_input(params)
  _assert_same(_logits(p, config, tokens, model.RunOptions(
      online_had_down=True)), want)
  p = rotation.rotate_values_and_o(params, config)
  _assert_same(_logits(p, config, tokens, model.RunOptions(
      online_had_o=True)), want)
  _assert_same(_logits(params, config, tokens, model.RunOptions(
      qk_had=True)), want)


@pytest.mark.parametrize("mode", ["hadamard", "random"])
def test_full_rotation_is_invariant(tiny, mode):
  params, config, tokens, want = tiny
  rotated = rotation.rotate(params, config, jax.random.key(0), mode=mode)
  _assert_same(_logits(rotated, config, tokens, rotation.ROTATED), want)


def test_rotation_does_not_mutate_its_input(tiny):
  params, config, _, _ = tiny
  before = jax.tree.map(np.array, params)
  rotation.rotate(params, config, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, before, params)


def test_rotation_changes_the_weights(tiny):
  # Guards against a rotation that silently does nothing.
  params, config, _, _ = tiny
  rotated = rotation.rotate(params, config, jax.random.key(0))
  down = params["layers"]["mlp"]["down_proj"]["kernel"]
  assert np.abs(rotated["layers"]["mlp"]["down_proj"]["kernel"] - down).max(
  ) > 1e-3


def test_rotation_spreads_an_outlier_channel():
  # A residual outlier channel becomes flat after the randomized Hadamard.
  from quarot_jax import hadamard  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).normal(size=(64, 576)).astype(np.float32)
  x[:, 7] *= 100
  q = np.asarray(hadamard.random_hadamard_matrix(576, jax.random.key(0)))
  ratio = lambda a: np.abs(a).max() / np.median(np.abs(a).max(axis=0))
  assert ratio(x) > 50 and ratio(x @ q) < 5


def test_unsupported_head_dim_names_the_size():
  config = dataclasses.replace(
      hf.LlamaConfig(vocab_size=11, hidden_size=36, intermediate_size=24,
                     num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=18))
  params = model.init_params(config, jax.random.key(0))
  with pytest.raises(ValueError, match="18"):
    rotation.rotate(params, config, jax.random.key(0))
