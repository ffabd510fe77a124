"""Tensor-parallel decode and prefill speed, W4A4KV4 against bf16 (#18).

For one model and one tensor-parallel degree `tp`, each model is built
directly on `sharding.make_mesh(tp)`: random weights made one layer at a
time by a jit with `out_shardings` (`make_params`), so no full weight ever
exists on one device and the packed model never materializes its float
kernels (`speed.packed_like` inside the jit). The layout is the one
`generate` decodes with: per-layer weights (q/k/v and gate/up fused only
at tp = 1, as `generate` does for params on one device) and a per-layer KV
cache split by kv heads (`make_cache`). Then, in one process:

  tp_decode   ms per token of a greedy decode loop (`decode_fn`: the cache
              donated, rewound after each call and kept on its shards every
              step) after `cached` random tokens; on a GPU also the
              all-reduce kernels' share of a step's busy time at tp > 1,
              from a profiler trace (`allreduce_share`).
  tp_prefill  ms of one forward over `seq` tokens writing a fresh cache.

On a mesh (tp > 1) `model.forward(..., mesh=)` runs the packed linears and
the KV4 attention per shard inside `shard_map`; the packed model quantizes
the o_proj/down_proj inputs per shard and rotates them block-diagonally
(`run_options`: `row_groups = had_blocks = tp`). A model whose heads, kv
heads, FFN or vocabulary do not divide by tp, or whose weights and cache
do not fit a device, comes back as a record with an `error` per model
instead of its times. Used by `experiments/bench_tp.py`; the tests run it
on a tiny config over 2 CPU devices.
"""

import dataclasses
import functools
import gc
import math
import re
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.lab import benchmarking
from experiments.lab import kernel_profile
from experiments.lab import speed
from quarot_jax import kernels as kernels_lib
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import run_layout
from quarot_jax import shard_kernels
from quarot_jax import sharding
from quarot_jax.config import LlamaConfig

BENCHMARKS = ("tp_decode", "tp_prefill")
# (label, packed): the baseline first, as in the records' `baselines`.
MODELS = (("bf16_model", False), ("w4a4kv4_model", True))
# Kernel names of the collectives: NCCL's (ncclDevKernel_AllReduce_...) and
# XLA's own all-reduce kernels.
ALL_REDUCE = re.compile(r"all[-_ ]?reduce|nccl", re.IGNORECASE)
# Weights + cache may take this share of a device's memory limit; the rest
# is left to activations and workspaces.
FIT_FRACTION = 0.9
GIB = 2**30

Params = dict[str, Any]


def run_options(config: LlamaConfig, tp: int, *,
                packed: bool) -> model.RunOptions:
  """The numerics of one model at tensor-parallel degree `tp`.

  Args:
    config: the model config (its head_dim sizes the KV4 spec).
    tp: the tensor-parallel degree.
    packed: W4A4KV4 (else the bf16 model, `model.FLOAT`).

  Returns:
    `speed.W4A4KV4`'s options with `row_groups = had_blocks = tp` (what a
    packed model on a mesh computes), or `model.FLOAT`.
  """
  if not packed:
    return model.FLOAT
  return dataclasses.replace(speed.W4A4KV4.run_options(config.head_dim),
                             had_blocks=tp, row_groups=tp)


def _param_fns(config: LlamaConfig, *, packed: bool, fuse: bool):
  """(one layer's params, the other params) as functions of a key."""
  one = dataclasses.replace(config, num_hidden_layers=1)

  def full(key):
    params = model.init_params(one, key, dtype=jnp.bfloat16)
    return speed.packed_like(params, key) if packed else params

  def layer(key):
    params = jax.tree.map(lambda a: a[0], full(key)["layers"])
    return run_layout.fuse_projections(params) if fuse else params

  def rest(key):
    return {k: v for k, v in full(key).items() if k != "layers"}

  return layer, rest


