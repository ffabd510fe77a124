"""kernel_profile: busy time as a union of intervals, the per-call summary,
and a CPU trace (no device plane: no kernels)."""

import jax
import jax.numpy as jnp
import pytest

from experiments.lab import kernel_profile as kp


def _ev(name, start, dur):
  return kp.KernelEvent(name=name, start_ns=start, duration_ns=dur)


def test_busy_counts_overlaps_once_and_skips_gaps():
  # [0, 10) and [5, 20) overlap: 20; a gap to [30, 35): 5 more; [31, 33)
  # lies inside it: nothing.
  events = [_ev("a", 30, 5), _ev("b", 0, 10), _ev("c", 5, 15),
            _ev("d", 31, 2)]
  assert kp.busy_ns(events) == 25
  assert kp.busy_ns([]) == 0


def test_summarize_per_call():
  # Two calls of (k1 2 µs, gap 3 µs, k2 5 µs): span 2 * 10 + the 10 µs
  # between the calls = 30 µs, busy 14 µs, per call: 15 / 7 / 8.
  events = [_ev("k1", 0, 2000), _ev("k2", 5000, 5000),
            _ev("k1", 20000, 2000), _ev("k2", 25000, 5000)]
  s = kp.summarize(events, calls=2)
  assert s["span_us"] == 15 and s["busy_us"] == 7 and s["idle_us"] == 8
  assert s["kernels"] == 2
  assert s["by_name"] == [("k2", 1, 5), ("k1", 1, 2)]
  # Idle before k2: 3 µs twice; before the second k1: 10 µs.
  assert s["idle_before"] == [("k1", 5), ("k2", 3)]
  assert abs(s["busy_fraction"] - 14 / 30) < 1e-12
  assert "k2" in kp.table(s)


def test_summarize_errors_name_the_problem():
  with pytest.raises(ValueError, match="no device kernels"):
    kp.summarize([])
  with pytest.raises(ValueError, match="calls=0"):
    kp.summarize([_ev("a", 0, 1)], calls=0)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="CPU trace only")
def test_cpu_trace_has_no_device_kernels(tmp_path):
  fn = jax.jit(lambda x: (x @ x).sum())
  x = jnp.ones((8, 8))
  fn(x)
  assert kp.trace_kernels(fn, x, trace_dir=str(tmp_path)) == []
