"""GPTQ over a whole model: layer by layer, on real calibration text.

The glue around `gptq_core` (the pure per-matrix algorithm). As in
spcl/QuaRot's `gptq_fwrd`, each decoder layer is quantized in four
sequential groups — q/k/v, o, gate/up, down — and each group's Hessian is
collected from inputs produced by the already-quantized earlier groups and
layers. Activations stay in float during calibration.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from quarot_jax import gptq_core
from quarot_jax import model
from quarot_jax.config import LlamaConfig

# Quantized in this order; each entry: (tap name, [(block, linear), ...]).
GROUPS = (
    ("qkv", (("self_attn", "q_proj"), ("self_attn", "k_proj"),
             ("self_attn", "v_proj"))),
    ("o", (("self_attn", "o_proj"),)),
    ("gate_up", (("mlp", "gate_proj"), ("mlp", "up_proj"))),
    ("down", (("mlp", "down_proj"),)),
)


def _layer_fn(config, options):
  @jax.jit
  def run(layer_params, x):
    out, _, _, taps = model.decoder_layer(x, layer_params, config=config,
                                          options=options)
    return out, taps
  return run


@jax.jit
def _hessian_update(h, n_seen, x):
  return gptq_core.accumulate_hessian(h, n_seen, x)


def gptq_quantize_params(params: Any, config: LlamaConfig,
                         calib_tokens: np.ndarray, spec: Any, *,
                         options: model.RunOptions = model.FLOAT,
                         percdamp: float = 0.01, act_order: bool = True,
                         blocksize: int = 128, batch_size: int = 8,
                         progress: bool = True,
                         return_qarrays: bool = False) -> Any:
  """Fake-quantizes every decoder linear with GPTQ.

  Args:
    params: float params (rotated or not); lm_head and embeddings stay
      float, as in QuaRot.
    config: the model config.
    calib_tokens: int32[n, T] calibration windows.
    spec: `quant.QuantSpec` for the weights.
    options: the forward's rotation flags (online Hadamards must match the
      params); any activation/KV quantization in it is ignored.
    percdamp: dampening, as a fraction of the mean Hessian diagonal.
    act_order: quantize columns in order of decreasing Hessian diagonal.
    blocksize: GPTQ's lazy-batch block size.
    batch_size: calibration windows per forward.
    progress: show a progress bar over layers.
    return_qarrays: also return the integer codes and scales.

  Returns:
    f32 params whose decoder linears hold GPTQ-quantized values; with
    `return_qarrays`, `(params, qarrays)` where `qarrays[(block, name)]` is
    a `quant.QArray` stacked over layers: values int8[L, out, in], scale
    f32[L, out, groups] (what `qlinear.pack_params` consumes).
  """
  calib_tokens = np.asarray(calib_tokens, np.int32)
  if calib_tokens.ndim != 2 or calib_tokens.shape[0] == 0:
    raise ValueError(f"calib_tokens must be int32[n>0, T], got"
                     f" {calib_tokens.shape}")
  # The float forward of the rotated model: its online Hadamards (block-
  # diagonal ones too) without the quantizers.
  float_options = model.RunOptions(
      online_had_down=options.online_had_down,
      online_had_o=options.online_had_o, qk_had=options.qk_had,
      had_blocks=options.had_blocks)
  run = _layer_fn(config, float_options)
  params = jax.tree.map(lambda a: np.array(a, np.float32), params)
  emb = params["embed_tokens"]["embedding"]
  batches = [jnp.asarray(emb[calib_tokens[i:i + batch_size]])
             for i in range(0, calib_tokens.shape[0], batch_size)]
  layers = params["layers"]
  per_layer = {linear: [] for _, group in GROUPS for linear in group}
  for layer in tqdm.trange(config.num_hidden_layers, desc="gptq layers",
                           disable=not progress):
    lp = jax.tree.map(lambda a: jnp.asarray(a[layer]), layers)
    for tap, linears in GROUPS:
      h, n_seen = None, jnp.zeros((), jnp.int32)
      for xb in batches:
        x_in = run(lp, xb)[1][tap]
        if h is None:
          width = x_in.shape[-1]
          h = jnp.zeros((width, width), jnp.float32)
        h, n_seen = _hessian_update(h, n_seen, x_in)
      for block, name in linears:
        kernel = lp[block][name]["kernel"]  # [in, out]
        q, qarray = gptq_core.gptq_quantize(
            kernel.T, h, spec, percdamp=percdamp, blocksize=blocksize,
            act_order=act_order)
        if return_qarrays:
          per_layer[(block, name)].append(jax.device_get(qarray))
        lp[block][name]["kernel"] = q.T
        layers[block][name]["kernel"][layer] = np.asarray(q.T)
    batches = [run(lp, xb)[0] for xb in batches]
  if not return_qarrays:
    return params
  qarrays = {linear: jax.tree.map(lambda *a: np.stack(a), *arrays)
             for linear, arrays in per_layer.items()}
  return params, qarrays
