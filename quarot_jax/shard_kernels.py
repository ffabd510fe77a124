"""The Pallas kernels run per tensor-parallel shard, inside `shard_map`.

A Pallas kernel is a custom call that XLA's GSPMD partitioner cannot split:
fed sharded operands, it would gather them onto every device. With a mesh
(axis 'tp', `sharding.make_mesh`), `model.forward` therefore runs its packed
int4 linears and its packed KV4 cache attention through this module, where
each device calls the kernels on its own shards and no weight or cache is
gathered:

  column parallel  q/k/v, gate/up: x replicated, qweight [out, in // 2] and
                   wscale [out] split on `out`; y comes out split on `out`
                   and equals the unsharded linear. No collective.
  row parallel     o_proj, down_proj: x and qweight split on `in`; each
                   device quantizes its own slice (per token, a group of
                   in/tp elements; the fused online Hadamard is H_(in/tp) per
                   slice) and the partial products meet in one `psum`
                   (all-reduce), the bias added after it. This is the
                   unsharded model with `RunOptions(row_groups=tp)`.
  KV4 attention    q [B, T, N, H] split on N, the new k/v [B, T, K, H] and
                   the packed caches on K: every head attends locally.

Placements are `sharding.py`'s; this module only reads the mesh, so
`model.py` can use it without importing `sharding.py` (which imports the
model).
"""

from typing import Any, Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels import kv4_cache as kv4_lib
from quarot_jax import kernels as kernels_lib
from quarot_jax import qlinear

AXIS = "tp"
PARALLEL = ("column", "row")

Params = dict[str, Any]


def tp_size(mesh: jax.sharding.Mesh) -> int:
  """The mesh's tensor-parallel degree (size of axis 'tp').

  Raises:
    ValueError: the mesh has no axis 'tp'.
  """
  if AXIS not in mesh.shape:
    raise ValueError(f"the mesh needs an axis {AXIS!r}, got {mesh.shape}")
  return mesh.shape[AXIS]


def linears(x: jax.Array, ps: Sequence[Params], *, mesh: jax.sharding.Mesh,
            parallel: str, a_spec: Any, online_hadamard: bool = False,
            kernels: kernels_lib.Kernels = kernels_lib.XLA,
            norm: tuple[jax.Array, float] | None = None
            ) -> list[jax.Array]:
  """`qlinear.linears` run per shard inside `shard_map`.

  Args:
    x: float[..., in] (replicated for 'column'; split on `in` for 'row',
      resharded by XLA otherwise).
    ps: packed linears {"qweight": uint8[out, in // 2], "wscale": f32[out]
      or f32[out, G] (group scales), "bias"?}, one layer's; 'row' takes
      one.
    mesh: a mesh with axis 'tp'.
    parallel: 'column' or 'row' (see the module docstring).
    a_spec: as for `qlinear.linears`.
    online_hadamard: as for `qlinear.linears`, per shard: the Hadamard of
      size in/tp on each slice for 'row' (block-diagonal with tp blocks).
    kernels: a resolved `kernels.Kernels`.
    norm: as for `qlinear.linears` ('column' only: x replicated).

  Returns:
    One [..., out_i] per linear: split on `out` ('column') or replicated
    ('row').

  Raises:
    ValueError: an unknown `parallel`, several linears or a norm for 'row',
      row parallel group scales whose G does not divide by tp, or a mesh
      without axis 'tp'.
  """
  tp = tp_size(mesh)
  grouped = ["wscale" in p and qlinear.is_grouped(p) for p in ps]
  lead = [None] * (x.ndim - 1)
  eps = None if norm is None else norm[1]

  def run(x, ps, weight):
    return qlinear.linears(
        x, ps, a_spec=a_spec, online_hadamard=online_hadamard,
        kernels=kernels, norm=None if weight is None else (weight, eps))

  if parallel == "column":
    specs = {"qweight": P(AXIS, None), "wscale": P(AXIS), "bias": P(AXIS),
             "group_wscale": P(AXIS, None)}
    x_spec, y_spec, body = P(), P(*lead, AXIS), run
  elif parallel == "row":
    if len(ps) != 1 or norm is not None:
      raise ValueError(f"row parallel takes one linear and no norm, got"
                       f" {len(ps)} linears and norm={norm is not None}")
    if grouped[0] and ps[0]["wscale"].shape[-1] % tp:
      raise ValueError(
          f"row parallel group scales split with `in`: G="
          f"{ps[0]['wscale'].shape[-1]} groups must be divisible by {tp=}")
    # Group scales [out, G] split on G: each shard's groups are its `in`.
    specs = {"qweight": P(None, AXIS), "wscale": P(), "bias": P(),
             "group_wscale": P(None, AXIS)}
    x_spec, y_spec = P(*lead, AXIS), P()

    def body(x, ps, weight):
      (p,) = ps
      (y,) = run(x, [{k: v for k, v in p.items() if k != "bias"}], weight)
      y = jax.lax.psum(y, AXIS)
      return [y + p["bias"].astype(y.dtype) if "bias" in p else y]
  else:
    raise ValueError(f"{parallel=} must be one of {PARALLEL}")
  # Zero points of asymmetric weights shard as their scales: row parallel,
  # each shard subtracts s z (sum of its slice of x), and the psum adds up.
  def spec(k, g):
    k = "wscale" if k == "wzero" else k
    return specs["group_wscale" if k == "wscale" and g else k]
  p_specs = [{k: spec(k, g) for k in p} for p, g in zip(ps, grouped)]
  args, in_specs = (x, list(ps)), (x_spec, p_specs)
  if norm is not None:  # the norm weight [in], replicated
    args, in_specs = args + (norm[0],), in_specs + (P(),)
  else:
    body = lambda x, ps, body=body: body(x, ps, None)
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                       out_specs=[y_spec] * len(ps), check_vma=False)(*args)


def kv4_attention(fn: Callable, q: jax.Array, k: jax.Array, v: jax.Array,
                  k_cache: kv4_lib.KV4, v_cache: kv4_lib.KV4, *args,
                  mesh: jax.sharding.Mesh):
  """Runs `fn(q, k, v, k_cache, v_cache, *args)` per shard of kv heads.

  Args:
    fn: the packed-cache attention (`model._packed_cache_attention` with
      its options bound), returning (out [B, T, N, H], k_cache, v_cache).
    q: [B, T, N, H] queries (split on N).
    k: [B, T, K, H] this step's keys (split on K).
    v: [B, T, K, H] values.
    k_cache: `KV4` keys, codes [B, K, S, H // 2], scale/zero [B, K, S].
    v_cache: `KV4` values.
    *args: replicated arrays (write slot, first slots, mask).
    mesh: a mesh with axis 'tp'.

  Returns:
    fn's outputs, out split on N and the caches on K.
  """
  tp_size(mesh)
  heads = P(None, None, AXIS, None)  # [B, T, N or K, H]
  cache = kv4_lib.KV4(codes=P(None, AXIS, None, None),
                      scale=P(None, AXIS, None), zero=P(None, AXIS, None))
  return jax.shard_map(
      fn, mesh=mesh,
      in_specs=(heads, heads, heads, cache, cache) + (P(),) * len(args),
      out_specs=(heads, cache, cache), check_vma=False)(
          q, k, v, k_cache, v_cache, *args)