def param_layout(config: LlamaConfig, mesh: jax.sharding.Mesh, *,
                 packed: bool, fuse: bool = False) -> tuple[Params, Params]:
  """Shapes and shardings of the per-layer params `make_params` builds.

  Args:
    config: model sizes.
    mesh: a mesh with axis 'tp' (`sharding.make_mesh`).
    packed: packed int4 linears (`speed.packed_like`), else bf16 kernels.
    fuse: q/k/v and gate/up fused (`run_layout.fuse_projections`); only
      for a one-device mesh (fused linears are not placed by
      `sharding.param_shardings`).

  Returns:
    (`jax.ShapeDtypeStruct` pytree, `NamedSharding` pytree), each with
    `layers` a tuple of L per-layer dicts.

  Raises:
    ValueError: a size is not divisible by the mesh's tp (names it), or
      `fuse` on a mesh of more than one device.
  """
  tp = shard_kernels.tp_size(mesh)
  if fuse and tp > 1:
    raise ValueError(f"{fuse=} needs a one-device mesh, got {tp=}")
  layer, rest = _param_fns(config, packed=packed, fuse=fuse)
  key = jax.random.key(0)
  one_layer = jax.eval_shape(layer, key)
  shapes = {**jax.eval_shape(rest, key),
            "layers": (one_layer,) * config.num_hidden_layers}
  return shapes, sharding.param_shardings(shapes, mesh, config=config)


def make_params(config: LlamaConfig, mesh: jax.sharding.Mesh, *,
                packed: bool, key: jax.Array, fuse: bool = False) -> Params:
  """Random bf16 or packed W4A4 params, created on their shards.

  Each layer comes from one jitted call with `out_shardings` (compiled
  once, run L times), so a device only ever holds its own shards, plus one
  layer's temporaries.

  Args:
    config: model sizes.
    mesh: a mesh with axis 'tp'.
    packed: packed int4 linears (`qweight uint8[out, in // 2]`, `wscale`)
      in place of the float kernels.
    key: a `jax.random.key`.
    fuse: as for `param_layout`.

  Returns:
    Params in the per-layer decode layout (`run_layout.unstack_layers`),
    placed as `sharding.param_shardings` says.

  Raises:
    ValueError: as `param_layout`.
  """
  make_layer, make_rest = _param_makers(config, mesh, packed=packed,
                                        fuse=fuse)
  keys = jax.random.split(key, config.num_hidden_layers + 1)
  params = make_rest(keys[0])
  params["layers"] = tuple(make_layer(k) for k in keys[1:])
  return params


@functools.cache
def _param_makers(config: LlamaConfig, mesh: jax.sharding.Mesh, *,
                  packed: bool, fuse: bool):
  """(one layer, the other params) jitted onto their shardings."""
  _, shardings = param_layout(config, mesh, packed=packed, fuse=fuse)
  layer, rest = _param_fns(config, packed=packed, fuse=fuse)
  rest_shardings = {k: v for k, v in shardings.items() if k != "layers"}
  return (jax.jit(layer, out_shardings=shardings["layers"][0]),
          jax.jit(rest, out_shardings=rest_shardings))


def cache_layout(config: LlamaConfig, batch: int, slots: int,
                 mesh: jax.sharding.Mesh, *, packed: bool
                 ) -> tuple[kv_cache.KVCache, kv_cache.KVCache]:
  """Shapes and shardings of a per-layer bf16 or KV4 cache on `mesh`.

  Returns:
    (`KVCache` of `jax.ShapeDtypeStruct`s, `KVCache` of `NamedSharding`s:
    keys and values split by kv heads, start and end replicated).
  """
  shapes = jax.eval_shape(lambda: kv_cache.cache_for(
      config, batch, slots, dtype=jnp.bfloat16, packed=packed,
      per_layer=True))
  return shapes, sharding.cache_shardings(shapes, mesh)


