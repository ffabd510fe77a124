"""The `enwiki-gensim` corpus: real English text for calibration and eval.

English Wikipedia articles from the sample dump shipped in the `gensim`
wheel (CC BY-SA text), cleaned and split exactly as ../shared/data.md says:
pages in file order, redirects skipped, `filter_wiki`, bold/italic quotes
removed, lines stripped, empty lines dropped, articles of >= 1000 characters
kept; article k is calibration text iff k % 4 == 3, test text otherwise.

The cleaned articles are cached as JSON under $QUAROT_JAX_CACHE (default
~/.cache/quarot_jax), written atomically; with the cache present gensim is
not needed (the GPU machine uses a carried copy).
"""

import bz2
import functools
import json
import os
import tempfile
from typing import Any

import numpy as np

EVAL_TEXT_NAME = "enwiki-gensim"
_DUMP = ("test/test_data/"
         "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
_CACHE_FILE = "enwiki_gensim_v1.json"
MIN_CHARS = 1000


def cache_dir() -> str:
  """Where cleaned text is cached ($QUAROT_JAX_CACHE or ~/.cache/...)."""
  return os.environ.get("QUAROT_JAX_CACHE",
                        os.path.expanduser("~/.cache/quarot_jax"))


def _clean_articles_from_gensim() -> list[str]:
  try:
    import gensim  # pylint: disable=g-import-not-at-top
    from gensim.corpora import wikicorpus  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("the enwiki-gensim text ships in the gensim wheel:"
                     " pip install gensim") from e
  path = os.path.join(os.path.dirname(gensim.__file__), _DUMP)
  if not os.path.isfile(path):
    raise ValueError(f"gensim's Wikipedia sample is missing at {path!r}")
  articles = []
  with bz2.open(path) as f:
    for _, text, _ in wikicorpus.extract_pages(f):
      if text.lstrip().lower().startswith("#redirect"):
        continue
      text = wikicorpus.filter_wiki(text).replace("'''", "").replace("''", "")
      text = "\n".join(line.strip() for line in text.split("\n")
                       if line.strip())
      if len(text) >= MIN_CHARS:
        articles.append(text)
  return articles


@functools.lru_cache(maxsize=1)
def _articles() -> tuple[str, ...]:
  path = os.path.join(cache_dir(), _CACHE_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      return tuple(json.load(f))
  articles = _clean_articles_from_gensim()
  os.makedirs(cache_dir(), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(articles, f)
  os.replace(tmp, path)
  return tuple(articles)


def enwiki_gensim_articles() -> list[str]:
  """All cleaned articles, in file order (104 of them)."""
  return list(_articles())


def enwiki_gensim_split() -> tuple[list[str], list[str]]:
  """(calibration articles, test articles): k % 4 == 3 is calibration."""
  articles = _articles()
  calib = [a for k, a in enumerate(articles) if k % 4 == 3]
  test = [a for k, a in enumerate(articles) if k % 4 != 3]
  return calib, test


def _token_stream(tokenizer: Any, articles: list[str]) -> np.ndarray:
  ids = tokenizer("\n\n".join(articles), add_special_tokens=False)[
      "input_ids"]
  return np.asarray(ids, np.int32)


def eval_windows(tokenizer: Any, *, seqlen: int = 2048,
                 max_windows: int | None = None) -> np.ndarray:
  """Non-overlapping evaluation windows of the test text.

  Args:
    tokenizer: an HF tokenizer.
    seqlen: tokens per window.
    max_windows: keep only the first N windows (None: all).

  Returns:
    int32[n, seqlen] (the remainder after the last full window is dropped).

  Raises:
    ValueError: seqlen is not positive or longer than the text.
  """
  if seqlen <= 1:
    raise ValueError(f"{seqlen=} must be at least 2")
  stream = _token_stream(tokenizer, enwiki_gensim_split()[1])
  n = len(stream) // seqlen
  if n == 0:
    raise ValueError(f"{seqlen=} is longer than the test text"
                     f" ({len(stream)} tokens)")
  if max_windows is not None:
    n = min(n, max_windows)
  return stream[:n * seqlen].reshape(n, seqlen)


def calibration_windows(tokenizer: Any, *, nsamples: int, seqlen: int,
                        seed: int = 0) -> np.ndarray:
  """Random windows of the calibration text (GPTQ Hessians, clip search).

  Returns:
    int32[nsamples, seqlen], starts drawn with a fixed-seed numpy Generator.

  Raises:
    ValueError: non-positive sizes or seqlen longer than the text.
  """
  if nsamples <= 0 or seqlen <= 1:
    raise ValueError(f"{nsamples=} and {seqlen=} must be positive")
  stream = _token_stream(tokenizer, enwiki_gensim_split()[0])
  if len(stream) <= seqlen:
    raise ValueError(f"{seqlen=} is longer than the calibration text"
                     f" ({len(stream)} tokens)")
  starts = np.random.default_rng(seed).integers(0, len(stream) - seqlen,
                                                size=nsamples)
  return np.stack([stream[s:s + seqlen] for s in starts])
