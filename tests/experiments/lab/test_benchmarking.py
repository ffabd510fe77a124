"""Tests for experiments/lab/benchmarking.py."""

from experiments.lab import benchmarking


def test_record_speedups_and_xla_flags(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  rec = benchmarking.record("b", "c", 2.0, {"base": 5.0}, command="cmd")
  assert rec["speedup"] == {"base": 2.5}
  assert "xla_flags" not in rec
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_graph_min_graph_size=1")
  rec = benchmarking.record("b", "c", 2.0, {"base": 5.0}, command="cmd")
  assert rec["xla_flags"] == "--xla_gpu_graph_min_graph_size=1"
