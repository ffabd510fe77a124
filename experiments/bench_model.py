r"""QuaRot W4A4KV4 against bf16 at LLaMA shapes: layer, decode, whole model.

  python -m experiments.bench_model --out_dir=results
  python -m experiments.bench_model --benchmarks=decode_memory \
      --models=llama2-7b,llama2-13b,llama3-8b

Random weights at real shapes (speed does not depend on the values); float
and quantized are timed side by side in one process. Appends one JSONL file
per benchmark to --out_dir (layer_prefill.jsonl, decode_throughput.jsonl,
decode_memory.jsonl, model_prefill.jsonl) and prints a table.
"""

import os
import shlex
import sys

from absl import app
from absl import flags
import jax

from experiments.lab import benchmarking
from experiments.lab import decode_speed
from experiments.lab import speed
from quarot_jax import cli_flags

_OUT = flags.DEFINE_string("out_dir", "results", "Where JSONL goes.")
_KERNELS = cli_flags.define_kernels_flag()
_BENCH = flags.DEFINE_list(
    "benchmarks", ["layer_prefill", "decode_memory", "decode_throughput",
                   "model_prefill"], "Which benchmarks to run.")
_MODELS = flags.DEFINE_list("models", ["llama2-7b"],
                            f"Presets: {sorted(speed.PRESETS)}.")
_LAYER_BATCHES = flags.DEFINE_list("layer_batches", ["1", "4", "16"],
                                   "Batches for layer_prefill.")
_LAYER_VARIANTS = flags.DEFINE_list(
    "layer_variants", list(speed.LAYER_PREFILL_VARIANTS),
    "layer_prefill's extra runs of the W4A4KV4 layer (each compiles the"
    f" layer again): a subset of {list(speed.LAYER_PREFILL_VARIANTS)}, or"
    " empty.")
_LAYER_STAGES = flags.DEFINE_bool(
    "layer_stages", True, "layer_prefill also times each stage alone.")
_SEQ = flags.DEFINE_integer("seq", 2048, "Prefill length (layer, model).")
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["1", "16"],
                                    "Batches for decode.")
_PREFILLS = flags.DEFINE_list("prefills", ["1024", "4096"],
                              "Tokens in the cache before decoding.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Decode steps timed.")
_MODEL_BATCHES = flags.DEFINE_list("model_batches", ["1", "4"],
                                   "Batches for model_prefill.")
_MODEL_VARIANTS = flags.DEFINE_list(
    "model_variants", list(speed.MODEL_PREFILL_VARIANTS),
    "model_prefill's extra runs of the W4A4KV4 model (each compiles the"
    f" whole model again): a subset of {list(speed.MODEL_PREFILL_VARIANTS)},"
    " or empty.")


def _cases():
  """(benchmark, function, kwargs) for every requested case."""
  ints = lambda values: [int(v) for v in values]
  for name in _MODELS.value:
    config = speed.PRESETS[name]
    for bench in _BENCH.value:
      if bench == "layer_prefill":
        for b in ints(_LAYER_BATCHES.value):
          yield bench, speed.layer_prefill, dict(
              config=config, batch=b, seq=_SEQ.value,
              variants=tuple(_LAYER_VARIANTS.value),
              stages=_LAYER_STAGES.value)
      elif bench == "decode_memory":
        for b in ints(_DECODE_BATCHES.value):
          for p in ints(_PREFILLS.value):
            yield bench, speed.decode_memory, dict(
                config=config, batch=b, prefill=p, new_tokens=_NEW.value)
      elif bench == "decode_throughput":
        for b in ints(_DECODE_BATCHES.value):
          for p in ints(_PREFILLS.value):
            yield bench, decode_speed.decode_throughput, dict(
                config=config, name=name, batch=b, cached=p,
                new_tokens=_NEW.value)
      elif bench == "model_prefill":
        for b in ints(_MODEL_BATCHES.value):
          yield bench, speed.model_prefill, dict(
              config=config, batch=b, seq=_SEQ.value,
              variants=tuple(_MODEL_VARIANTS.value))
      else:
        raise app.UsageError(f"unknown benchmark {bench!r}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    speed.check_presets(_MODELS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  command = shlex.join(["python", "-m", "experiments.bench_model"]
                       + sys.argv[1:])
  for bench, fn, kwargs in list(_cases()):
    if bench != "decode_memory":
      kwargs["key"] = jax.random.key(0)
      kwargs["kernels"] = _KERNELS.value
    try:
      records = fn(command=command, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      # One case running out of memory must not lose the others.
      print(f"{bench} {kwargs.get('batch')}: failed: {type(e).__name__}:"
            f" {str(e)[:300]}", flush=True)
      continue
    for r in records:
      print(benchmarking.summary_line(r), flush=True)
    benchmarking.append_jsonl(os.path.join(_OUT.value, f"{bench}.jsonl"),
                              records)


if __name__ == "__main__":
  app.run(main)