@functools.cache
def _filler(out_sharding: NamedSharding) -> Callable[..., jax.Array]:
  def fill(key, shape, dtype):
    if jnp.issubdtype(dtype, jnp.integer):
      return jax.random.randint(key, shape, 0, 256, jnp.int32).astype(dtype)
    return (0.1 * jax.random.normal(key, shape)).astype(dtype)
  return jax.jit(fill, static_argnums=(1, 2), out_shardings=out_sharding)


def make_cache(config: LlamaConfig, batch: int, slots: int,
               mesh: jax.sharding.Mesh, *, cached: int, packed: bool,
               key: jax.Array) -> kv_cache.KVCache:
  """A per-layer cache of `slots` positions, the first `cached` written.

  Keys and values are random (bf16, or KV4 codes and scales), each buffer
  created on its shards.

  Args:
    config: model sizes.
    batch: B.
    slots: S, positions allocated.
    mesh: a mesh with axis 'tp'.
    cached: the cache's `end` (tokens already in it), at most `slots`.
    packed: a packed KV4 cache, else bf16.
    key: a `jax.random.key`.

  Returns:
    A `KVCache` placed as `sharding.cache_shardings` says.

  Raises:
    ValueError: `cached` outside [0, slots], or kv heads not divisible by
      the mesh's tp.
  """
  if not 0 <= cached <= slots:
    raise ValueError(f"{cached=} must be in [0, {slots=}]")
  shapes, shardings = cache_layout(config, batch, slots, mesh, packed=packed)
  leaves, treedef = jax.tree.flatten((shapes.k, shapes.v))
  places = jax.tree.leaves((shardings.k, shardings.v))
  keys = jax.random.split(key, len(leaves))
  filled = [_filler(s)(k, a.shape, a.dtype)
            for k, a, s in zip(keys, leaves, places)]
  k, v = jax.tree.unflatten(treedef, filled)
  replicated = NamedSharding(mesh, P())
  start, end = jax.device_put(
      (jnp.zeros((batch,), jnp.int32), jnp.asarray(cached, jnp.int32)),
      replicated)
  return kv_cache.KVCache(k=k, v=v, start=start, end=end)


def decode_inputs(config: LlamaConfig, batch: int, slots: int,
                  mesh: jax.sharding.Mesh, *, cached: int, packed: bool,
                  key: jax.Array) -> tuple[kv_cache.KVCache, jax.Array]:
  """A filled cache (`make_cache`) and random first tokens int32[B, 1]
  (replicated on `mesh`): what `decode_fn`'s steps take."""
  kc, kt = jax.random.split(key)
  cache = make_cache(config, batch, slots, mesh, cached=cached,
                     packed=packed, key=kc)
  tok = jax.device_put(
      jax.random.randint(kt, (batch, 1), 0, config.vocab_size, jnp.int32),
      NamedSharding(mesh, P()))
  return cache, tok


def _keep_sharded(mesh: jax.sharding.Mesh | None):
  """Pins a cache to its kv-head split (identity without a mesh)."""
  if mesh is None:
    return lambda cache: cache
  return lambda cache: jax.lax.with_sharding_constraint(
      cache, sharding.cache_shardings(cache, mesh))


def decode_fn(config: LlamaConfig, new_tokens: int, *,
              options: model.RunOptions, kernels: kernels_lib.Kernels,
              mesh: jax.sharding.Mesh | None):
  """Jitted `new_tokens` greedy decode steps, as `generate`'s loop.

  The cache is donated and rewound at the end, so repeated calls decode
  after the same prefix; with a `mesh`, each step's new cache is pinned to
  the kv-head split (it never gathers) and the forward runs tensor
  parallel (`model.forward(..., mesh=)`).

  Args:
    config: the model config.
    new_tokens: steps per call.
    options: the model's `RunOptions` (`run_options`).
    kernels: resolved kernels.
    mesh: the mesh the params and cache live on (tp > 1), or None.

  Returns:
    `steps(params, cache, tok int32[B, 1]) -> (int32[B, new_tokens], the
    rewound cache)`.
  """
  keep = _keep_sharded(mesh)

  def steps(params, cache, tok):
    out = jnp.zeros((tok.shape[0], new_tokens), jnp.int32)

    def body(i, state):
      tok, cache, out = state
      logits, cache = model.forward(params, tok, config, cache=cache,
                                    options=options, kernels=kernels,
                                    mesh=mesh)
      tok = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)  # [B, 1]
      return tok, keep(cache), out.at[:, i].set(tok[:, 0])

    _, cache, out = jax.lax.fori_loop(0, new_tokens, body, (tok, cache, out))
    return out, dataclasses.replace(cache, end=cache.end - new_tokens)

  return jax.jit(steps, donate_argnums=1)


