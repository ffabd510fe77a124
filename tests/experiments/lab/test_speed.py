"""The speed benchmarks on a tiny config (CPU, references): they run what
they time, and their records' arithmetic and byte counts are right."""

import dataclasses
import itertools

import jax
import pytest

from experiments.lab import speed
from quarot_jax import quarot
from quarot_jax.config import LlamaConfig

_TINY = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)


@pytest.fixture(autouse=True)
def _fake_timer(monkeypatch):
  """Runs each timed function once (so it must work) and reports 1, 2, 3,
  ... ms: distinct times, so a record that mixes them up is caught."""
  clock = itertools.count(1)

  def fake(fn, *args, **kwargs):
    del kwargs
    jax.block_until_ready(fn(*args))
    return float(next(clock))

  monkeypatch.setattr(speed.benchmarking, "median_ms", fake)


def _check_ratios(r):
  for name, ms in r["baselines"].items():
    assert r["speedup"][name] == round(ms / r["ours_ms"], 3), name


def test_layer_prefill_record():
  (r,) = speed.layer_prefill(_TINY, 2, 8, command="t", key=jax.random.key(0))
  assert r["benchmark"] == "layer_prefill"
  stages = r["stages_ms"]
  assert set(stages) == {
      "quantize_qkv_in", "hadamard_quantize_o_in", "quantize_gate_up_in",
      "hadamard_quantize_down_in", "int4_matmuls", "int4_matmuls_xla_int8",
      "kv4_quantize_and_attention"}
  _check_ratios(r)
  # Timed in this order: bf16 layer 1, ours 2, ours with XLA matmuls 3,
  # then the stages: four quantizers 4..7, the seven matmuls 8..14 (summed),
  # again with XLA 15..21, the KV4 attention 22.
  assert (r["baselines"]["xla_bf16_layer"], r["ours_ms"],
          r["ours_xla_int8_matmul_ms"]) == (1, 2, 3)
  assert stages["int4_matmuls"] == sum(range(8, 15))
  assert stages["int4_matmuls_xla_int8"] == sum(range(15, 22))
  assert stages["kv4_quantize_and_attention"] == 22
  assert r["stage_share"] == {k: round(v / 2, 3) for k, v in stages.items()}


def test_decode_memory_counts_bytes():
  (m,) = speed.decode_memory(_TINY, 2, 6, 3, command="t")
  # bf16 cache: 2 (k, v) * L * B * S * K * H * 2 bytes.
  assert m["baseline_breakdown"]["cache"] == 2 * 2 * 2 * 9 * 2 * 16 * 2
  # KV4: 8 packed bytes + f32 scale + uint8 zero per (token, head), H=16.
  assert m["ours_breakdown"]["cache"] == 2 * 2 * 2 * 9 * 2 * (8 + 4 + 1)
  assert m["memory_ratio"] == round(m["baseline_bytes"] / m["ours_bytes"], 3)


def test_model_prefill_record_and_weight_bytes():
  (r,) = speed.model_prefill(_TINY, 1, 8, command="t", key=jax.random.key(0))
  _check_ratios(r)
  # Each packed linear [in, out] keeps in * out / 2 bytes of codes and an
  # f32 scale per output instead of in * out bf16 weights.
  widths = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32),
            "o_proj": (64, 64), "gate_proj": (64, 128),
            "up_proj": (64, 128), "down_proj": (128, 64)}
  assert len(widths) == len(quarot.LINEARS)
  saved = _TINY.num_hidden_layers * sum(
      i * o * 2 - (i * o // 2 + 4 * o) for i, o in widths.values())
  assert r["baseline_weight_bytes"] - r["ours_weight_bytes"] == saved


def test_preset_names():
  cfg = dataclasses.replace(speed.PRESETS["llama3-8b"], num_hidden_layers=1)
  name = speed._name  # pylint: disable=protected-access
  assert name(cfg) == "llama3-8b"
  assert name(_TINY) == "d64-f128-n4-k2"
