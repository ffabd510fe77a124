"""LlamaConfig: HF fields, errors naming the field, JSON round trip."""

import pytest

from quarot_jax.config import LlamaConfig

_BASE = dict(model_type="llama", vocab_size=10, hidden_size=8,
             intermediate_size=16, num_hidden_layers=1,
             num_attention_heads=2)


def test_defaults_and_round_trip():
  config = LlamaConfig.from_hf(dict(_BASE, rope_scaling=dict(
      rope_type="llama3", factor=8.0, low_freq_factor=1.0,
      high_freq_factor=4.0, original_max_position_embeddings=8192),
                                     eos_token_id=[1, 2]))
  assert config.num_key_value_heads == 2 and config.head_dim == 4
  assert config.rope_scaling_dict["factor"] == 8.0
  assert config.eos_token_ids == (1, 2)
  assert LlamaConfig.from_dict(config.to_dict()) == config
  hash(config)  # usable as a jit static


@pytest.mark.parametrize("change, match", [
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_scaling=dict(type="yarn", factor=2.0)), "'yarn'"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads=3"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_unsupported_fields_are_named(change, match):
  with pytest.raises(ValueError, match=match):
    LlamaConfig.from_hf(dict(_BASE, **change))


def test_missing_field():
  cfg = dict(_BASE)
  del cfg["intermediate_size"]
  with pytest.raises(ValueError, match="'intermediate_size' is missing"):
    LlamaConfig.from_hf(cfg)