def prefill_fn(config: LlamaConfig, batch: int, seq: int, *, packed: bool,
               options: model.RunOptions, kernels: kernels_lib.Kernels,
               mesh: jax.sharding.Mesh | None):
  """Jitted prefill: `seq` tokens through the model into a fresh cache.

  Returns:
    `run(params, tokens int32[B, T]) -> (int32[B] next tokens, cache)`.
  """
  keep = _keep_sharded(mesh)

  def run(params, tokens):
    cache = keep(kv_cache.cache_for(config, batch, seq, dtype=jnp.bfloat16,
                                    packed=packed, per_layer=True))
    logits, cache = model.forward(params, tokens, config, cache=cache,
                                  options=options, kernels=kernels,
                                  mesh=mesh)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), keep(cache)

  return jax.jit(run)


def allreduce_share(events: list[kernel_profile.KernelEvent],
                    steps: int) -> dict[str, float]:
  """The all-reduce kernels' share of the traced decode steps' busy time.

  Busy time is the union of the kernels' intervals over all devices (they
  run in lockstep), as `kernel_profile.busy_ns`.

  Args:
    events: device kernels of `steps` decode steps (`trace_kernels`).
    steps: decode steps traced.

  Returns:
    {'share': all-reduce busy / all busy, 'allreduce_us_per_step',
    'busy_us_per_step', 'allreduce_kernels_per_step'}.

  Raises:
    ValueError: no events, or steps < 1.
  """
  kernel_profile.check_events(events, steps, "steps")
  reduce = [e for e in events if ALL_REDUCE.search(e.name)]
  busy = kernel_profile.busy_ns(events)
  reduce_busy = kernel_profile.busy_ns(reduce)
  return {"share": round(reduce_busy / busy, 4),
          "allreduce_us_per_step": round(reduce_busy / steps / 1e3, 2),
          "busy_us_per_step": round(busy / steps / 1e3, 2),
          "allreduce_kernels_per_step": round(len(reduce) / steps, 2)}


def bytes_per_device(shapes: Any, shardings: Any) -> int:
  """Bytes the largest shard set of a pytree takes on one device."""
  total = 0
  for a, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
  return total


def memory_limit(device: jax.Device) -> int | None:
  """A device's allocator limit in bytes, or None (a CPU reports none)."""
  stats = device.memory_stats()
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"])


def peak_memory_gib(devices: Iterable[jax.Device]) -> list[float] | None:
  """Each device's `peak_bytes_in_use` in GiB, or None where unreported.

  jax cannot reset it: it is the process's peak so far.
  """
  out = []
  for d in devices:
    stats = d.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
      return None
    out.append(round(stats["peak_bytes_in_use"] / GIB, 3))
  return out


def program_bytes(compiled) -> int | None:
  """Per-device bytes a compiled program holds at once (arguments + outputs
  not aliased to them + temporaries); None if XLA does not say."""
  stats = compiled.memory_analysis()
  if isinstance(stats, (list, tuple)):
    stats = stats[0] if stats else None
  if stats is None:
    return None
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  return int(total)


def _error(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e)[:300]}"


