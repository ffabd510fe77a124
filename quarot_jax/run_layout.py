"""The decode run layout: per-layer weights, q/k/v and gate/up fused.

Transforms, checkpoints, sharding and `lax.scan` use the stacked layout
(`layers` leaves [L, ...], see `model.py`). A decode step is different: it
must read each weight once per token and launch as few kernels as it can,
so `generate` runs a per-layer copy, made once per call outside its decode
loop:

  layers                     a tuple of L per-layer dicts (no L axis)
  self_attn/qkv_proj         q/k/v concatenated along `out` (fuse=True)
  mlp/gate_up_proj           gate/up concatenated along `out` (fuse=True)

`model.forward` runs both layouts (and a layer with or without the fused
linears); the per-layer one needs a per-layer cache
(`kv_cache.cache_for(..., per_layer=True)`).
"""

from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]


def is_unstacked(params: Params) -> bool:
  """Whether `params["layers"]` is a tuple of per-layer dicts
  (`unstack_layers`) rather than the stacked [L, ...] layout."""
  return isinstance(params["layers"], (list, tuple))


def unstack_layers(params: Params, *, fuse: bool = False) -> Params:
  """The run layout for decoding: `layers` as a tuple of L per-layer dicts.

  The stacked layout (leaves [L, ...]) is what transforms, checkpoints and
  `lax.scan` use. A decode step over it slices every layer's weights, and
  XLA copies a slice that feeds a matmul: measured on an H200 for a
  LLaMA-2-7B shape, 11.7 ms/token against 5.3 for per-layer arrays
  (`experiments/bench_decode_structure.py`). `generate` unstacks once per
  call, outside its decode loop. Costs a second copy of the layer weights
  while both exist.

  Args:
    params: params in the stacked layout (or already unstacked).
    fuse: also give each layer one q/k/v and one gate/up linear
      (`fuse_projections`), as `generate` decodes: 4 matmuls a layer
      instead of 7.

  Returns:
    The same params with `layers` a tuple of per-layer dicts (leaves
    without the L axis); every other leaf is shared. `params` itself when
    there is nothing to do.
  """
  prepare = fuse_projections if fuse else lambda layer: layer
  if is_unstacked(params):
    per_layer = tuple(prepare(p) for p in params["layers"])
    if all(a is b for a, b in zip(per_layer, params["layers"])):
      return params
  else:
    stacked = params["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    # Fused as it is sliced: one layer's unfused slices live at a time.
    per_layer = tuple(prepare(jax.tree.map(lambda a, i=i: a[i], stacked))
                      for i in range(num_layers))
  return {**params, "layers": per_layer}


# (block, fused linear) -> the linears `fuse_projections` concatenates.
FUSED_PROJECTIONS = {
    ("self_attn", "qkv_proj"): ("q_proj", "k_proj", "v_proj"),
    ("mlp", "gate_up_proj"): ("gate_proj", "up_proj"),
}


def fuse_projections(layer: Params) -> Params:
  """One layer's q/k/v and gate/up linears, each group as one linear.

  A decode step is launch-bound (a few us per kernel, issue #14), and the
  linears of a group read the same input, so concatenating their weights
  along `out` (once, outside the decode loop) saves 3 of 7 matmuls a layer.
  `model._attention_block` and `model._mlp_block` split the output by
  static widths.
  Exact for packed linears too: weight scales are per output channel and
  the activation scale (per token) is shared by the group anyway.

    float:  kernel [D, N*H] | [D, K*H] | [D, K*H] -> qkv_proj kernel
            [D, (N + 2K)*H]; gate/up [D, F] each -> gate_up_proj [D, 2F].
    packed: qweight uint8[out_i, D // 2] -> uint8[sum out_i, D // 2],
            wscale f32[out_i] -> f32[sum out_i] (f32[out_i, G] ->
            f32[sum out_i, G] with group scales); wzero likewise.
    bias:   concatenated likewise; a linear without one adds zeros.

  Only for the per-layer run layout (`unstack_layers(..., fuse=True)`):
  transforms, checkpoints and sharding read the stacked q/k/v, gate/up.

  Args:
    layer: one layer's params (an element of `unstack_layers(params)
      ["layers"]`).

  Returns:
    The layer with `self_attn/qkv_proj` in place of `{q,k,v}_proj` and
    `mlp/gate_up_proj` in place of `{gate,up}_proj`; every other leaf is
    shared. A group already fused, or mixing packed and float linears,
    stays as it is (the model runs both); `layer` itself if no group
    changes.
  """
  out = layer
  for (block, fused), names in FUSED_PROJECTIONS.items():
    ps = [layer[block].get(name) for name in names]
    if any(p is None for p in ps):
      continue  # already fused
    weights = {frozenset(p) - {"bias"} for p in ps}
    if weights == {frozenset({"kernel"})}:
      axis, key = -1, "kernel"  # [.., in, out]
      fused_p = {"kernel": jnp.concatenate([p["kernel"] for p in ps], axis=-1)}
    elif weights in ({frozenset({"qweight", "wscale"})},
                     {frozenset({"qweight", "wscale", "wzero"})}):
      axis, key = -2, "qweight"  # [.., out, in // 2]
      fused_p = {
          "qweight": jnp.concatenate([p["qweight"] for p in ps], axis=-2)}
      # [.., out] per channel, [.., out, G] with group scales (and zero
      # points of asymmetric weights likewise)
      for name in sorted(next(iter(weights)) - {"qweight"}):
        fused_p[name] = jnp.concatenate(
            [p[name] for p in ps],
            axis=-2 if ps[0][name].ndim == ps[0]["qweight"].ndim else -1)
    else:
      continue  # packed and float mixed
    if any("bias" in p for p in ps):
      dtype = next(p["bias"].dtype for p in ps if "bias" in p)
      fused_p["bias"] = jnp.concatenate(
          [p["bias"] if "bias" in p else jnp.zeros(
              p[key].shape[:-2] + (p[key].shape[axis],), dtype)
           for p in ps], axis=-1)
    rest = {k: v for k, v in layer[block].items() if k not in names}
    out = {**out, block: {**rest, fused: fused_p}}
  return out
