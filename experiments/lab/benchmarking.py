"""Timing helpers shared by the benchmark scripts in experiments/."""

import datetime
import json
import os
import statistics
import time
from typing import Any, Callable

import jax


def median_ms(fn: Callable[..., Any], *args, warmup: int = 3,
              runs: int = 20, inner: int = 10) -> float:
  """Median time per call of `fn(*args)` in ms.

  Each timed run dispatches `inner` calls back to back and waits once, so
  short kernels are not timed as Python dispatch plus a host sync.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / inner)
  return statistics.median(times)


def device_ms(fn: Callable[..., Any], *args,
              iterations: int = 10) -> float | None:
  """Median GPU time per call of `fn(*args)` in ms: the sum of the
  durations of the kernels it launches (CUPTI, through Mosaic GPU's
  profiler), without launch gaps or host time; None where there is no such
  timing (a CPU, or the profiler fails; the reason is printed).

  Wall-clock medians (`median_ms`) of a call of a few microseconds measure
  dispatch more than the kernel (H200, 2026-12-01: every config of a 3-15
  us kernel timed 40-60 us), so sweeps of small kernels pick by this.
  """
  timings = kernel_timings(fn, *args, iterations=iterations)
  if timings is None:
    return None
  return statistics.median(sum(t for _, t in it) for it in timings)


def kernel_timings(fn: Callable[..., Any], *args, iterations: int = 10
                   ) -> list[list[tuple[str, float]]] | None:
  """Per iteration, the (kernel name, ms) of every kernel `fn(*args)`
  launches (CUPTI through Mosaic GPU's profiler); None off the GPU or when
  the profiler fails (the reason is printed)."""
  if jax.default_backend() != "gpu":
    return None
  try:
    # pylint: disable-next=g-import-not-at-top
    from jax.experimental.mosaic.gpu import profiler
    _, timings = profiler.measure(fn, aggregate=False,
                                  iterations=iterations)(*args)
  except Exception as e:  # pylint: disable=broad-except
    print(f"  (no CUPTI timing: {type(e).__name__}: {str(e)[:200]})")
    return None
  return timings


def timed_ms(fn: Callable[..., Any], *args,
             **wall_runs: Any) -> tuple[float, dict[str, Any]]:
  """(ms, details): `device_ms` where there is one, else `median_ms`.

  details: {"timing": "device" or "wall", "wall_ms": the wall median}, to
  put in a record so that readers know which clock a figure is from.
  """
  wall = median_ms(fn, *args, **wall_runs)
  dev = device_ms(fn, *args)
  return (wall if dev is None else dev), {
      "timing": "wall" if dev is None else "device",
      "wall_ms": round(wall, 4)}


def record(benchmark: str, case: str, ours_ms: float,
           baselines: dict[str, float], *, command: str,
           **extra: Any) -> dict[str, Any]:
  """One JSONL record with speedups (baseline ms / ours ms)."""
  return {
      "benchmark": benchmark, "case": case, "ours_ms": round(ours_ms, 4),
      "baselines": {k: round(v, 4) for k, v in baselines.items()},
      "speedup": {k: round(v / ours_ms, 3) for k, v in baselines.items()},
      "device": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
      "date": datetime.date.today().isoformat(), "command": command,
      # XLA_FLAGS change what a run measures (e.g. command buffers), and
      # the command line does not show them.
      **({"xla_flags": os.environ["XLA_FLAGS"]}
         if os.environ.get("XLA_FLAGS") else {}),
      **extra,
  }


def append_jsonl(path: str, records: list[dict[str, Any]]) -> None:
  """Appends records to a JSON Lines file (creating its folder)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def summary_line(r: dict[str, Any]) -> str:
  """One printable line of a record: case, ours, baselines and ratios."""
  parts = [f"{r['benchmark']:<18} {r['case']:<36}"]
  if "ours_ms" in r:
    parts.append(f"ours {r['ours_ms']:9.3f} ms")
  for name, ms in r.get("baselines", {}).items():
    parts.append(f"{name} {ms:9.3f} ms ({r['speedup'][name]:.2f}x)")
  if "memory_ratio" in r:
    parts.append(f"memory {r['baseline_bytes'] / 2**30:.2f} GiB ->"
                 f" {r['ours_bytes'] / 2**30:.2f} GiB"
                 f" ({r['memory_ratio']:.2f}x)")
  return "  ".join(parts)
