"""Tests for experiments/lab/benchmarking.py."""

import jax
import jax.numpy as jnp
import pytest

from experiments.lab import benchmarking


def test_record_speedups_and_xla_flags(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  rec = benchmarking.record("b", "c", 2.0, {"base": 5.0}, command="cmd")
  assert rec["speedup"] == {"base": 2.5}
  assert "xla_flags" not in rec
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_graph_min_graph_size=1")
  rec = benchmarking.record("b", "c", 2.0, {"base": 5.0}, command="cmd")
  assert rec["xla_flags"] == "--xla_gpu_graph_min_graph_size=1"


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="CPU fallback")
def test_timed_ms_falls_back_to_wall_clock_off_the_gpu():
  fn = jax.jit(lambda x: x * 2.0)
  x = jnp.ones((8,))
  assert benchmarking.device_ms(fn, x) is None
  ms, how = benchmarking.timed_ms(fn, x, warmup=1, runs=3, inner=2)
  assert how["timing"] == "wall"
  assert ms > 0 and abs(ms - how["wall_ms"]) < 1e-4


@pytest.mark.gpu
def test_device_ms_is_kernel_time_on_the_gpu():
  # A tiny op: its kernel takes microseconds, its wall-clock call more.
  fn = jax.jit(lambda x: x * 2.0)
  x = jnp.ones((1024,))
  dev = benchmarking.device_ms(fn, x)
  ms, how = benchmarking.timed_ms(fn, x)
  assert dev is not None and 0 < dev < 0.05, dev
  assert how["timing"] == "device" and how["wall_ms"] > 0
