"""Tensor parallelism (Megatron style) on `jax.sharding`.

The model stays the one functional `model.forward`; this module only says
where each array lives on a 1-D device mesh with axis 'tp', and XLA's GSPMD
partitioner derives the rest (the collectives included) from the params and
cache placements under `jax.jit`:

  q/k/v, gate/up     column parallel: kernel [.., D, out] sharded on `out`
                     (bias [.., out] too); each device owns N/tp query heads,
                     K/tp kv heads and F/tp FFN columns, so attention and
                     SwiGLU run locally.
  o_proj, down_proj  row parallel: kernel [.., in, D] sharded on `in`; the
                     partial products meet in one all-reduce per linear.
  embedding, lm_head by vocabulary: embedding [V, D] on V, lm_head [D, V]
                     on V (logits come out vocabulary-sharded).
  norms, other       replicated.
  packed linears     `qweight uint8[.., out, in // 2]` and `wscale f32[.., out]`
                     follow their linear: column parallel shards `out`
                     (qweight axis -2, wscale), row parallel shards `in`
                     (qweight axis -1; packing pairs adjacent `in` elements,
                     so a contiguous half of the bytes is a contiguous half
                     of `in`) and replicates `wscale`. Group scales
                     `wscale f32[.., out, G]` shard on `out` (column) or
                     on G with `in` (row).
  KV caches          by kv heads: float [.., B, S, K, H] on K, KV4 codes
                     [.., B, K, S, H // 2] and scale/zero [.., B, K, S] on K.

Axes are counted from the end, so the same rules place the stacked
([L, ...]) and the per-layer (`run_layout.unstack_layers`,
`kv_cache.cache_for(..., per_layer=True)`) layouts.

The online Hadamards before o_proj and down_proj read the sharded N·H and F
axes: a full-width transform mixes the shards (GSPMD then moves data between
devices); `rotation.rotate(..., tp=tp)` with `RunOptions(had_blocks=tp)`
makes them block-diagonal, one Hadamard per shard, so every device rotates
only its own slice (`tests/test_sharding.py` checks the HLO).

The Pallas kernels are custom calls that GSPMD cannot split; given the
mesh, `model.forward` runs the packed linears and the packed KV4 attention
per shard inside `shard_map` (`shard_kernels.py`), so no kernel gathers a
sharded weight or cache.

Several hosts: the same code runs after `jax.distributed.initialize()` on
every host, with `make_mesh` over `jax.devices()` (all hosts' devices); see
README.md "Tensor parallelism".
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import kv4_cache as kv4_lib
from quarot_jax import kernels as kernels_lib
from quarot_jax import kv_cache as kv_cache_lib
from quarot_jax import model
from quarot_jax import shard_kernels
from quarot_jax.config import LlamaConfig

AXIS = shard_kernels.AXIS
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")

Params = dict[str, Any]


def make_mesh(tp: int) -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'tp' over the first `tp` devices.

  Args:
    tp: number of devices (tensor-parallel degree).

  Returns:
    The mesh (axis type Auto: GSPMD propagates shardings).

  Raises:
    ValueError: tp < 1, or fewer than tp devices.
  """
  devices = jax.devices()
  if not isinstance(tp, int) or tp < 1:
    raise ValueError(f"{tp=} must be a positive int")
  if tp > len(devices):
    raise ValueError(
        f"{tp=} needs {tp} devices but jax sees {len(devices)}"
        f" ({devices[0].platform}); on a CPU set XLA_FLAGS="
        f"--xla_force_host_platform_device_count={tp} before importing jax")
  return jax.make_mesh((tp,), (AXIS,), devices=devices[:tp],
                       axis_types=(jax.sharding.AxisType.Auto,))


_tp = shard_kernels.tp_size


def _spec(ndim: int, axis: int | None) -> P:
  """P with 'tp' on `axis` (counted from the end if negative), else None."""
  if axis is None:
    return P()
  spec = [None] * ndim
  spec[axis] = AXIS
  return P(*spec)


def check_config(config: LlamaConfig, tp: int) -> None:
  """Raises unless the sizes that tensor parallelism splits divide by tp.

  Raises:
    ValueError: naming the first of num_attention_heads,
      num_key_value_heads, intermediate_size, vocab_size not divisible by tp.
  """
  for name in ("num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size"):
    value = getattr(config, name)
    if value % tp:
      raise ValueError(f"{name}={value} must be divisible by {tp=}")


