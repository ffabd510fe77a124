"""The decode benchmark on a tiny config (CPU): its launch counter reads
optimized HLO right, and its record holds what issue #14 asks for."""

import inspect

import jax
import jax.numpy as jnp
import pytest

from experiments.lab import decode_speed
from experiments.lab import kernel_profile
from quarot_jax.config import LlamaConfig

_TINY = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)


def _hlo(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_launch_count_skips_fusion_bodies():
  x = jnp.ones((8, 8), jnp.float32)
  # Elementwise ops fuse into one kernel; its body's ops are not launches.
  one = decode_speed.launch_count(_hlo(lambda a: jnp.sin(a) * 2 + 1, x))
  assert one["total"] == 1 and one["fusion"] == 1
  # A sort cannot fuse with the elementwise op after it: two launches.
  two = decode_speed.launch_count(
      _hlo(lambda a: jnp.sort(a, axis=-1) * 2 + 1, x))
  assert two["total"] == 2


def test_decode_throughput_record():
  (r,) = decode_speed.decode_throughput(
      _TINY, "tiny", 2, 8, 4, command="t", key=jax.random.key(0))
  assert (r["model"], r["batch"], r["cached"]) == ("tiny", 2, 8)
  ms = r["ours_ms_per_token"]
  assert set(ms) == {"bf16_model", "w4a4kv4_model"}
  anchor = r["baselines"]["plain_jax_bf16"]
  for name, value in ms.items():
    # The record rounds its times; its ratios come from the exact ones.
    assert value > 0
    assert r["speedup"][name] == pytest.approx(anchor / value, rel=1e-2)
    assert r["launches_per_step"][name]["total"] > 0
    # The first call compiles: slower than a timed one.
    assert r["first_call_s"][name] * 1e3 > value * 4
    floor = r["bytes_per_step"][name] / decode_speed.HBM_BYTES_PER_S * 1e3
    assert r["floor_fraction"][name] == pytest.approx(floor / value,
                                                      rel=1e-2, abs=1e-3)
  # No GPU, no trace: the profile is None (the GPU case below).
  assert r["profile_per_step"] == {"bf16_model": None, "w4a4kv4_model": None}
  # The packed model reads fewer bytes than the bf16 one.
  assert r["bytes_per_step"]["w4a4kv4_model"] < r["bytes_per_step"][
      "bf16_model"]


def test_launched_names_kinds_and_source_lines():
  def f(x, y):
    return jnp.tanh(x @ y).sum(axis=0)

  text = jax.jit(f).lower(jnp.ones((8, 8)), jnp.ones((8, 8))).compile(
  ).as_text()
  kernels = decode_speed.launched(text)
  assert kernels, text
  kinds = {kind for kind, _ in kernels}
  assert kinds <= {"fusion", "dot", "custom-call", "copy", "reduce"}, kinds
  # At least one launch is traced back to f's return line in this file.
  line = inspect.getsourcelines(f)[1] + 1
  assert any(f"test_decode_speed.py:{line}" in where
             for _, where in kernels), kernels


def test_profile_per_step_from_a_trace(monkeypatch):
  # Two steps of (a 2 µs, gap 3 µs, b 5 µs), 10 µs apart: per step 15 µs
  # span, 7 busy, 8 idle; b waited 3 µs, a 5 µs (between the steps).
  ev = lambda name, start, dur: kernel_profile.KernelEvent(
      name=name, start_ns=start, duration_ns=dur)
  events = [ev("a", 0, 2000), ev("b", 5000, 5000), ev("a", 20000, 2000),
            ev("b", 25000, 5000)]
  monkeypatch.setattr(kernel_profile, "trace_kernels",
                      lambda fn, *args: events)
  got = decode_speed._profile(None, None, None, None, steps=2)
  assert got == {"span_us": 15.0, "busy_us": 7.0, "idle_us": 8.0,
                 "busy_fraction": round(14 / 30, 3), "kernels": 2.0,
                 "top_us": [["b", 1.0, 5.0], ["a", 1.0, 2.0]],
                 "idle_before_us": [["a", 5.0], ["b", 3.0]]}


def test_a_failing_trace_is_recorded_not_raised(monkeypatch):
  def fail(fn, *args):
    raise RuntimeError("no CUPTI")
  monkeypatch.setattr(kernel_profile, "trace_kernels", fail)
  assert decode_speed._profile(None, None, None, None, steps=2) == {
      "error": "RuntimeError: no CUPTI"}
