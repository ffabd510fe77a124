"""Tiny random Hugging Face models of each supported family, for parity tests.

Each is built with `transformers`, saved with `save_pretrained` (safetensors)
and read back by our loader: nothing is downloaded. The folders live under
one temp directory that is removed when the Python process exits.
"""

import atexit
import functools
import os
import shutil
import tempfile

import numpy as np

FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "smollm")


def _hf_config(family: str):
  import transformers  # pylint: disable=g-import-not-at-top
  common = dict(vocab_size=97, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
  if family == "llama2":
    return transformers.LlamaConfig(**common)
  if family == "llama3":
    common.update(num_key_value_heads=1, rope_theta=500000.0,
                  rope_scaling=dict(rope_type="llama3", factor=8.0,
                                    low_freq_factor=1.0,
                                    high_freq_factor=4.0,
                                    original_max_position_embeddings=64))
    return transformers.LlamaConfig(**common)
  if family == "mistral":
    common.update(num_key_value_heads=2, sliding_window=None)
    return transformers.MistralConfig(**common)
  if family == "qwen2":
    common.update(num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.Qwen2Config(**common)
  if family == "smollm":
    # Like SmolLM2: 3 query heads per KV head, tied, odd head count.
    common.update(hidden_size=72, num_attention_heads=6,
                  num_key_value_heads=2, tie_word_embeddings=True,
                  rope_theta=100000.0)
    return transformers.LlamaConfig(**common)
  raise ValueError(f"unknown {family=}")


@functools.cache
def _root() -> str:
  """One temp directory per process, removed at exit."""
  root = tempfile.mkdtemp(prefix="quarot_jax_tests_")
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  return root


@functools.lru_cache(maxsize=None)
def tiny_hf_model(family: str) -> tuple[str, object]:
  """Saves a tiny random HF model of `family`; returns (dir, torch model)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(sum(map(ord, family)))
  config = _hf_config(family)
  model = transformers.AutoModelForCausalLM.from_config(
      config, torch_dtype=torch.float32)
  # Random norm scales and biases, so that every weight matters.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.05 * torch.randn_like(p))
  model.eval()
  path = os.path.join(_root(), f"tiny_{family}", "hf")
  model.save_pretrained(path, safe_serialization=True)
  return path, model


def random_tokens(vocab: int, batch: int, length: int, seed: int = 0):
  """int32[batch, length] random ids (avoiding the special ids 0-2)."""
  rng = np.random.default_rng(seed)
  return rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
