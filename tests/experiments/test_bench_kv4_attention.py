"""The KV4 attention benchmark times the config the model runs."""

import jax
import jax.numpy as jnp
import pytest

from experiments.lab import kv4_attention_cases as cases
from pallas_kernels import kv4_decode_attention as attn


@pytest.mark.parametrize("heads", [(32, 32), (32, 8)])
@pytest.mark.parametrize("b,s", [(1, 4160), (16, 4160), (16, 32768)])
def test_sweep_starts_with_the_models_config(heads, b, s):
  n, kv_heads = heads
  # A sweep that would not reach the model's tiles on its own.
  configs = cases.sweep_configs(b, n, kv_heads, s, 128, [64], ["2x"],
                                ["auto"])
  model = attn.default_kv4_decode_attention_config(
      b, kv_heads, s, 128, query_heads=n, dtype=jnp.bfloat16)
  assert configs[0] == model
  assert configs.count(model) == 1
  assert len(configs) > 1


def test_case_records_the_models_config_time():
  r = cases.bench_case(jax.random.key(0), 1, 64, 4, 4, 64, block_sizes=[16],
                       splits=["1"], paths=["auto"], interpret=True,
                       command="test")
  model = attn.default_kv4_decode_attention_config(
      1, 4, 64, 64, query_heads=4, dtype=jnp.bfloat16)
  assert r["model_config"] == str(model)
  assert r["model_config_ms"] > 0
  assert r["ours_ms"] <= r["model_config_ms"]