def check_fit(need: int, limit: int | None, what: str) -> None:
  """Raises MemoryError when `need` bytes exceed `FIT_FRACTION` of `limit`.

  Args:
    need: bytes per device of weights and cache.
    limit: the device's memory limit in bytes, or None (no check).
    what: names the buffers in the message.

  Raises:
    MemoryError: the buffers do not fit.
  """
  if limit is not None and need > FIT_FRACTION * limit:
    raise MemoryError(
        f"{what} need {need / GIB:.4g} GiB per device, more than"
        f" {FIT_FRACTION:.0%} of the {limit / GIB:.4g} GiB limit")


def _compile(fn, *args) -> tuple[Any, float]:
  begin = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - begin


def _time_decode(compiled, params, cache, tok, runs: int = 3):
  """Median ms of `runs` decode calls after a warm-up one."""
  times = []
  for i in range(runs + 1):
    begin = time.perf_counter()
    out, cache = jax.block_until_ready(compiled(params, cache, tok))
    if i:
      times.append((time.perf_counter() - begin) * 1e3)
  return float(np.median(times)), out, cache


def _profile_decode(compiled, params, cache, tok, steps: int):
  """(`allreduce_share` of one traced call or an error note, the cache);
  None off a GPU."""
  if jax.default_backend() != "gpu":
    return None, cache
  held = {}

  def once(p, c, t):
    held["out"] = compiled(p, c, t)
    return held["out"]

  try:
    events = kernel_profile.trace_kernels(once, params, cache, tok)
    share = allreduce_share(events, steps)
  except Exception as e:  # pylint: disable=broad-except
    share = {"error": _error(e)}
  return share, held["out"][1] if "out" in held else cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
  """What `run_model` measures for one model at one tp.

  Attributes:
    benchmarks: a subset of `BENCHMARKS`.
    decode_batches: batches of tp_decode.
    cached: tokens in the cache before decoding.
    new_tokens: decode steps per timed call.
    prefill_batches: batches of tp_prefill.
    seq: prefill tokens per row.
  """

  benchmarks: tuple[str, ...] = BENCHMARKS
  decode_batches: tuple[int, ...] = (1, 16)
  cached: int = 1024
  new_tokens: int = 32
  prefill_batches: tuple[int, ...] = (1,)
  seq: int = 2048

  def __post_init__(self):
    for b in self.benchmarks:
      if b not in BENCHMARKS:
        raise ValueError(f"benchmark {b!r} must be one of {BENCHMARKS}")
    for name in ("decode_batches", "prefill_batches"):
      if any(b < 1 for b in getattr(self, name)):
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.cached < 0 or self.new_tokens < 1 or self.seq < 1:
      raise ValueError(f"cached={self.cached} must be >= 0, new_tokens="
                       f"{self.new_tokens} and seq={self.seq} >= 1")

  def keys(self) -> list[tuple[str, int]]:
    """(benchmark, batch) of every record, in order."""
    out = []
    if "tp_decode" in self.benchmarks:
      out += [("tp_decode", b) for b in self.decode_batches]
    if "tp_prefill" in self.benchmarks:
      out += [("tp_prefill", b) for b in self.prefill_batches]
    return out


