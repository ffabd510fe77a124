"""Decode throughput of our bf16 and W4A4KV4 models against the plain-JAX
anchor, and how many kernels one decode step launches (issue #14).

Both our models decode the way `generate` does: `run_layout.unstack_layers(...,
fuse=True)` params (per-layer weights, q/k/v and gate/up fused), a
per-layer cache updated in place (donated), `lax.fori_loop` over
`new_tokens` steps inside one jit.
"""

import collections
import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lab import benchmarking
from experiments.lab import kernel_profile
from experiments.lab import plain_jax_decode
from experiments.lab import speed
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import run_layout
from quarot_jax.config import LlamaConfig

HBM_BYTES_PER_S = 4.8e12  # H200 (the H100 SXM has 3.35e12)

# HLO instructions that launch no kernel of their own.
FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
         "opt-barrier", "after-all", "partition-id", "replica-id"}


def launch_count(hlo_text: str) -> dict[str, int]:
  """Kernels an optimized HLO module launches, counted statically.

  Every instruction outside fusion bodies and reducers that is not free
  (parameters, tuples, bitcasts, ...) is one kernel launch: fusions, library
  and Pallas custom calls, copies, in-place updates.

  Args:
    hlo_text: `jitted.lower(...).compile().as_text()`.

  Returns:
    {"total", "fusion", "custom-call", "other", "command_buffers"}.
  """
  counts = {"fusion": 0, "custom-call": 0, "other": 0}
  for kind, _ in launched(hlo_text):
    counts[kind if kind in counts else "other"] += 1
  counts["total"] = sum(counts.values())
  counts["command_buffers"] = hlo_text.count("command_buffer")
  return counts


_OP = re.compile(r'op_name="([^"]+)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")


def _frames(hlo_text: str) -> dict[int, str]:
  """Stack frame id -> 'file:line function < caller:line ...' from the
  module's frame tables (innermost first, two library frames at most)."""
  tables, name = collections.defaultdict(dict), None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations",
                "StackFrames"):
      name = line
      continue
    row = re.match(r"^(\d+) (.*)$", line) if name else None
    if not row:
      name = None if line.startswith(("HloModule", "ENTRY", "%")) else name
      continue
    tables[name][int(row.group(1))] = row.group(2).strip('"')
  def loc(i):
    fields = dict(kv.split("=") for kv in
                  tables["FileLocations"][i].strip("{}").split())
    file = os.path.basename(tables["FileNames"][int(fields["file_name_id"])])
    fn = tables["FunctionNames"][int(fields["function_name_id"])]
    return f"{file}:{fields['line']} {fn}"
  out = {}
  for i, text in tables["StackFrames"].items():
    chain, j = [], i
    while j and len(chain) < 2:
      fields = dict(kv.split("=") for kv in text.strip("{}").split())
      where = loc(int(fields["file_location_id"]))
      if not where.startswith(("api.py", "<", "decode_step_kernels", "decode_speed")):
        chain.append(where)
      parent = int(fields["parent_frame_id"])
      j = parent if parent != j else 0
      text = tables["StackFrames"].get(j, "")
    out[i] = " < ".join(chain)
  return out