def _param_axis(path: tuple[str, ...], grouped: bool = False) -> int | None:
  """The sharded axis (from the end) of the param at `path`, or None.
  `grouped`: the path's linear is packed with group scales (wscale [..,
  out, G]), which column parallel shards on `out` and row parallel on G
  (each shard's groups are its slice of `in`)."""
  leaf = path[-1]
  parent = path[-2] if len(path) > 1 else ""
  if path[0] == "embed_tokens" and leaf == "embedding":
    return -2  # [V, D]
  if path[0] == "lm_head" and leaf == "kernel":
    return -1  # [D, V]
  if leaf == "k_center":
    return -2  # [K, H]: with the kv heads
  if leaf == "wzero":  # asymmetric weights' zero points: as their scales
    leaf = "wscale"
  if parent in COLUMN_PARALLEL:
    return {"kernel": -1, "bias": -1, "qweight": -2,
            "wscale": -2 if grouped else -1}.get(leaf)
  if parent in ROW_PARALLEL:  # bias [D]; per-channel wscale [D] replicated
    return {"kernel": -2, "qweight": -1,
            "wscale": -1 if grouped else None}.get(leaf)
  return None


def _path_names(path) -> tuple[str, ...]:
  """Dict keys of a tree path (tuple indices of per-layer params skipped)."""
  return tuple(str(k.key) for k in path
               if isinstance(k, jax.tree_util.DictKey))


def param_specs(params: Params, tp: int) -> Params:
  """`PartitionSpec`s of the params pytree (see the module docstring).

  Args:
    params: params (stacked or per-layer, float or packed; arrays or
      `jax.ShapeDtypeStruct`s), or Flax variables `{"params": params}`.
    tp: the tensor-parallel degree (for the divisibility check).

  Returns:
    A pytree like `params` of `PartitionSpec`.

  Raises:
    ValueError: a sharded axis is not divisible by tp (names the param).
  """
  params, wrap = model.unwrap(params)

  def spec(path, x, grouped=False):
    names = _path_names(path)
    axis = _param_axis(names, grouped)
    if axis is not None and x.shape[axis] % tp:
      raise ValueError(
          f"{'/'.join(names)} has shape {x.shape}: axis {axis} of size"
          f" {x.shape[axis]} must be divisible by {tp=}")
    return _spec(len(x.shape), axis)

  def node(path, x):  # a packed linear's leaves see its scales' kind
    if _is_packed_linear(x):
      grouped = len(x["wscale"].shape) == len(x["qweight"].shape)
      return {k: spec(path + (jax.tree_util.DictKey(k),), v, grouped)
              for k, v in x.items()}
    return spec(path, x)

  return wrap(jax.tree_util.tree_map_with_path(
      node, params, is_leaf=_is_packed_linear))


def _is_packed_linear(x: Any) -> bool:
  return isinstance(x, dict) and "qweight" in x and "wscale" in x


def param_shardings(params: Params, mesh: jax.sharding.Mesh, *,
                    config: LlamaConfig | None = None) -> Params:
  """`NamedSharding`s placing the params Megatron style on `mesh`.

  Args:
    params: as for `param_specs`.
    mesh: a mesh with axis 'tp' (`make_mesh`).
    config: if given, its head, kv head, FFN and vocabulary sizes are
      checked first (`check_config`), so the error names the config field.

  Returns:
    A pytree like `params` of `NamedSharding`.

  Raises:
    ValueError: a size is not divisible by the mesh's tp.
  """
  tp = _tp(mesh)
  if config is not None:
    check_config(config, tp)
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      param_specs(params, tp),
                      is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Params, mesh: jax.sharding.Mesh, *,
                 config: LlamaConfig | None = None) -> Params:
  """`jax.device_put` of the params with `param_shardings`."""
  return jax.device_put(params, param_shardings(params, mesh, config=config))


def _kv_specs(x, tp: int):
  """Specs of one cache buffer (array or `KV4`), kv heads on 'tp'."""
  def one(a, axis):
    if a.shape[axis] % tp:
      raise ValueError(f"cache of shape {a.shape}: kv heads (axis {axis},"
                       f" {a.shape[axis]}) must be divisible by {tp=}")
    return _spec(len(a.shape), axis)

  if isinstance(x, kv4_lib.KV4):  # codes [.., B, K, S, H // 2]
    return kv4_lib.KV4(codes=one(x.codes, -3), scale=one(x.scale, -2),
                       zero=one(x.zero, -2))
  return one(x, -2)  # [.., B, S, K, H]


def cache_specs(cache: kv_cache_lib.KVCache,
                tp: int) -> kv_cache_lib.KVCache:
  """`PartitionSpec`s of a `KVCache`: keys and values by kv heads.

  Args:
    cache: a float or packed KV4 cache, stacked or per-layer (arrays or
      `jax.ShapeDtypeStruct`s).
    tp: the tensor-parallel degree (for the divisibility check).

  Returns:
    A `KVCache` whose leaves are `PartitionSpec`s (start and end
    replicated).

  Raises:
    ValueError: the kv heads are not divisible by tp.
  """
  if cache.per_layer:
    k, v = (tuple(_kv_specs(x, tp) for x in kv) for kv in (cache.k, cache.v))
  else:
    k, v = (_kv_specs(x, tp) for x in (cache.k, cache.v))
  return kv_cache_lib.KVCache(k=k, v=v, start=P(), end=P())


