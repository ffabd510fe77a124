r"""Tensor-parallel W4A4KV4 against bf16 at LLaMA shapes (issue #18).

  python -m experiments.bench_tp --models=llama2-70b,llama2-13b --tps=1,2 \
      --decode_batches=1,16 --cached=4096 --out_dir=results

For each model and tp (`sharding.make_mesh(tp)`), the bf16 and the packed
W4A4KV4 model, random weights created on their shards, decode (ms per
token, greedy loop over a filled cache) and prefill (--seq tokens) in one
process (`experiments/lab/tp_speed.py`). Appends tp_decode.jsonl and
tp_prefill.jsonl to --out_dir and prints a table; a model that does not
fit a device or whose heads do not divide by tp gets a record with an
`error`.
"""

import os
import shlex
import sys
import time

from absl import app
from absl import flags
import jax

from experiments.lab import benchmarking
from experiments.lab import speed
from experiments.lab import tp_speed
from quarot_jax import cli_flags

_OUT = flags.DEFINE_string("out_dir", "results", "Where JSONL goes.")
_KERNELS = cli_flags.define_kernels_flag()
_BENCH = flags.DEFINE_list("benchmarks", list(tp_speed.BENCHMARKS),
                           f"A subset of {tp_speed.BENCHMARKS}.")
_MODELS = flags.DEFINE_list("models", ["llama2-7b"],
                            f"Presets: {sorted(speed.PRESETS)}.")
_TPS = flags.DEFINE_list("tps", ["1", "2"], "Tensor-parallel degrees.")
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["1", "16"],
                                    "Batches for tp_decode.")
_CACHED = flags.DEFINE_integer("cached", 1024,
                               "Tokens in the cache before decoding.")
_NEW = flags.DEFINE_integer("new_tokens", 32,
                            "Decode steps per timed call.")
_PREFILL_BATCHES = flags.DEFINE_list("prefill_batches", ["1"],
                                     "Batches for tp_prefill.")
_SEQ = flags.DEFINE_integer("seq", 2048, "Prefill length.")
_BUDGET = flags.DEFINE_float(
    "time_budget_s", 0.0,
    "Start no case after this many seconds (0: no limit); the skipped "
    "cases get records saying so.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    speed.check_presets(_MODELS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  ints = lambda values: tuple(int(v) for v in values)
  try:
    case = tp_speed.Case(
        benchmarks=tuple(_BENCH.value), decode_batches=ints(
            _DECODE_BATCHES.value), cached=_CACHED.value,
        new_tokens=_NEW.value, prefill_batches=ints(_PREFILL_BATCHES.value),
        seq=_SEQ.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  command = shlex.join(["python", "-m", "experiments.bench_tp"]
                       + sys.argv[1:])
  begin = time.monotonic()
  deadline = begin + _BUDGET.value if _BUDGET.value > 0 else None
  print(f"jax {jax.__version__}, {len(jax.devices())} x"
        f" {jax.devices()[0].device_kind}", flush=True)
  log = lambda line: print(f"[{time.monotonic() - begin:6.1f} s] {line}",
                           flush=True)
  for name in _MODELS.value:
    for tp in ints(_TPS.value):
      records, _ = tp_speed.run_model(
          speed.PRESETS[name], name, tp, case, command=command,
          key=jax.random.key(0), kernels=_KERNELS.value, deadline=deadline,
          log=log)
      for r in records:
        line = benchmarking.summary_line(r) if r["ours_ms"] else r["case"]
        print(line, f"error: {r['error']}" if "error" in r else "",
              flush=True)
        benchmarking.append_jsonl(
            os.path.join(_OUT.value, f"{r['benchmark']}.jsonl"), [r])


if __name__ == "__main__":
  app.run(main)