def launched(hlo_text: str) -> list[tuple[str, str]]:
  """(kind, where) of every kernel the module launches.

  Args:
    hlo_text: optimized HLO text (`compile().as_text()`).

  Returns:
    One (kind, 'op file:line function < caller') pair per launched
    instruction, in order: every instruction outside fusion bodies and
    reducers that is not free (`FREE_OPS`).
  """
  bodies = set(re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", hlo_text))
  frames = _frames(hlo_text)
  out, skip = [], False
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      skip = head.group(1) in bodies and not line.startswith("ENTRY")
      continue
    op = re.search(r"= [^=]*? ([a-z][\w\-]*)\(", line)
    if skip or not op or op.group(1) in FREE_OPS:
      continue
    frame, name = _FRAME.search(line), _OP.search(line)
    where = frames.get(int(frame.group(1)), "?") if frame else "?"
    last = name.group(1).split("/")[-1] if name else "?"
    out.append((op.group(1), f"{last:<22} {where}"))
  return out


def decode_fn(config: LlamaConfig, new_tokens: int, options, kernels):
  """Jitted `new_tokens` greedy decode steps; the cache is donated and
  rewound, so repeated calls decode after the same prefill."""
  def steps(params, cache, tok):
    def body(_, state):
      tok, cache = state
      logits, cache = model.forward(params, tok, config, cache=cache,
                                    options=options, kernels=kernels)
      return jnp.argmax(logits[:, -1:], -1).astype(jnp.int32), cache
    tok, cache = jax.lax.fori_loop(0, new_tokens, body, (tok, cache))
    return tok, dataclasses.replace(cache, end=cache.end - new_tokens)
  return jax.jit(steps, donate_argnums=1)


def _step_launches(params, cache, tok, config, options, kernels):
  # The cache donated, as in the decode loop: else each in-place cache
  # update would count a copy of the whole cache.
  one = jax.jit(lambda p, c, t: model.forward(
      p, t, config, cache=c, options=options, kernels=kernels),
      donate_argnums=1)
  return launch_count(one.lower(params, cache, tok).compile().as_text())


def _time(fn, params, cache, tok) -> tuple[float, float, Any]:
  """(median ms of 3 calls, s of the first call (compile + one run), the
  cache)."""
  runs = []
  for i in range(4):
    begin = time.perf_counter()
    tok, cache = jax.block_until_ready(fn(params, cache, tok))
    runs.append(time.perf_counter() - begin)
  return float(np.median(runs[1:])) * 1e3, runs[0], cache


def _profile(fn, params, cache, tok, steps: int) -> dict[str, Any] | None:
  """One more call of the decode loop under a profiler trace, per step:
  span, busy and idle µs, kernels, the 30 costliest kernel names (enough
  to account for a step's launches by kind) and the 5 the GPU waited
  longest before (`kernel_profile`); None without a GPU.
  The cache is donated, as in the timed calls. A tracing failure is
  recorded as {'error': ...}: it must not lose the timed record."""
  try:
    events = kernel_profile.trace_kernels(fn, params, cache, tok)
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
  if not events:
    return None
  s = kernel_profile.summarize(events, steps)
  return {"span_us": round(s["span_us"], 1), "busy_us": round(s["busy_us"], 1),
          "idle_us": round(s["idle_us"], 1),
          "busy_fraction": round(s["busy_fraction"], 3),
          "kernels": round(s["kernels"], 1),
          "top_us": [[n, round(c, 2), round(us, 1)]
                     for n, c, us in s["by_name"][:30]],
          "idle_before_us": [[n, round(us, 1)]
                             for n, us in s["idle_before"][:5]]}


def decode_throughput(config: LlamaConfig, name: str, batch: int,
                      cached: int, new_tokens: int, *, command: str,
                      key: jax.Array, kernels=None) -> list[dict[str, Any]]:
  """One `decode_throughput` record: ms per token of our bf16 and W4A4KV4
  models and of the plain-JAX anchor, the weight-read floor, launches."""
  kf, kq, kc, kt, ka = jax.random.split(key, 5)
  fparams = model.init_params(config, kf, dtype=jnp.bfloat16)
  qparams = speed.packed_like(fparams, kq)
  options = speed.W4A4KV4.run_options(config.head_dim)
  tok = jax.random.randint(kt, (batch, 1), 0, config.vocab_size, jnp.int32)
  slots = cached + new_tokens
  ms, launches, nbytes, first_s, profiles = {}, {}, {}, {}, {}
  for label, params, packed, opts in (
      ("bf16_model", fparams, False, model.FLOAT),
      ("w4a4kv4_model", qparams, True, options)):
    params = run_layout.unstack_layers(params, fuse=True)  # as generate
    cache = speed.random_cache(kv_cache.cache_for(
        config, batch, slots, dtype=jnp.bfloat16, packed=packed,
        per_layer=True), kc, cached)
    launches[label] = _step_launches(params, cache, tok, config, opts,
                                     kernels)
    fn = decode_fn(config, new_tokens, opts, kernels)
    total, first_s[label], cache = _time(fn, params, cache, tok)
    ms[label] = total / new_tokens
    # Bytes one step must read: all weights (embeddings: one row) + cache.
    emb = params["embed_tokens"]["embedding"]
    nbytes[label] = (speed.nbytes(params) - speed.nbytes(emb)
                     + emb.shape[1] * emb.dtype.itemsize * batch
                     + speed.nbytes((cache.k, cache.v)) * (
                         cached + new_tokens / 2) / slots)
    profiles[label] = _profile(fn, params, cache, tok, new_tokens)  # last:
    del params, cache  # it donates the cache
  anchor = plain_jax_decode.decode_ms_per_token(config, batch, cached,
                                                key=ka)
  floor = {k: v / HBM_BYTES_PER_S * 1e3 for k, v in nbytes.items()}
  rec = benchmarking.record(
      "decode_throughput", f"{name} b{batch} cached{cached}",
      ms["w4a4kv4_model"], {"plain_jax_bf16": anchor}, command=command,
      model=name, batch=batch, cached=cached,
      ours_ms_per_token={k: round(v, 4) for k, v in ms.items()},
      weight_floor_ms={k: round(v, 4) for k, v in floor.items()},
      bytes_per_step={k: int(v) for k, v in nbytes.items()},
      launches_per_step=launches,
      # The first call of the jitted decode loop: compiling it (layers
      # unrolled) plus one run of `new_tokens` steps.
      first_call_s={k: round(v, 2) for k, v in first_s.items()},
      profile_per_step=profiles)
  # The anchor's speedup over each of our models (and, from `record`, over
  # the W4A4KV4 model as `plain_jax_bf16`).
  rec["speedup"].update({k: round(anchor / v, 3) for k, v in ms.items()})
  rec["floor_fraction"] = {k: round(floor[k] / ms[k], 3) for k in ms}
  return [rec]
