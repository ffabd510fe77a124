r"""Why a block-diagonal online Hadamard (issue #18) costs W4A4 accuracy:
the int4 error of the down_proj and o_proj inputs under the full-width
transform against one Hadamard per tensor-parallel shard, layer by layer.

  python -m experiments.lab.block_rotation_error --tp=3 --seqlen=512

For each layer it takes the float model's input X of down_proj (the SwiGLU
output, [T, F]) and of o_proj (the attention output, [T, N*H], with the
per-head H_H that `rotation.rotate_values_and_o` folds into v_proj), applies
the online transform the model would (full width, or `--tp` blocks) and
prints the relative error of per-token int4 RTN (clip 0.9, as `a_spec`):
||Q(Y) - Y|| / ||Y||, summed over all tokens (the transform is orthogonal,
so this is also the error of X's reconstruction). With blocks, also with
one scale per token and shard (`RunOptions.row_groups=tp`, what the packed
model computes on a mesh) instead of one per token. The residual rotation R1
does not change these inputs' values up to the block transform, so the
float model stands in for the rotated one.
"""

import dataclasses

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.lab import activations
from experiments.lab import models
from quarot_jax import hadamard
from quarot_jax import quant

_MODEL = flags.DEFINE_string("model", None, "Model (default: SmolLM2-135M).")
_TP = flags.DEFINE_integer("tp", 3, "Blocks of the block-diagonal transform.")
_SEQLEN = flags.DEFINE_integer("seqlen", 512, "Tokens of enwiki-gensim.")
_BITS = flags.DEFINE_integer("bits", 4, "Activation bits.")


def relative_error(y: jax.Array, spec: quant.QuantSpec) -> float:
  """||fake_quant(y) - y|| / ||y|| over all of y (f32[T, C])."""
  err = quant.fake_quant(y, spec) - y
  return float(jnp.linalg.norm(err) / jnp.linalg.norm(y))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  params, config, tokens, name = models.model_and_window(_MODEL.value,
                                                         _SEQLEN.value)
  spec = quant.activation_spec(_BITS.value)
  tp, h = _TP.value, config.head_dim
  print(f"{name}: relative int{_BITS.value} error of the online-transformed"
        f" input, full width / {tp} blocks, {_SEQLEN.value} tokens")
  print(f"{'layer':>5} {'down full':>10} {'down tp':>10} {'+ groups':>10}"
        f" {'o full':>10} {'o tp':>10} {'+ groups':>10}")
  sums = np.zeros(6)
  for layer, taps in enumerate(activations.every_layer_taps(
      params, config, tokens)):
    down = jnp.asarray(taps["down"]).reshape(-1, taps["down"].shape[-1])
    o = jnp.asarray(taps["o"]).reshape(-1, taps["o"].shape[-1])
    # The per-head H_H folded into v_proj, then the online transform.
    o = hadamard.fast_hadamard_transform(
        o.reshape(o.shape[0], -1, h)).reshape(o.shape)
    row = []
    for x in (down, o):
      shard = dataclasses.replace(spec, group_size=x.shape[-1] // tp)
      row += [relative_error(hadamard.block_hadamard_transform(x, blocks), s)
              for blocks, s in ((1, spec), (tp, spec), (tp, shard))]
    sums += row
    print(f"{layer:>5} " + " ".join(f"{e:>10.4f}" for e in row), flush=True)
  mean = sums / config.num_hidden_layers
  print(f"{'mean':>5} " + " ".join(f"{e:>10.4f}" for e in mean))


if __name__ == "__main__":
  app.run(main)
