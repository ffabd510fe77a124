"""Perplexity and multiple-choice scoring against direct computations."""

import math

import jax
import numpy as np
import pytest
import torch

from quarot_jax import evaluate
from quarot_jax import hf
from tests import hf_models


@pytest.fixture(scope="module")
def tiny():
  path, torch_model = hf_models.tiny_hf_model("llama2")
  params, config = hf.load_hf(path)
  return params, config, torch_model


def test_perplexity_matches_torch_loss(tiny):
  params, config, torch_model = tiny
  windows = hf_models.random_tokens(config.vocab_size, 5, 16, seed=3)
  # batch_size 2: two full batches and one padded batch of one window.
  got = evaluate.perplexity(params, config, windows, batch_size=2,
                            progress=False)
  with torch.no_grad():
    ids = torch.from_numpy(windows).long()
    loss = torch_model(ids, labels=ids).loss.item()
  assert got["tokens"] == 5 * 15 and got["windows"] == 5
  assert got["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_perplexity_rejects_bad_windows(tiny):
  params, config, _ = tiny
  with pytest.raises(ValueError, match="windows must be"):
    evaluate.perplexity(params, config, np.zeros((0, 8), np.int32))


class _SplitTokenizer:
  """Maps each space-separated word to a fixed id (tests only)."""

  def encode(self, text, add_special_tokens=True):
    del add_special_tokens
    return [3 + (sum(map(ord, w)) % 90) for w in text.split()]


def test_continuation_logprob_is_the_sum_of_token_logprobs(tiny):
  params, config, torch_model = tiny
  ctx, cont = [5, 9, 11], [20, 21]
  got = evaluate.continuation_logprob(params, config, ctx, cont)
  with torch.no_grad():
    logits = torch_model(torch.tensor([ctx + cont])).logits[0]
  logp = torch.log_softmax(logits, -1)
  want = logp[2, 20].item() + logp[3, 21].item()
  assert got == pytest.approx(want, abs=1e-4)


def test_score_choices_picks_the_most_likely(tiny):
  params, config, _ = tiny
  tok = _SplitTokenizer()
  ctx = "alpha beta gamma"
  choices = ("delta", "epsilon zeta", "eta")
  lps = [evaluate.continuation_logprob(params, config, tok.encode(ctx),
                                       tok.encode(c)) for c in choices]
  best = int(np.argmax(lps))
  items = [evaluate.ChoiceItem(context=ctx, choices=choices, label=best),
           evaluate.ChoiceItem(context=ctx, choices=choices,
                               label=(best + 1) % 3)]
  got = evaluate.score_choices(params, config, tok, items, progress=False)
  assert got["acc"] == 0.5 and got["items"] == 2
