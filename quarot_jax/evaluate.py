"""Perplexity over token windows and zero-shot multiple-choice scoring.

Perplexity follows the paper's WikiText-2 protocol (non-overlapping windows,
exp of the mean next-token NLL). The multiple-choice scorer does what
lm-eval does for PIQA/ARC/HellaSwag: the log-likelihood of each continuation
given the context, `acc` by the sum and `acc_norm` by the sum per byte.
"""

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from quarot_jax import kernels as kernels_lib
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax.config import LlamaConfig


@functools.partial(jax.jit, static_argnames=("config", "options", "kernels"))
def _window_nll(params, tokens, config, options, kernels):
  """Per-window sum of next-token NLL, f32[B], for int32[B, T].

  Packed (real int4) params with 4-bit KV run through a packed KV4 cache,
  so the score is that of the real inference path.
  """
  cache = None
  if model.uses_kv4_cache(params, options):
    cache = kv_cache.cache_for(config, tokens.shape[0], tokens.shape[1],
                               packed=True)
  logits, _ = model.forward(params, tokens, config, cache=cache,
                            options=options, kernels=kernels)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return nll.sum(axis=-1)


def perplexity(params: Any, config: LlamaConfig, windows: np.ndarray, *,
               options: model.RunOptions = model.FLOAT,
               kernels: "str | kernels_lib.Kernels | None" = None,
               batch_size: int = 4,
               progress: bool = True) -> dict[str, float]:
  """Perplexity of `windows`, each scored independently.

  Args:
    params: model params.
    config: the model config.
    windows: int32[n, seqlen] token windows.
    options: rotation/quantization behaviour of the forward.
    kernels: which kernels run (`kernels.SETTINGS`, None = 'auto', or a
      resolved `kernels.Kernels`); resolved once, here.
    batch_size: windows per jitted call (the last batch is padded by
      repeating a window, whose NLL is not counted).
    progress: show a progress bar.

  Returns:
    {'ppl', 'nll' (mean), 'windows', 'tokens'} where tokens counts the
    predicted positions.

  Raises:
    ValueError: `windows` is not a non-empty 2-D array, or a `kernels`
      setting this platform cannot run.
  """
  kernels = kernels_lib.resolve(kernels)
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
    raise ValueError(f"windows must be int32[n>0, seqlen>1], got"
                     f" {windows.shape}")
  total, count = 0.0, 0
  n = windows.shape[0]
  for i in tqdm.trange(0, n, batch_size, desc="perplexity",
                       disable=not progress, leave=False):
    batch = windows[i:i + batch_size]
    real = batch.shape[0]
    if real < batch_size:  # keep one compiled shape
      batch = np.concatenate([batch, np.repeat(batch[:1],
                                               batch_size - real, 0)])
    sums = _window_nll(params, jnp.asarray(batch), config, options, kernels)
    total += float(np.asarray(sums)[:real].astype(np.float64).sum())
    count += real * (windows.shape[1] - 1)
  mean = total / count
  return {"ppl": math.exp(mean), "nll": mean, "windows": n, "tokens": count}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChoiceItem:
  """A multiple-choice item: a context and candidate continuations."""

  context: str
  choices: tuple[str, ...]
  label: int


def continuation_logprob(params: Any, config: LlamaConfig,
                         context_ids: Sequence[int],
                         continuation_ids: Sequence[int], *,
                         options: model.RunOptions = model.FLOAT,
                         kernels: "str | kernels_lib.Kernels | None" = None
                         ) -> float:
  """Sum of log p(continuation token | everything before it).

  Args:
    params: model params.
    config: the model config.
    context_ids: token ids of the context (non-empty).
    continuation_ids: token ids of the continuation (non-empty).
    options: rotation/quantization behaviour of the forward.
    kernels: which kernels run (see `perplexity`).

  Returns:
    The summed log-probability (a float <= 0).
  """
  if not context_ids or not continuation_ids:
    raise ValueError("context and continuation must be non-empty")
  ids = np.asarray([list(context_ids) + list(continuation_ids)], np.int32)
  logits, _ = model.forward(params, jnp.asarray(ids), config, options=options,
                            kernels=kernels)
  logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
  start = len(context_ids)
  targets = ids[0, start:]
  picked = logp[start - 1:ids.shape[1] - 1][np.arange(len(targets)), targets]
  return float(picked.sum())


def score_choices(params: Any, config: LlamaConfig, tokenizer: Any,
                  items: Sequence[ChoiceItem], *,
                  options: model.RunOptions = model.FLOAT,
                  kernels: "str | kernels_lib.Kernels | None" = None,
                  progress: bool = True) -> dict[str, float]:
  """Zero-shot accuracy on multiple-choice items.

  Each choice is scored as a continuation of the context (a space joins
  them when the choice does not start with one, as lm-eval does).
  `kernels` is resolved once, here (see `perplexity`).

  Returns:
    {'acc', 'acc_norm', 'items'}.
  """
  kernels = kernels_lib.resolve(kernels)
  correct = correct_norm = 0
  for item in tqdm.tqdm(items, desc="choices", disable=not progress,
                        leave=False):
    ctx = tokenizer.encode(item.context)
    scores, norm = [], []
    for choice in item.choices:
      text = choice if choice.startswith(" ") else " " + choice
      cont = tokenizer.encode(text, add_special_tokens=False)
      lp = continuation_logprob(params, config, ctx, cont, options=options,
                                kernels=kernels)
      scores.append(lp)
      norm.append(lp / len(text.encode("utf-8")))
    correct += int(np.argmax(scores) == item.label)
    correct_norm += int(np.argmax(norm) == item.label)
  return {"acc": correct / len(items), "acc_norm": correct_norm / len(items),
          "items": len(items)}
