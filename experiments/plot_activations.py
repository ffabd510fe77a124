r"""Figure 1 of the paper: per-channel activation magnitudes before/after
rotation, at one layer's FFN inputs.

  python -m experiments.plot_activations --layer=10 --out=results/fig1.png
"""

from absl import app
from absl import flags
import jax

from experiments.lab import activations
from experiments.lab import models
from quarot_jax import rotation

_MODEL = flags.DEFINE_string("model", None, "Model (default: SmolLM2-135M).")
_LAYER = flags.DEFINE_integer("layer", 10, "0-based decoder layer.")
_TAP = flags.DEFINE_enum("tap", "down", ["qkv", "o", "gate_up", "down"],
                         "Which linear's input to plot.")
_SEQLEN = flags.DEFINE_integer("seqlen", 512, "Tokens of enwiki-gensim.")
_OUT = flags.DEFINE_string("out", "results/activations_smollm2.png",
                           "Output PNG.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  params, config, tokens, name = models.model_and_window(_MODEL.value,
                                                         _SEQLEN.value)
  before = activations.layer_taps(params, config, tokens, _LAYER.value)
  rotated = rotation.rotate(params, config, jax.random.key(0))
  after = activations.layer_taps(rotated, config, tokens, _LAYER.value,
                                 options=rotation.ROTATED)
  activations.plot_channel_magnitudes(
      before[_TAP.value], after[_TAP.value], _OUT.value,
      title=f"{name}: input of {_TAP.value} at layer {_LAYER.value}")
  print(f"max/median channel: {activations.outlier_ratio(before[_TAP.value]):.1f}"
        f" -> {activations.outlier_ratio(after[_TAP.value]):.1f};"
        f" wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