def _measure(config: LlamaConfig, tp: int, mesh: jax.sharding.Mesh,
             case: Case, *, packed: bool, key: jax.Array,
             kernels: kernels_lib.Kernels, limit: int | None,
             deadline: float | None, log: Callable[[str], None]
             ) -> dict[tuple[str, int], dict[str, Any]]:
  """One model's measurements: (benchmark, batch) -> fields or error."""
  fuse = tp == 1  # as generate: fused only when no param is split
  forward_mesh = mesh if tp > 1 else None
  options = run_options(config, tp, packed=packed)
  out = {}
  try:
    shapes, shardings = param_layout(config, mesh, packed=packed, fuse=fuse)
    weights = bytes_per_device(shapes, shardings)
    check_fit(weights, limit, "the weights")
  except (ValueError, MemoryError) as e:
    return {k: {"error": _error(e)} for k in case.keys()}
  kp, kd, kt = jax.random.split(key, 3)  # as `run_model` says
  params = None
  for bench, batch in case.keys():
    if deadline is not None and time.monotonic() > deadline:
      out[(bench, batch)] = {"error": "skipped: --time_budget_s spent"}
      continue
    fields = {"weight_bytes": weights, "fused": fuse}
    try:
      if bench == "tp_decode":
        slots = case.cached + case.new_tokens
        check_fit(weights + bytes_per_device(*cache_layout(
            config, batch, slots, mesh, packed=packed)), limit,
                  "the weights and cache")
      else:
        slots = case.seq
      if params is None:
        begin = time.perf_counter()
        params = make_params(config, mesh, packed=packed, key=kp, fuse=fuse)
        jax.block_until_ready(params)
        log(f"  params on {tp} device(s) in"
            f" {time.perf_counter() - begin:.1f} s")
      replicated = NamedSharding(mesh, P())
      if bench == "tp_decode":
        cache, tok = decode_inputs(config, batch, slots, mesh,
                                   cached=case.cached, packed=packed, key=kd)
        compiled, seconds = _compile(
            decode_fn(config, case.new_tokens, options=options,
                      kernels=kernels, mesh=forward_mesh), params, cache, tok)
        fields["program_bytes"] = program_bytes(compiled)
        ms, tokens, cache = _time_decode(compiled, params, cache, tok)
        share = None  # tp = 1 has no all-reduce: not traced
        if forward_mesh is not None:
          share, cache = _profile_decode(compiled, params, cache, tok,
                                         case.new_tokens)
        fields.update(ms_per_token=ms / case.new_tokens, allreduce=share,
                      tokens=np.asarray(tokens).tolist())
        del cache
      else:
        tokens = jax.device_put(jax.random.randint(
            kt, (batch, case.seq), 0, config.vocab_size, jnp.int32),
                                replicated)
        compiled, seconds = _compile(
            prefill_fn(config, batch, case.seq, packed=packed,
                       options=options, kernels=kernels, mesh=forward_mesh),
            params, tokens)
        fields["program_bytes"] = program_bytes(compiled)
        ms = benchmarking.median_ms(compiled, params, tokens, warmup=1,
                                    runs=5, inner=1)
        fields.update(ms=ms, ms_per_token=ms / (batch * case.seq))
      fields.update(compile_s=round(seconds, 1),
                    peak_memory_gib=peak_memory_gib(mesh.devices.flat))
      log(f"  {bench} b{batch}: {fields['ms_per_token']:.4f} ms/token"
          f" (compiled in {seconds:.1f} s)")
    except Exception as e:  # pylint: disable=broad-except
      # Out of memory, or a kernel this shape cannot take: the other
      # cases still run.
      fields = {"error": _error(e)}
      log(f"  {bench} b{batch}: failed: {fields['error']}")
    out[(bench, batch)] = fields
    gc.collect()
  del params
  gc.collect()
  return out


