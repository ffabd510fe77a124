"""Shared pytest setup: markers and the `interpret` and `clock` fixtures."""

import gc
import time

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a GPU (run on the device)")
  config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a GPU; run through the device tool")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def interpret() -> bool:
  """True when no GPU is present: Pallas kernels run in interpret mode."""
  return not _has_gpu()


@pytest.fixture
def clock(monkeypatch):
  """`advance(seconds)`: moves `time.time()` forward (a slow step, faked)."""
  offset = [0.0]
  real_time = time.time
  monkeypatch.setattr(time, "time", lambda: real_time() + offset[0])

  def advance(seconds: float) -> None:
    offset[0] += seconds
  return advance


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drops every compiled executable after each test module.

  Each XLA:CPU executable keeps its JIT code in memory maps, and the whole
  suite in one process compiled enough of them to pass the kernel's map
  limit (vm.max_map_count, 65530): the process then aborted or segfaulted
  in a compile late in the run (2026-12-01; ~70 maps a second while tests
  compile). Clearing the caches after a module lets them be unmapped.
  """
  yield
  jax.clear_caches()
  gc.collect()
