"""The enwiki-gensim corpus follows data.md exactly."""

import numpy as np
import pytest

from quarot_jax import data


class _ByteTokenizer:
  """One token per byte (fast and deterministic for tests)."""

  def __call__(self, text, add_special_tokens=True):
    del add_special_tokens
    return {"input_ids": list(text.encode("utf-8"))}


def test_article_counts_and_split():
  articles = data.enwiki_gensim_articles()
  assert len(articles) == 104
  assert 3.0e6 < sum(map(len, articles)) < 3.1e6
  calib, test = data.enwiki_gensim_split()
  assert (len(calib), len(test)) == (26, 78)
  assert 0.66e6 < sum(map(len, calib)) < 0.68e6
  assert not set(calib) & set(test)
  assert calib[0] == articles[3] and test[3] == articles[4]
  assert all(len(a) >= 1000 and "'''" not in a for a in articles)


def test_eval_windows_are_the_first_non_overlapping_cuts():
  tok = _ByteTokenizer()
  windows = data.eval_windows(tok, seqlen=1000, max_windows=3)
  assert windows.shape == (3, 1000) and windows.dtype == np.int32
  stream = "\n\n".join(data.enwiki_gensim_split()[1]).encode("utf-8")
  assert bytes(windows.reshape(-1).astype(np.uint8)) == stream[:3000]


def test_calibration_windows_are_seeded_and_from_calibration_text():
  tok = _ByteTokenizer()
  a = data.calibration_windows(tok, nsamples=4, seqlen=64, seed=1)
  b = data.calibration_windows(tok, nsamples=4, seqlen=64, seed=1)
  c = data.calibration_windows(tok, nsamples=4, seqlen=64, seed=2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  calib = "\n\n".join(data.enwiki_gensim_split()[0]).encode("utf-8")
  assert all(bytes(row.astype(np.uint8)) in calib for row in a)


def test_errors():
  tok = _ByteTokenizer()
  with pytest.raises(ValueError, match="longer than the test text"):
    data.eval_windows(tok, seqlen=10 ** 8)
  with pytest.raises(ValueError, match="nsamples=0"):
    data.calibration_windows(tok, nsamples=0, seqlen=8)