def _record(bench: str, name: str, tp: int, batch: int, case: Case,
            got: dict[str, dict[str, Any]], *, command: str,
            kernels: str) -> dict[str, Any]:
  """One tp_decode / tp_prefill record from both models' fields."""
  ok = {label: f for label, f in got.items() if "error" not in f}
  per_token = {label: round(f["ms_per_token"], 5) for label, f in ok.items()}
  if bench == "tp_decode":
    what = f"cached{case.cached}"
    ms = {label: f["ms_per_token"] for label, f in ok.items()}
    tokens_per_s = {label: round(batch * 1e3 / v, 1) for label, v in ms.items()}
    extra = dict(cached=case.cached, new_tokens=case.new_tokens,
                 allreduce={label: f["allreduce"] for label, f in ok.items()})
  else:
    what = f"s{case.seq}"
    ms = {label: f["ms"] for label, f in ok.items()}
    tokens_per_s = {label: round(batch * case.seq * 1e3 / v, 1)
                    for label, v in ms.items()}
    extra = dict(cached=0, seq=case.seq)
  ours = ms.get("w4a4kv4_model")
  baselines = {k: v for k, v in ms.items() if k != "w4a4kv4_model"}
  rec = benchmarking.record(
      bench, f"{name} tp{tp} b{batch} {what}",
      ours if ours is not None else 1.0,
      baselines if ours is not None else {}, command=command,
      mesh={"tp": tp}, model=name, batch=batch, **extra,
      ours_ms_per_token=per_token, tokens_per_s=tokens_per_s,
      peak_memory_gib={k: f["peak_memory_gib"] for k, f in ok.items()},
      program_bytes={k: f["program_bytes"] for k, f in ok.items()},
      weight_bytes={k: f["weight_bytes"] for k, f in ok.items()},
      compile_s={k: f["compile_s"] for k, f in ok.items()},
      fused={k: f["fused"] for k, f in ok.items()}, kernels=kernels)
  if ours is None:
    rec["ours_ms"] = None
  errors = {label: f["error"] for label, f in got.items() if "error" in f}
  if errors:
    rec["error"] = errors
  return rec


def run_model(config: LlamaConfig, name: str, tp: int, case: Case, *,
              command: str, key: jax.Array,
              kernels: "str | kernels_lib.Kernels | None" = "auto",
              limit: int | None = -1, deadline: float | None = None,
              log: Callable[[str], None] = print
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Both models at one tp: the records of every (benchmark, batch).

  The bf16 model runs first, then W4A4KV4 (each built, measured on every
  case, and freed before the next). `peak_memory_gib` is the process's
  peak so far per device (jax cannot reset it), read after each case;
  `program_bytes` the compiled program's own per-device bytes
  (`program_bytes`), `weight_bytes` the weights' per device.

  Args:
    config: model sizes.
    name: the model's name in the records.
    tp: the tensor-parallel degree (`sharding.make_mesh(tp)`).
    case: what to measure.
    command: the command line, recorded.
    key: a `jax.random.key`; both models' params come from
      `make_params(key=jax.random.split(key, 3)[0])`, the decode inputs
      from `decode_inputs(key=jax.random.split(key, 3)[1])`.
    kernels: a `kernels.SETTINGS` word (recorded) or `Kernels`.
    limit: bytes a device may hold (cases that need more than
      `FIT_FRACTION` of it are skipped with an error); -1 reads the first
      device's limit (`memory_limit`), None checks nothing.
    deadline: a `time.monotonic()` after which no case starts (its record
      says so).
    log: prints one progress line.

  Returns:
    (records in `case.keys()` order, each with an `error` {model: why} if
    a model did not run; {(benchmark, batch): {model: greedy tokens}} of
    the decode cases, for checks).
  """
  setting = kernels if isinstance(kernels, str) or kernels is None else (
      "resolved")
  resolved = kernels_lib.resolve(kernels)
  got = {k: {} for k in case.keys()}
  try:
    mesh = sharding.make_mesh(tp)
    sharding.check_config(config, tp)
  except ValueError as e:
    for k in got:
      got[k] = {label: {"error": _error(e)} for label, _ in MODELS}
  else:
    if limit == -1:
      limit = memory_limit(mesh.devices.flat[0])
    for label, packed in MODELS:
      log(f"{name} tp={tp} {label}")
      measured = _measure(config, tp, mesh, case, packed=packed, key=key,
                          kernels=resolved, limit=limit, deadline=deadline,
                          log=log)
      for k, fields in measured.items():
        got[k][label] = fields
  records = [_record(bench, name, tp, batch, case, got[(bench, batch)],
                     command=command, kernels=setting or "auto")
             for bench, batch in case.keys()]
  tokens = {k: {label: f["tokens"] for label, f in v.items() if "tokens" in f}
            for k, v in got.items() if k[0] == "tp_decode"}
  return records, tokens
