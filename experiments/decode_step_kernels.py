"""Which kernels one decode step launches, grouped by the line that made
them (issue #14: measure the structure before the kernels).

Compiles one decode step (`model.forward` on one new token, per-layer
params and cache as `generate` runs them) of a LLaMA preset cut to a few
layers, and prints each launched HLO instruction's kind and the source
line in its metadata, counted per layer. The optimized HLO goes to
`--out_dir` for reading. With `--profile_steps=N` it also traces N decode
steps (the benchmark's `fori_loop`, same layers) and prints, per step, the
GPU's busy and idle time and the kernels that took it
(`experiments/lab/kernel_profile.py`): whether bytes or launches bind.

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
from experiments.lab import kernel_profile
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
_WHICH = flags.DEFINE_multi_enum(
    "which", ["bf16", "w4a4kv4"], ["bf16", "w4a4kv4"], "Models compiled.")
_PROFILE = flags.DEFINE_integer(
    "profile_steps", 0, "Decode steps traced on the device (0: none).")

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
    if label not in _WHICH.value:
      continue
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
    if _PROFILE.value:
      _profile(label, params, cache, tok, config, opts)


def _profile(label, params, cache, tok, config, options):
  """Prints where `--profile_steps` decode steps spend the GPU's time."""
  steps = _PROFILE.value
  fn = decode_speed.decode_fn(config, steps, options, _KERNELS.value)
  tok, cache = jax.block_until_ready(fn(params, cache, tok))  # compiles
  events = kernel_profile.trace_kernels(fn, params, cache, tok)
  if not events:
    print(f"{label}: no device kernels traced (not a GPU?)")
    return
  print(f"{label}: per decode step ({steps} traced, {_LAYERS.value} layers)")
  print(kernel_profile.table(kernel_profile.summarize(events, steps)))


if __name__ == "__main__":
  app.run(main)
