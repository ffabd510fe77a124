"""Where one decoder layer's prefill spends the GPU's time, kernel by
kernel (issue #15: which stages stand between the W4A4KV4 layer and 1.5x
bf16).

Traces one call of the layer `bench_model`'s layer_prefill times (random
weights at a LLaMA preset's shapes, T tokens, batch B), bf16 and packed
W4A4KV4 with the same kernels setting, and prints each one's kernels by
name and time (`experiments/lab/kernel_profile.py`). Stage timings jitted
alone vary 2-4x at B = 1 (BENCHMARKS.md); one trace of the whole layer
does not separate them from their neighbours.

Usage on the GPU:
  bash experiments/device/run.sh py experiments.prefill_layer_kernels \\
      --model=llama2-7b --batches=1,16
"""

import dataclasses

from absl import app
from absl import flags
import jax

from experiments.lab import kernel_profile
from experiments.lab import speed
from quarot_jax import kernels as kernels_lib
from quarot_jax import model

_MODEL = flags.DEFINE_enum("model", "llama2-7b", list(speed.PRESETS),
                           "Shapes.")
_BATCHES = flags.DEFINE_list("batches", ["16"], "Batches traced.")
_SEQ = flags.DEFINE_integer("seq", 2048, "Prefill length.")
_KERNELS = flags.DEFINE_string("kernels", "auto", "kernels= setting.")
_PREFILL_QKV = flags.DEFINE_bool(
    "prefill_qkv", False, "Also trace the W4A4KV4 layer with the other"
    " kernels.prefill_qkv setting (the fused RoPE/Hadamard/KV4 launch on"
    " or off).")
_TOP = flags.DEFINE_integer("top", 30, "Kernel names printed per table.")


def main(argv):
  del argv
  kernels = kernels_lib.resolve(_KERNELS.value)
  config = speed.PRESETS[_MODEL.value]
  for batch in (int(b) for b in _BATCHES.value):
    lp = speed.layer_prefill_inputs(config, batch, _SEQ.value,
                                    jax.random.key(0))
    runs = [("bf16", (lp.flayer, lp.x, lp.fcache, model.FLOAT, kernels)),
            ("w4a4kv4", (lp.qlayer, lp.x, lp.qcache, lp.options, kernels))]
    if _PREFILL_QKV.value:
      other = "xla" if kernels.prefill_qkv == "pallas" else "pallas"
      runs.append((f"w4a4kv4 with prefill_qkv={other}",
                   (lp.qlayer, lp.x, lp.qcache, lp.options,
                    dataclasses.replace(kernels, prefill_qkv=other))))
    for label, args in runs:
      fn = lambda *a: lp.run(*a)
      for _ in range(3):  # compile and warm up
        jax.block_until_ready(fn(*args))
      events = kernel_profile.trace_kernels(fn, *args)
      if not events:
        print(f"{label}: no device kernels traced (not a GPU?)")
        continue
      print(f"\n{label}, {_MODEL.value} one layer, batch {batch},"
            f" {_SEQ.value} tokens:")
      print(kernel_profile.table(kernel_profile.summarize(events),
                                 top=_TOP.value))


if __name__ == "__main__":
  app.run(main)
