"""The demo behind `experiments/demo.py`: float vs QuaRot W4A4KV4 text.

QuaRot runs twice: simulated (fake-quantized floats) and packed (int4
weights through the int4 matmul, 4-bit activations from the fused
Hadamard-quantize, a packed KV4 cache read by the decode-attention kernel;
the kernels' jnp references on a CPU).
"""

import time
from typing import Sequence

from quarot_jax import checkpoint
from quarot_jax import generation
from quarot_jax import quarot

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
)

W4A4KV4_RTN = quarot.QuaRotConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4,
                                  w_method="rtn", rotate=True)


def run_demo(path: str, prompts: Sequence[str], *, max_new_tokens: int = 24,
             ppl_windows: int = 2) -> str:
  """Generates with the float and the QuaRot W4A4KV4 models.

  Args:
    path: an Orbax checkpoint written by `convert.hf_to_orbax` (with its
      tokenizer).
    prompts: prompts to complete.
    max_new_tokens: tokens per prompt.
    ppl_windows: enwiki-gensim windows of 512 tokens for a quick perplexity
      check (0 skips it).

  Returns:
    A Markdown report.
  """
  params, config = checkpoint.load_params(path)
  tokenizer = checkpoint.load_tokenizer(path)
  rows = []
  lines = []
  for label, qconfig, packed in (
      ("float", None, False),
      ("QuaRot W4A4KV4 (RTN, simulated)", W4A4KV4_RTN, False),
      ("QuaRot W4A4KV4 (RTN, packed int4 + KV4)", W4A4KV4_RTN, True)):
    start = time.time()
    if qconfig is None:
      run_params, options = params, quarot.model.FLOAT
    else:
      run_params, options = quarot.quantize(params, config, qconfig,
                                            packed=packed, progress=False)
    texts = generation.generate(run_params, config, tokenizer, list(prompts),
                              max_new_tokens=max_new_tokens, options=options)
    rows.append((label, texts, time.time() - start))
    if ppl_windows:
      from quarot_jax import data  # pylint: disable=g-import-not-at-top
      from quarot_jax import evaluate  # pylint: disable=g-import-not-at-top
      windows = data.eval_windows(tokenizer, seqlen=512,
                                  max_windows=ppl_windows)
      ppl = evaluate.perplexity(run_params, config, windows, options=options,
                                batch_size=ppl_windows, progress=False)
      lines.append(f"- {label}: perplexity {ppl['ppl']:.2f} on"
                   f" {ppl['tokens']} enwiki-gensim tokens")
  out = ["| prompt | " + " | ".join(r[0] for r in rows) + " |",
         "|---" * (len(rows) + 1) + "|"]
  for i, prompt in enumerate(prompts):
    cells = [r[1][i].replace("\n", " ").replace("|", "/") for r in rows]
    out.append(f"| {prompt} | " + " | ".join(cells) + " |")
  out.append("")
  out.extend(lines)
  out.extend(f"- {label}: {secs:.1f} s (quantize + compile + generate)"
             for label, _, secs in rows)
  return "\n".join(out)
