"""Key centering: a constant per layer and kv head subtracted from the keys.

Softmax is unchanged when every score of a query moves by the same amount,
and q · (k - c) = q · k - q · c moves all of a query's scores by q · c. So
subtracting one constant vector c per layer and kv head from every cached
key (after RoPE and the online head Hadamard, where the cache stores them)
leaves the float model's attention exactly as it was, up to rounding.

Why: Qwen2's k_proj bias is large in the slowest RoPE pairs (layer 0 of
Qwen2.5-Coder-1.5B: |bias| up to 354 in dims 61-63 and 124-127, where RoPE
turns by ~1e-6 rad a token, so the offset stays put), which puts an almost
constant offset of a few hundred into every key. The asymmetric per-token
4-bit key quantizer then spends its 16 levels on that offset: KV4 alone took
the model from 13.8 to 885,831 perplexity (1 window; 4,445 with QuaRot's
rotations). Centering the keys on their calibration mean removes the offset
before quantization.

`calibrate` measures the means on calibration windows (layer by layer, the
float model); `fold` stores them as params `layers/self_attn/k_center`
[L, K, H], which `model` subtracts wherever it writes keys to a cache or
attends (float and packed KV4 caches, and the fused `decode_qkv` kernel of
a decode step).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from quarot_jax import model
from quarot_jax.config import LlamaConfig

Params = dict[str, Any]


def calibrate(params: Params, config: LlamaConfig, calib_tokens: np.ndarray,
              *, options: model.RunOptions = model.FLOAT,
              batch_size: int = 8, progress: bool = False) -> jax.Array:
  """Mean cached key per layer and kv head over calibration windows.

  Args:
    params: float params (unfused q/k/v; rotated or not), without centers.
    config: the model config.
    calib_tokens: int32[n, T] calibration windows.
    options: the forward's rotation flags (`qk_had`, the online Hadamards);
      the layers run in float (activation and KV quantization off).
    batch_size: windows per forward.
    progress: a progress bar over the layers.

  Returns:
    f32[L, K, H] means of the keys as `model.cached_keys` gives them.

  Raises:
    ValueError: no calibration windows, or params already centered.
  """
  if calib_tokens is None or len(calib_tokens) == 0:
    raise ValueError("key centering needs calibration windows")
  if "k_center" in params["layers"]["self_attn"]:
    raise ValueError("params already hold layers/self_attn/k_center")
  float_options = dataclasses.replace(options, a_spec=None, k_spec=None,
                                      v_spec=None)
  tokens = np.asarray(calib_tokens, np.int32)
  t = tokens.shape[1]
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32),
                               (min(batch_size, len(tokens)), t))

  @jax.jit
  def layer_means(lp, x):
    pos = positions[:x.shape[0]]
    out, _, _, taps = model.decoder_layer(x, lp, config=config,
                                          options=float_options)
    keys = model.cached_keys(taps["qkv"], lp["self_attn"], pos,
                             config=config, options=float_options)
    return out, keys.sum(axis=(0, 1))  # [K, H]

  emb = params["embed_tokens"]["embedding"]
  xs = [emb[jnp.asarray(tokens[i:i + batch_size])].astype(jnp.float32)
        for i in range(0, len(tokens), batch_size)]
  layers_p = params["layers"]
  means = []
  for layer in tqdm.trange(config.num_hidden_layers, desc="key centers",
                           disable=not progress, leave=False):
    lp = jax.tree.map(lambda a, i=layer: a[i], layers_p)
    total = jnp.zeros((config.num_key_value_heads, config.head_dim),
                      jnp.float32)
    for j, x in enumerate(xs):
      xs[j], s = layer_means(lp, x)
      total = total + s
    means.append(total / (tokens.shape[0] * t))
  return jnp.stack(means)


def fold(params: Params, centers: jax.Array) -> Params:
  """Params with `layers/self_attn/k_center` = centers (f32[L, K, H])."""
  attn = dict(params["layers"]["self_attn"], k_center=jnp.asarray(
      centers, jnp.float32))
  return dict(params, layers=dict(params["layers"], self_attn=attn))
