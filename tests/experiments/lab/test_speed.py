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
  (r,) = speed.layer_prefill(_TINY, 2, 12, command="t",
                             key=jax.random.key(0))
  assert r["benchmark"] == "layer_prefill"
  _check_ratios(r)
  # Timed in this order: bf16 layer 1, ours 2, ours with XLA matmuls 3,
  # then each stage table in the order the layer runs it.
  assert (r["baselines"]["xla_bf16_layer"], r["ours_ms"],
          r["ours_xla_int8_matmul_ms"]) == (1, 2, 3)
  assert r["stages_ms"] == {
      "quantize_qkv_in": 4, "matmuls_qkv": 5, "kv4_write_and_attention": 6,
      "hadamard_quantize_o_in": 7, "matmul_o": 8, "quantize_gate_up_in": 9,
      "matmuls_gate_up": 10, "hadamard_quantize_down_in": 11,
      "matmul_down": 12}
  assert r["xla_int8_stages_ms"] == {
      "matmuls_qkv": 13, "matmul_o": 14, "matmuls_gate_up": 15,
      "matmul_down": 16, "unpack_weights": 17}
  assert r["baseline_stages_ms"] == {
      "matmuls_qkv": 18, "write_and_attention": 19, "matmul_o": 20,
      "matmuls_gate_up": 21, "matmul_down": 22}
  assert r["stage_totals_ms"] == {
      "int4_matmuls": 5 + 8 + 10 + 12, "quantize": 4 + 7 + 9 + 11,
      "xla_int8_matmuls": 13 + 14 + 15 + 16,
      "baseline_matmuls": 18 + 20 + 21 + 22}
  assert r["stage_share"] == {
      k: round(v / 2, 3) for k, v in r["stages_ms"].items()}
  assert r["baseline_stage_share"] == {
      k: round(v / 1, 3) for k, v in r["baseline_stages_ms"].items()}
  # Every timed stage is described, and nothing else.
  assert {t: set(d) for t, d in r["stages"].items()} == {
      "ours": set(r["stages_ms"]), "xla_int8": set(r["xla_int8_stages_ms"]),
      "baseline": set(r["baseline_stages_ms"])}
  # A CPU resolves 'auto' to the einsum attention, for both layers.
  assert (r["attention"], r["baseline_attention"]) == ("xla", "xla")
  assert "einsum" in r["stages"]["ours"]["kv4_write_and_attention"]


def test_layer_prefill_runs_the_variants_and_stages_asked_for():
  (r,) = speed.layer_prefill(_TINY, 2, 12, command="t",
                             key=jax.random.key(0), variants=(),
                             stages=False)
  assert (r["baselines"]["xla_bf16_layer"], r["ours_ms"]) == (1, 2)
  assert not any(k.startswith("ours_") and k != "ours_ms" for k in r)
  assert "stages_ms" not in r and "stage_totals_ms" not in r
  with pytest.raises(ValueError, match=r"unknown layer_prefill variants"
                     r" \['fast'\]"):
    speed.layer_prefill(_TINY, 2, 12, command="t", key=jax.random.key(0),
                        variants=("xla_int8", "fast"))


def test_layer_prefill_rejects_a_decode_sized_batch():
  with pytest.raises(ValueError, match="prefill stages need B \\* T = 16"):
    speed.layer_prefill(_TINY, 2, 8, command="t", key=jax.random.key(0))


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
  assert r["speedup_all_logits"] == round(
      r["baseline_all_logits_ms"] / r["ours_all_logits_ms"], 3)
  # Each packed linear [in, out] keeps in * out / 2 bytes of codes and an
  # f32 scale per output instead of in * out bf16 weights.
  widths = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32),
            "o_proj": (64, 64), "gate_proj": (64, 128),
            "up_proj": (64, 128), "down_proj": (128, 64)}
  assert len(widths) == len(quarot.LINEARS)
  saved = _TINY.num_hidden_layers * sum(
      i * o * 2 - (i * o // 2 + 4 * o) for i, o in widths.values())
  assert r["baseline_weight_bytes"] - r["ours_weight_bytes"] == saved
  assert (r["attention"], r["baseline_attention"]) == ("xla", "xla")
  assert r["logits"] == "last position"
  assert "ours_xla_int8_matmul_ms" in r


def test_model_prefill_variants_are_chosen_and_checked():
  (r,) = speed.model_prefill(_TINY, 1, 8, command="t", key=jax.random.key(0),
                             variants=())
  assert not any(k.startswith("ours_") and k.endswith("_ms") for k in r
                 if k != "ours_ms")
  with pytest.raises(ValueError, match="'cublas'"):
    speed.model_prefill(_TINY, 1, 8, command="t", key=jax.random.key(0),
                        variants=("cublas",))


def test_preset_names():
  cfg = dataclasses.replace(speed.PRESETS["llama3-8b"], num_hidden_layers=1)
  name = speed._name  # pylint: disable=protected-access
  assert name(cfg) == "llama3-8b"
  assert name(_TINY) == "d64-f128-n4-k2"


def test_check_presets_names_the_unknown_model():
  speed.check_presets(["llama2-7b"])
  with pytest.raises(ValueError, match="--models: 'llama9' is not one of"):
    speed.check_presets(["llama2-7b", "llama9"])
