"""The speed benchmarks run end to end on a tiny config (CPU, references)."""

import dataclasses

import jax
import pytest

from experiments.lab import speed
from quarot_jax.config import LlamaConfig

_TINY = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)


@pytest.fixture(autouse=True)
def _few_runs(monkeypatch):
  timed = speed.benchmarking.median_ms
  fast = lambda fn, *a, **k: timed(fn, *a, warmup=1, runs=1, inner=1)
  monkeypatch.setattr(speed.benchmarking, "median_ms", fast)


def test_layer_prefill_record_has_stages():
  (r,) = speed.layer_prefill(_TINY, 2, 8, command="t", key=jax.random.key(0))
  assert r["benchmark"] == "layer_prefill" and r["ours_ms"] > 0
  assert set(r["stages_ms"]) == {
      "quantize_qkv_in", "hadamard_quantize_o_in", "quantize_gate_up_in",
      "hadamard_quantize_down_in", "int4_matmuls", "int4_matmuls_xla_int8",
      "kv4_quantize_and_attention"}
  assert r["ours_xla_int8_matmul_ms"] > 0
  assert r["speedup"]["xla_bf16_layer"] > 0


def test_decode_records_and_memory_ratio():
  (t,) = speed.decode_throughput(_TINY, 2, 6, 3, command="t",
                                 key=jax.random.key(0))
  assert t["ours_tokens_per_s"] > 0 and t["baseline_tokens_per_s"] > 0
  (m,) = speed.decode_memory(_TINY, 2, 6, 3, command="t")
  # bf16 cache: 2 (k, v) * L * B * S * K * H * 2 bytes.
  assert m["baseline_breakdown"]["cache"] == 2 * 2 * 2 * 9 * 2 * 16 * 2
  # KV4: 8 packed bytes + f32 scale + uint8 zero per (token, head), H=16.
  assert m["ours_breakdown"]["cache"] == 2 * 2 * 2 * 9 * 2 * (8 + 4 + 1)
  assert m["memory_ratio"] > 1


def test_model_prefill_and_preset_names():
  (r,) = speed.model_prefill(_TINY, 1, 8, command="t", key=jax.random.key(0))
  assert r["ours_weight_bytes"] < r["baseline_weight_bytes"]
  cfg = dataclasses.replace(speed.PRESETS["llama3-8b"], num_hidden_layers=1)
  assert speed._name(cfg) == "llama3-8b"  # pylint: disable=protected-access
