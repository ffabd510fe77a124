"""Where a jitted call's GPU time goes, from a `jax.profiler` trace.

Issue #14 asks which floor binds a decode step: bytes (the kernels run long),
or launches (the GPU waits between short kernels). The trace answers it
directly: `busy` is the union of the kernels' intervals on the device, `span`
the time from the first kernel's start to the last one's end; span - busy is
the time the GPU sat idle between kernels. `by_name` sums each kernel name's
time (XLA fusions are named after their root op, Pallas calls after the
kernel).

On a CPU the trace has no device plane: `device_kernels` returns [].
"""

import dataclasses
import glob
import os
import tempfile
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelEvent:
  """One kernel (or memcpy) on a device stream; times in ns."""
  name: str
  start_ns: float
  duration_ns: float


def device_kernels(xspace_path: str) -> list[KernelEvent]:
  """The events on the GPU planes' stream lines of a saved trace."""
  data = jax.profiler.ProfileData.from_file(xspace_path)
  out = []
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if not line.name.startswith("Stream"):  # not the derived op lines
        continue
      out.extend(KernelEvent(name=e.name, start_ns=e.start_ns,
                             duration_ns=e.duration_ns) for e in line.events)
  return sorted(out, key=lambda e: e.start_ns)


def busy_ns(events: list[KernelEvent]) -> float:
  """The union of the events' intervals (overlapping streams count once)."""
  total, end = 0.0, None
  for e in sorted(events, key=lambda e: e.start_ns):
    stop = e.start_ns + e.duration_ns
    if end is None or e.start_ns >= end:
      total += e.duration_ns
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def check_events(events: list[KernelEvent], count: int,
                 name: str = "calls") -> None:
  """Raises ValueError for no events, or a count (of calls, steps) < 1
  named `name` in the message."""
  if not events:
    raise ValueError("no device kernels in the trace (run on a GPU)")
  if count < 1:
    raise ValueError(f"{name}={count} must be >= 1")


def summarize(events: list[KernelEvent], calls: int = 1) -> dict[str, Any]:
  """Per call: span, busy and idle µs, kernel count, and time by name.

  Args:
    events: the kernels of `calls` calls (e.g. from `device_kernels`).
    calls: what to divide by (decode steps traced).

  Returns:
    {'span_us', 'busy_us', 'idle_us', 'busy_fraction', 'kernels',
    'by_name': [(name, count, µs), ...] largest first, 'idle_before':
    [(name, µs), ...] the idle time just before each name's kernels (the
    launches the GPU waited for), largest first}, all per call.

  Raises:
    ValueError: no events, or calls < 1.
  """
  check_events(events, calls)
  span = (max(e.start_ns + e.duration_ns for e in events)
          - min(e.start_ns for e in events))
  busy = busy_ns(events)
  by, waits = {}, {}
  end = None
  for e in sorted(events, key=lambda e: e.start_ns):
    n, t = by.get(e.name, (0, 0.0))
    by[e.name] = (n + 1, t + e.duration_ns)
    if end is not None and e.start_ns > end:  # the GPU waited for this one
      waits[e.name] = waits.get(e.name, 0.0) + e.start_ns - end
    stop = e.start_ns + e.duration_ns
    end = stop if end is None else max(end, stop)
  per_call = lambda d: sorted(((k, v / calls / 1e3) for k, v in d.items()),
                              key=lambda x: -x[1])
  by_name = sorted(((k, n / calls, t / calls / 1e3)
                    for k, (n, t) in by.items()), key=lambda x: -x[2])
  return {"span_us": span / calls / 1e3, "busy_us": busy / calls / 1e3,
          "idle_us": (span - busy) / calls / 1e3,
          "busy_fraction": busy / span if span else 0.0,
          "kernels": len(events) / calls, "by_name": by_name,
          "idle_before": per_call(waits)}


def trace_kernels(fn: Callable[..., Any], *args,
                  trace_dir: str | None = None) -> list[KernelEvent]:
  """Runs `fn(*args)` once under `jax.profiler.trace` (call it once before,
  so that compilation stays out) and returns its device kernels."""
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="kernel_profile_")
  with jax.profiler.trace(trace_dir):
    jax.block_until_ready(fn(*args))
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                    recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  return device_kernels(max(paths, key=os.path.getmtime))


def table(summary: dict[str, Any], top: int = 12) -> str:
  """`summarize`'s result as lines a person reads."""
  lines = [f"  span {summary['span_us']:8.1f} us  busy {summary['busy_us']:8.1f}"
           f" us ({summary['busy_fraction']:.0%})  idle"
           f" {summary['idle_us']:8.1f} us  {summary['kernels']:.0f} kernels"]
  for name, n, us in summary["by_name"][:top]:
    lines.append(f"    {us:8.1f} us  {n:6.1f}x  {name[:70]}")
  lines.append("  idle just before:")
  for name, us in summary["idle_before"][:top // 2]:
    lines.append(f"    {us:8.1f} us  {name[:70]}")
  return "\n".join(lines)
