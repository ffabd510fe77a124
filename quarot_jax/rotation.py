"""QuaRot's rotations as pure, jittable transforms (params in, params out).

Follows Sections 4-5 of QuaRot (arXiv 2404.00456) and spcl/QuaRot's
`fake_quant/rotation_utils.py`. Every step leaves the model's function
unchanged (in exact arithmetic) when the forward runs with `ROTATED`
`RunOptions`:

1. `fuse_norms`: each RMSNorm scale moves into the linears that read it
   (q/k/v, gate/up, lm_head; tied embeddings are untied first). The norms
   become plain `x / rms(x)`, which commutes with any rotation.
2. `rotate_residual`: the residual stream is multiplied by an orthogonal Q
   (randomized Hadamard or random orthogonal): embeddings and the outputs of
   o_proj/down_proj by Q, the inputs of q/k/v/gate/up/lm_head by Qᵀ.
3. `rotate_down_input`: the FFN activation gets an online Hadamard H_F at run
   time; H_Fᵀ is folded into down_proj so the product is unchanged.
4. `rotate_values_and_o`: v_proj outputs are rotated per head by H_H, and the
   o_proj input gets an online Hadamard of size N·H. QuaRot writes the latter
   as H_N ⊗ I_H, which needs a Hadamard matrix of order N; we use one of
   order N·H instead, which exists also for head counts such as SmolLM2's 9
   (576 = 16·36) and mixes the heads just as well. Both are folded into
   o_proj.
5. Queries and keys are rotated by H_H after RoPE at run time
   (`RunOptions.qk_had`): it cancels in q·kᵀ and needs no weight change.

Each transform also takes Flax variables `{"params": params}` (`nn.Llama`)
and returns them wrapped the same way (`model.unwrap`).

Hadamard convention: `hadamard.fast_hadamard_transform(x)` is x @ Hn with Hn
orthogonal, so folding Hn's inverse into a kernel W [in, out] that reads the
transformed input is Hnᵀ W = (Wᵀ Hn)ᵀ.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from quarot_jax import hadamard
from quarot_jax import model
from quarot_jax.config import LlamaConfig

Params = dict[str, Any]

ROTATED = model.RunOptions(online_had_down=True, online_had_o=True,
                           qk_had=True)


def _f32(params: Params) -> Params:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def _copy(params: Params) -> Params:
  """A new nested dict (leaves shared) so transforms never mutate inputs."""
  return jax.tree.map(lambda x: x, params)


def _had_left(w: jax.Array, blocks: int = 1) -> jax.Array:
  """Hnᵀ @ w along axis -2, for w [..., n, out] (Hn block-diagonal with
  `blocks` blocks, `hadamard.block_hadamard_transform`)."""
  return jnp.swapaxes(hadamard.block_hadamard_transform(
      jnp.swapaxes(w, -1, -2), blocks), -1, -2)


def fuse_norms(params: Params, config: LlamaConfig) -> Params:
  """Folds every RMSNorm scale into the linears that follow it.

  Args:
    params: float params.
    config: the model config.

  Returns:
    f32 params whose norms have no `scale` and that always carry an explicit
    `lm_head` (tied embeddings are untied).
  """
  params, wrap = model.unwrap(params)
  del config
  p = _copy(_f32(params))
  layers, attn, mlp = p["layers"], p["layers"]["self_attn"], p["layers"]["mlp"]
  s_in = layers.pop("input_layernorm")["scale"][:, :, None]  # [L, D, 1]
  for name in ("q_proj", "k_proj", "v_proj"):
    attn[name]["kernel"] = attn[name]["kernel"] * s_in
  s_post = layers.pop("post_attention_layernorm")["scale"][:, :, None]
  for name in ("gate_proj", "up_proj"):
    mlp[name]["kernel"] = mlp[name]["kernel"] * s_post
  head = (p["lm_head"]["kernel"] if "lm_head" in p
          else p["embed_tokens"]["embedding"].T)
  p["lm_head"] = {"kernel": head * p.pop("norm")["scale"][:, None]}
  p["layers"]["input_layernorm"] = {}
  p["layers"]["post_attention_layernorm"] = {}
  p["norm"] = {}
  return wrap(p)


def rotate_residual(params: Params, q: jax.Array) -> Params:
  """Multiplies the residual stream by the orthogonal `q` f32[D, D].

  Args:
    params: params after `fuse_norms`.
    q: orthogonal [D, D].

  Returns:
    Rotated params.
  """
  params, wrap = model.unwrap(params)
  if "scale" in params["norm"] or "lm_head" not in params:
    raise ValueError("rotate_residual needs params after fuse_norms")
  p = _copy(params)
  attn, mlp = p["layers"]["self_attn"], p["layers"]["mlp"]
  p["embed_tokens"]["embedding"] = p["embed_tokens"]["embedding"] @ q
  for block, name in ((attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"),
                      (mlp, "gate_proj"), (mlp, "up_proj")):
    block[name]["kernel"] = jnp.einsum("DE,LDO->LEO", q,
                                       block[name]["kernel"])
  for block, name in ((attn, "o_proj"), (mlp, "down_proj")):
    block[name]["kernel"] = block[name]["kernel"] @ q
    if "bias" in block[name]:
      block[name]["bias"] = block[name]["bias"] @ q
  p["lm_head"]["kernel"] = q.T @ p["lm_head"]["kernel"]
  return wrap(p)


def scale_norm_outputs(params: Params, scales: jax.Array) -> Params:
  """Divides each pre-norm's output by `scales`, multiplies the linears
  after it by them (exactly invariant in float).

  OSTQuant's learnable scaling on the two norm -> linear paths of a layer:
  the norm gets the weight 1 / s (times any it has), and the rows of
  q/k/v (for s[:, 0]) or gate/up (s[:, 1]) are multiplied by s, so the
  linears' outputs are unchanged while their quantized input and weights
  see the scaled channels.

  Args:
    params: params after `fuse_norms` (rotated or not).
    scales: f32[L, 2, D], positive.

  Returns:
    The scaled params.
  """
  params, wrap = model.unwrap(params)
  p = _copy(params)
  layers = p["layers"]
  attn, mlp = layers["self_attn"], layers["mlp"]
  for j, norm, linears in ((0, "input_layernorm",
                            ((attn, "q_proj"), (attn, "k_proj"),
                             (attn, "v_proj"))),
                           (1, "post_attention_layernorm",
                            ((mlp, "gate_proj"), (mlp, "up_proj")))):
    s = scales[:, j]  # [L, D]
    weight = layers[norm].get("scale")
    layers[norm] = {"scale": (1 / s if weight is None else weight / s)}
    for block, name in linears:
      block[name]["kernel"] = block[name]["kernel"] * s[:, :, None]
  return wrap(p)


def rotate_down_input(params: Params, *, tp: int = 1) -> Params:
  """Folds H_Fᵀ into down_proj (run with `online_had_down=True`); with
  `tp` > 1, H_F is block-diagonal, one H_(F/tp) per shard (run with
  `had_blocks=tp`)."""
  params, wrap = model.unwrap(params)
  p = _copy(params)
  down = p["layers"]["mlp"]["down_proj"]
  down["kernel"] = _had_left(down["kernel"], tp)
  return wrap(p)


def rotate_values_and_o(params: Params, config: LlamaConfig,
                        r2: jax.Array | None = None, *,
                        tp: int = 1) -> Params:
  """Rotates V per head by H_H and folds it and H_(N·H) into o_proj.

  Run with `online_had_o=True`.

  Args:
    params: params (fused or not).
    config: the model config.
    r2: f32[L, H, H], an orthogonal rotation per layer to use instead of H_H
      (learned rotations, `learned_rotation`), or None for H_H.
    tp: H_(N·H) is block-diagonal with `tp` blocks, one per shard of the
      heads (run with `had_blocks=tp`).
  """
  params, wrap = model.unwrap(params)
  p = _copy(params)
  attn = p["layers"]["self_attn"]
  h, kv, n = (config.head_dim, config.num_key_value_heads,
              config.num_attention_heads)
  num_layers, d = attn["v_proj"]["kernel"].shape[:2]
  # [L, D, K, H]: each head's output columns times H_H.
  v = attn["v_proj"]["kernel"].reshape(num_layers, d, kv, h)
  rot = (hadamard.fast_hadamard_transform if r2 is None
         else lambda x: jnp.einsum("L...H,LHG->L...G", x, r2))
  attn["v_proj"]["kernel"] = rot(v).reshape(num_layers, d, kv * h)
  if "bias" in attn["v_proj"]:
    b = attn["v_proj"]["bias"].reshape(num_layers, kv, h)
    attn["v_proj"]["bias"] = rot(b).reshape(num_layers, kv * h)
  # o_proj reads out·(I_N ⊗ H_H)·H_NH; fold the inverse of both.
  o = attn["o_proj"]["kernel"].reshape(num_layers, n, h, d)  # [L, N, H, D]
  o = (_had_left(o) if r2 is None
       else jnp.einsum("LHG,LNHD->LNGD", r2, o))
  o = o.reshape(num_layers, n * h, d)
  attn["o_proj"]["kernel"] = _had_left(o, tp)
  return wrap(p)


@functools.partial(jax.jit, static_argnames=("config", "mode", "tp"))
def rotate(params: Params, config: LlamaConfig, key: jax.Array, *,
           mode: str = "hadamard", tp: int = 1) -> Params:
  """The full QuaRot rotation (steps 1-4; step 5 happens at run time).

  Args:
    params: float params.
    config: the model config.
    key: seeds the residual rotation Q.
    mode: 'hadamard' (randomized Hadamard, QuaRot's choice) or 'random'
      (Haar-random orthogonal, the paper's Table 8 comparison).
    tp: the online down/o Hadamards are block-diagonal with `tp` blocks,
      one per tensor-parallel shard (`sharding.py`), so none spans shards.

  Returns:
    f32 params to run with `ROTATED` options (with `had_blocks=tp`; plus
    any quantization).

  Raises:
    ValueError: a size has no supported Hadamard matrix (the message names
      it); with mode='random' only the online transforms still need one.
  """
  params, wrap = model.unwrap(params)
  q = hadamard.rotation_matrix(config.hidden_size, key, mode=mode)
  p = fuse_norms(params, config)
  p = rotate_residual(p, q.astype(jnp.float32))
  p = rotate_down_input(p, tp=tp)
  return wrap(rotate_values_and_o(p, config, tp=tp))
