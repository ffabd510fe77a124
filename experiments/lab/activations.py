"""Per-channel activation magnitudes at one layer (the paper's Figure 1)."""

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from quarot_jax import model
from quarot_jax.config import LlamaConfig


def layer_taps(params: Any, config: LlamaConfig, tokens: np.ndarray,
               layer: int, *, options: model.RunOptions = model.FLOAT
               ) -> dict[str, np.ndarray]:
  """Inputs of every linear of decoder layer `layer`.

  Args:
    params: model params (float or rotated).
    config: the model config.
    tokens: int32[B, T].
    layer: 0-based layer index.
    options: must match the params (ROTATED for rotated params).

  Returns:
    {'qkv', 'o', 'gate_up', 'down'} -> f32[B, T, width] (unquantized).

  Raises:
    ValueError: `layer` is out of range.
  """
  if not 0 <= layer < config.num_hidden_layers:
    raise ValueError(f"{layer=} must be in [0, {config.num_hidden_layers})")
  for i, taps in enumerate(every_layer_taps(params, config, tokens,
                                            options=options)):
    if i == layer:
      return taps
  raise AssertionError("unreachable")


def every_layer_taps(params: Any, config: LlamaConfig, tokens: np.ndarray,
                     *, options: model.RunOptions = model.FLOAT
                     ) -> Iterator[dict[str, np.ndarray]]:
  """`layer_taps` of layers 0, 1, ... in turn, one forward pass in all (one
  jitted layer, each layer run once)."""
  step = jax.jit(lambda p, x: model.decoder_layer(
      x, p, config=config, options=options))
  x = jnp.asarray(params["embed_tokens"]["embedding"])[jnp.asarray(tokens)]
  for i in range(config.num_hidden_layers):
    lp = jax.tree.map(lambda a, i=i: jnp.asarray(a[i]), params["layers"])
    x, _, _, taps = step(lp, x)
    yield {k: np.asarray(v, np.float32) for k, v in taps.items()}


def channel_absmax(x: np.ndarray) -> np.ndarray:
  """Max |x| per channel over all tokens: f32[C] from [..., C]."""
  return np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)


def outlier_ratio(x: np.ndarray) -> float:
  """Largest channel max over the median channel max (1 = no outliers)."""
  m = channel_absmax(x)
  return float(m.max() / np.median(m))


def plot_channel_magnitudes(before: np.ndarray, after: np.ndarray, path: str,
                            *, title: str) -> None:
  """Writes a two-panel PNG of per-channel max |x| before/after rotation.

  Args:
    before: [..., C] activations of the original model.
    after: [..., C] the same activations in the rotated model.
    path: output PNG path.
    title: figure title.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
  for ax, x, name in ((axes[0], before, "original"),
                      (axes[1], after, "QuaRot (rotated)")):
    m = channel_absmax(x)
    ax.bar(np.arange(m.size), m, width=1.0, color="tab:blue")
    ax.set_title(f"{name}: max/median channel = {m.max() / np.median(m):.1f}")
    ax.set_xlabel("channel")
  axes[0].set_ylabel("max |activation| over tokens")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
