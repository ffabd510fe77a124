"""The independent reference for our float forward: transformers (torch)."""

import math
import os

import numpy as np


def hf_reference_perplexity(path: str, windows: np.ndarray, *,
                            progress: bool = True) -> dict[str, float]:
  """Perplexity of `windows` under `transformers`' own model (torch, CPU).

  The same file loaded by `AutoModelForCausalLM` (GGUF or HF directory),
  scored window by window.

  Args:
    path: a `.gguf` file or an HF checkpoint directory.
    windows: int32[n, seqlen].
    progress: show a progress bar.

  Returns:
    {'ppl', 'nll', 'windows', 'tokens'} as `evaluate.perplexity`.
  """
  import torch  # pylint: disable=g-import-not-at-top  # test-only dependency
  import tqdm  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if path.endswith(".gguf"):
    kwargs["gguf_file"] = os.path.basename(path)
    path = os.path.dirname(os.path.abspath(path))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, **kwargs)
  hf_model.eval()
  total = 0.0
  with torch.no_grad():
    for row in tqdm.tqdm(windows, desc="hf reference", disable=not progress):
      ids = torch.from_numpy(np.asarray(row[None], np.int64))
      total += hf_model(ids, labels=ids).loss.item() * (len(row) - 1)
  count = windows.shape[0] * (windows.shape[1] - 1)
  return {"ppl": math.exp(total / count), "nll": total / count,
          "windows": windows.shape[0], "tokens": count}
