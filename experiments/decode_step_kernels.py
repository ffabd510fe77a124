"""Which kernels one decode step launches, grouped by the line that made
them (issue #14: measure the structure before the kernels).

Compiles one decode step (`model.forward` on one new token, per-layer
params and cache as `generate` runs them) of a LLaMA preset cut to a few
layers, and prints each launched HLO instruction's kind and the source
line in its metadata, counted per layer. The optimized HLO goes to
`--out_dir` for reading.

Usage on the GPU:
  bash experiments/device/run.sh py experiments.decode_step_kernels \
      --model=llama2-7b --layers=2 --batch=1
"""

import collections
import dataclasses
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments.lab import decode_speed
from experiments.lab import speed
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import run_layout

_MODEL = flags.DEFINE_enum("model", "llama2-7b", list(speed.PRESETS),
                           "Shapes.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Decoder layers compiled.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences decoded.")
_CACHED = flags.DEFINE_integer("cached", 1024, "Cache slots.")
_KERNELS = flags.DEFINE_string("kernels", "auto", "kernels= setting.")
_OUT = flags.DEFINE_string("out_dir", "/tmp", "Where the HLO text goes.")

def main(argv):
  del argv
  config = dataclasses.replace(speed.PRESETS[_MODEL.value],
                               num_hidden_layers=_LAYERS.value)
  key = jax.random.key(0)
  fparams = model.init_params(config, key, dtype=jnp.bfloat16)
  tok = jnp.zeros((_BATCH.value, 1), jnp.int32)
  for label, params, packed, opts in (
      ("bf16", fparams, False, model.FLOAT),
      ("w4a4kv4", speed.packed_like(fparams, key), True,
       speed.W4A4KV4.run_options(config.head_dim))):
    params = run_layout.unstack_layers(params, fuse=True)  # as generate
    cache = kv_cache.cache_for(config, _BATCH.value, _CACHED.value,
                               dtype=jnp.bfloat16, packed=packed,
                               per_layer=True)
    step = jax.jit(lambda p, c, t, o=opts: model.forward(  # as generate:
        p, t, config, cache=c, options=o, kernels=_KERNELS.value),
        donate_argnums=1)  # the cache updated in place
    text = step.lower(params, cache, tok).compile().as_text()
    with open(os.path.join(_OUT.value, f"decode_step_{label}.hlo"), "w") as f:
      f.write(text)
    kernels = decode_speed.launched(text)
    print(f"\n{label}: {len(kernels)} launches for {_LAYERS.value} layers"
          f" ({_MODEL.value} shapes, batch {_BATCH.value})")
    for (kind, where), n in sorted(collections.Counter(kernels).items(),
                                   key=lambda kv: kv[0][1]):
      print(f"  {n / _LAYERS.value:5.1f}/layer  {kind:<12} {where}")


if __name__ == "__main__":
  app.run(main)
