"""The tensor-parallel benchmark on a tiny config over 2 CPU devices.

jax fixes its device count when it starts, so the sharded runs happen once
in a subprocess (`python -m tests.experiments.lab.test_tp_speed` with
XLA_FLAGS=--xla_force_host_platform_device_count=2; `_sharded_runs`) that
prints its results as JSON; the tests below assert on them.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.lab import kernel_profile
from experiments.lab import speed
from experiments.lab import tp_speed
from quarot_jax import sharding
from quarot_jax.config import LlamaConfig

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
# Heads, kv heads, FFN and vocabulary divide by 2; N·H / 2 = 32 and
# F / 2 = 64 have Hadamard matrices.
_TINY = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
_CASE = tp_speed.Case(decode_batches=(2,), cached=8, new_tokens=4,
                      prefill_batches=(1,), seq=8)


def _sharded_runs() -> dict:
  key = jax.random.key(0)
  out = {"records": {}, "tokens": {}}
  for tp in (1, 2):
    records, tokens = tp_speed.run_model(_TINY, "tiny", tp, _CASE,
                                         command="t", key=key)
    out["records"][tp] = records
    out["tokens"][tp] = tokens[("tp_decode", 2)]
  # Packed W4A4KV4 on the mesh quantizes o_proj/down_proj inputs per
  # shard: the same params and decode inputs as run_model's, unsharded
  # (fused q/k/v, gate/up) with row_groups = 2. Two calls: the cache is
  # rewound after each.
  kp, kd, _ = jax.random.split(key, 3)
  mesh = sharding.make_mesh(1)
  params = tp_speed.make_params(_TINY, mesh, packed=True, key=kp, fuse=True)
  cache, tok = tp_speed.decode_inputs(_TINY, 2, 12, mesh, cached=8,
                                      packed=True, key=kd)
  steps = tp_speed.decode_fn(
      _TINY, 4, options=tp_speed.run_options(_TINY, 2, packed=True),
      kernels=None, mesh=None)
  first, cache = steps(params, cache, tok)
  second, _ = steps(params, cache, tok)
  out["packed_unsharded"] = [np.asarray(first).tolist(),
                             np.asarray(second).tolist()]
  cache, _ = tp_speed.decode_inputs(_TINY, 2, 12, sharding.make_mesh(2),
                                    cached=8, packed=True, key=kd)
  out["kv4_shard"] = list(cache.k[0].codes.addressable_shards[0].data.shape)
  out["bad_heads"] = tp_speed.run_model(
      LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=1, num_attention_heads=3,
                  num_key_value_heads=1, head_dim=16),
      "odd", 2, _CASE, command="t", key=key)[0]
  out["too_big"] = tp_speed.run_model(_TINY, "tiny", 2, _CASE, command="t",
                                      key=key, limit=2**10)[0]
  out["budget_spent"] = tp_speed.run_model(
      _TINY, "tiny", 1, _CASE, command="t", key=key, deadline=0.0)[0]
  return out


@pytest.fixture(scope="module")
def runs():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=2"
      " --xla_backend_optimization_level=0"
      " --xla_llvm_disable_expensive_passes=true"))
  proc = subprocess.run(
      [sys.executable, "-m", "tests.experiments.lab.test_tp_speed"],
      cwd=_ROOT, env=env, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tp", ["1", "2"])
def test_records_hold_the_issue_fields(runs, tp):
  decode, prefill = runs["records"][tp]
  assert (decode["benchmark"], prefill["benchmark"]) == ("tp_decode",
                                                         "tp_prefill")
  for r in (decode, prefill):
    assert "error" not in r, r
    assert r["mesh"] == {"tp": int(tp)}
    assert r["model"] == "tiny" and r["kernels"] == "auto"
    for field in ("device", "jax_version", "date", "command"):
      assert r[field]
    ms = r["ours_ms_per_token"]
    assert set(ms) == {"bf16_model", "w4a4kv4_model"}
    assert all(v > 0 for v in ms.values())
    # W4A4KV4 is `ours`; bf16 the baseline, speedup = bf16 / ours.
    assert set(r["baselines"]) == {"bf16_model"}
    assert r["speedup"]["bf16_model"] == pytest.approx(
        r["baselines"]["bf16_model"] / r["ours_ms"], rel=1e-2)
    # No allocator statistics on a CPU; XLA's program sizes exist.
    assert r["peak_memory_gib"] == {"bf16_model": None,
                                    "w4a4kv4_model": None}
    assert all(v > 0 for v in r["program_bytes"].values())
    # Fused q/k/v and gate/up only on one device (as generate).
    assert r["fused"] == {"bf16_model": tp == "1", "w4a4kv4_model": tp == "1"}
  assert (decode["batch"], decode["cached"], decode["new_tokens"]) == (2, 8,
                                                                      4)
  assert decode["ours_ms"] == pytest.approx(ms_of(decode), rel=1e-2)
  assert decode["allreduce"] == {"bf16_model": None, "w4a4kv4_model": None}
  assert (prefill["batch"], prefill["seq"], prefill["cached"]) == (1, 8, 0)
  # Packed weights take fewer bytes per device than bf16, and tp = 2
  # halves the split ones.
  w = decode["weight_bytes"]
  assert w["w4a4kv4_model"] < w["bf16_model"]


def ms_of(record):
  return record["ours_ms_per_token"]["w4a4kv4_model"]


def test_tp2_splits_the_weights(runs):
  one = runs["records"]["1"][0]["weight_bytes"]
  two = runs["records"]["2"][0]["weight_bytes"]
  for label in one:
    assert two[label] < 0.75 * one[label], (one, two)


def test_sharded_decode_gives_the_unsharded_tokens(runs):
  one, two = runs["tokens"]["1"], runs["tokens"]["2"]
  assert one["bf16_model"] == two["bf16_model"]
  assert len(one["bf16_model"]) == 2 and len(one["bf16_model"][0]) == 4
  # Packed: the same options (row_groups = 2) unsharded and on the mesh.
  first, second = runs["packed_unsharded"]
  assert two["w4a4kv4_model"] == first == second
  # KV4 codes [B, K, S, H // 2] split by kv heads: 2 -> 1 per device.
  assert runs["kv4_shard"] == [2, 1, 12, 8]


def test_heads_not_divisible_are_an_error_record(runs):
  for r in runs["bad_heads"]:
    assert r["ours_ms"] is None and r["baselines"] == {}
    assert set(r["error"]) == {"bf16_model", "w4a4kv4_model"}
    assert "num_attention_heads=3 must be divisible by tp=2" in r["error"][
        "bf16_model"]


def test_too_big_is_an_error_record(runs):
  for r in runs["too_big"]:
    assert r["ours_ms"] is None
    assert "the weights need" in r["error"]["w4a4kv4_model"]
    assert "GiB limit" in r["error"]["bf16_model"]


def test_spent_budget_skips_cases(runs):
  for r in runs["budget_spent"]:
    assert r["error"] == {k: "skipped: --time_budget_s spent"
                          for k in ("bf16_model", "w4a4kv4_model")}


def _event(name, start, duration):
  return kernel_profile.KernelEvent(name=name, start_ns=start,
                                    duration_ns=duration)


def test_allreduce_share_counts_collective_kernels():
  events = [_event("fusion_1", 0, 600), _event("ncclDevKernel_AllReduce", 600,
                                               200),
            _event("all-reduce-start.1", 900, 100),
            _event("loop_dynamic_update_slice", 1000, 100)]
  share = tp_speed.allreduce_share(events, steps=2)
  assert share == {"share": round(300 / 1000, 4),
                   "allreduce_us_per_step": 0.15, "busy_us_per_step": 0.5,
                   "allreduce_kernels_per_step": 1.0}
  with pytest.raises(ValueError, match="steps=0 must be >= 1"):
    tp_speed.allreduce_share(events, steps=0)
  with pytest.raises(ValueError, match="no device kernels"):
    tp_speed.allreduce_share([], steps=1)


def test_run_options_group_per_shard():
  options = tp_speed.run_options(_TINY, 2, packed=True)
  assert (options.row_groups, options.had_blocks) == (2, 2)
  assert options.a_spec is not None and options.k_spec.bits == 4
  assert tp_speed.run_options(_TINY, 2, packed=False).a_spec is None


def test_check_fit_message():
  tp_speed.check_fit(90, 100, "x")
  tp_speed.check_fit(10**12, None, "x")
  with pytest.raises(MemoryError, match="the cache need 1.5 GiB per device,"
                     " more than 90% of the 1 GiB limit"):
    tp_speed.check_fit(3 * 2**29, 2**30, "the cache")


def test_case_rejects_unknown_benchmark():
  with pytest.raises(ValueError, match="benchmark 'tp_train' must be one of"):
    tp_speed.Case(benchmarks=("tp_train",))
  with pytest.raises(ValueError, match=r"decode_batches=\(0,\) must be >= 1"):
    tp_speed.Case(decode_batches=(0,))


def test_llama2_70b_preset():
  config = speed.PRESETS["llama2-70b"]
  assert (config.hidden_size, config.num_hidden_layers,
          config.num_attention_heads, config.num_key_value_heads,
          config.head_dim, config.intermediate_size,
          config.vocab_size) == (8192, 80, 64, 8, 128, 28672, 32000)
  # W4A4KV4 weights at tp = 1: about 35 GB (int4 linears, bf16 embeddings).
  shapes, shardings = tp_speed.param_layout(
      config, sharding.make_mesh(1), packed=True, fuse=True)
  gb = tp_speed.bytes_per_device(shapes, shardings) / 1e9
  assert 33 < gb < 37, gb


if __name__ == "__main__":
  print(json.dumps(_sharded_runs()))