def cache_shardings(cache: kv_cache_lib.KVCache,
                    mesh: jax.sharding.Mesh) -> kv_cache_lib.KVCache:
  """`NamedSharding`s of a `KVCache` on `mesh` (see `cache_specs`)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      cache_specs(cache, _tp(mesh)),
                      is_leaf=lambda x: isinstance(x, P))


def shard_cache(cache: kv_cache_lib.KVCache,
                mesh: jax.sharding.Mesh) -> kv_cache_lib.KVCache:
  """`jax.device_put` of the cache with `cache_shardings`."""
  return jax.device_put(cache, cache_shardings(cache, mesh))


def init_params_sharded(config: LlamaConfig, key: jax.Array,
                        mesh: jax.sharding.Mesh, dtype=jnp.float32,
                        **kwargs) -> Params:
  """`model.init_params`, jitted with `out_shardings`: each device creates
  only its shards, so the full weights never exist on one device.

  Args:
    config: model sizes (checked with `check_config`).
    key: a `jax.random.key`.
    mesh: a mesh with axis 'tp'.
    dtype: param dtype.
    **kwargs: passed to `model.init_params` (e.g. `scale`).

  Returns:
    Params placed as `param_shardings` says.

  Raises:
    ValueError: a size is not divisible by the mesh's tp.
  """
  init = lambda k: model.init_params(config, k, dtype=dtype, **kwargs)
  shardings = param_shardings(jax.eval_shape(init, key), mesh, config=config)
  return jax.jit(init, out_shardings=shardings)(key)


def forward(params: Params, tokens: jax.Array, config: LlamaConfig, *,
            mesh: jax.sharding.Mesh,
            cache: kv_cache_lib.KVCache | None = None,
            options: model.RunOptions = model.FLOAT,
            kernels: "str | kernels_lib.Kernels | None" = None):
  """`model.forward` under `jax.jit` on `mesh`, the outputs pinned.

  Pass params from `shard_params` (and a cache from `shard_cache`); GSPMD
  partitions the model from them. The logits come back replicated and the
  new cache sharded like the old one, so it can be fed to the next step.

  Args:
    params: sharded params.
    tokens: int32[B, T] (replicated).
    config: the model config.
    mesh: the mesh the params live on.
    cache: a sharded `KVCache`, or None.
    options: as for `model.forward`; packed params need
      `row_groups` equal to the mesh's tp (their o_proj/down_proj quantize
      per shard, see `shard_kernels`).
    kernels: as for `model.forward` (resolved here, once); the Pallas
      kernels run per shard inside `shard_map`.

  Returns:
    (logits f32[B, T, V], new cache or None), as `model.forward`.
  """
  return _forward(params, tokens, cache, config=config, mesh=mesh,
                  options=options, kernels=kernels_lib.resolve(kernels))


@functools.partial(jax.jit,
                   static_argnames=("config", "mesh", "options", "kernels"))
def _forward(params, tokens, cache, *, config, mesh, options, kernels):
  logits, new_cache = model.forward(params, tokens, config, cache=cache,
                                    options=options, kernels=kernels,
                                    mesh=mesh)
  logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, P()))
  if new_cache is not None:
    new_cache = jax.lax.with_sharding_constraint(
        new_cache, cache_shardings(new_cache, mesh))
  return logits, new_cache


def packed_linear(x: jax.Array, p: Params, *, mesh: jax.sharding.Mesh,
                  parallel: str, a_spec: Any, online_hadamard: bool = False,
                  kernels: "str | kernels_lib.Kernels | None" = None
                  ) -> jax.Array:
  """One packed int4 linear run per shard inside `shard_map`.

  `shard_kernels.linears` for a single linear (the one `model.forward`
  calls with a mesh; see there for 'column' and 'row').

  Args:
    x: float[..., in].
    p: {"qweight": uint8[out, in // 2], "wscale": f32[out], "bias"?}, one
      layer's packed linear.
    mesh: a mesh with axis 'tp'.
    parallel: 'column' or 'row'.
    a_spec: as for `qlinear.linear`.
    online_hadamard: as for `qlinear.linear`, per shard.
    kernels: as for `model.forward` (resolved here).

  Returns:
    [..., out], split on `out` ('column') or replicated ('row').

  Raises:
    ValueError: an unknown `parallel`.
  """
  (y,) = shard_kernels.linears(x, [p], mesh=mesh, parallel=parallel,
                               a_spec=a_spec, online_hadamard=online_hadamard,
                               kernels=kernels_lib.resolve(kernels))
  return y
