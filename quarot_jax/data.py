"""Real text for calibration and eval: `enwiki-gensim` and `code-sympy`.

`enwiki-gensim`: English Wikipedia articles from the sample dump shipped in
the `gensim` wheel (CC BY-SA text), cleaned and split exactly as
../shared/data.md says: pages in file order, redirects skipped,
`filter_wiki`, bold/italic quotes removed, lines stripped, empty lines
dropped, articles of >= 1000 characters kept. The cleaned articles are
cached as JSON under $QUAROT_JAX_CACHE (default ~/.cache/quarot_jax),
written atomically; with the cache present gensim is not needed (the GPU
machine uses a carried copy).

`code-sympy`: the Python sources of the pinned sympy 1.13.3 wheel (BSD),
read as a zip (never installed, never vendored): members under `sympy/`
ending in `.py`, none under a `/tests/` or `/benchmarks/` folder, sorted by
name, UTF-8, files of >= 1000 characters kept (708 files). The wheel is
found in the cache, or fetched there once with `pip download`, and its
sha256 is checked either way.

In both, document k (0-based, in that order) is calibration text iff
k % 4 == 3, test text otherwise. Evaluation joins the test documents with
two newlines, tokenizes once and cuts non-overlapping windows.
"""

import bz2
import functools
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, Sequence

import numpy as np

from quarot_jax import atomic

EVAL_TEXT_NAME = "enwiki-gensim"
CODE_TEXT_NAME = "code-sympy"
# Every text `eval_windows` and `calibration_windows` can read.
TEXTS = (EVAL_TEXT_NAME, CODE_TEXT_NAME)
SYMPY_VERSION = "1.13.3"
SYMPY_WHEEL = f"sympy-{SYMPY_VERSION}-py3-none-any.whl"
SYMPY_SHA256 = (
    "54612cf55a62755ee71824ce692986f23c88ffa77207b30c1368eda4a7060f73")
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


def calibration_split(docs: Any) -> tuple[list[str], list[str]]:
  """(calibration, test) documents: document k is calibration iff k % 4 == 3.

  Args:
    docs: the documents of one text, in its order.

  Returns:
    (calibration documents, test documents), each in order.
  """
  docs = list(docs)
  calib = [d for k, d in enumerate(docs) if k % 4 == 3]
  test = [d for k, d in enumerate(docs) if k % 4 != 3]
  return calib, test


def enwiki_gensim_split() -> tuple[list[str], list[str]]:
  """(calibration articles, test articles): k % 4 == 3 is calibration."""
  return calibration_split(_articles())


def _fetch_sympy_wheel(dest: str) -> None:
  """`pip download`s the pinned wheel and moves it to `dest` (atomic)."""
  with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--only-binary=:all:", "--dest", tmp, f"sympy=={SYMPY_VERSION}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    got = os.path.join(tmp, SYMPY_WHEEL)
    if done.returncode or not os.path.isfile(got):
      raise ValueError(f"{' '.join(cmd)} failed ({done.returncode}):"
                       f" {done.stderr[-500:]}")
    os.replace(got, dest)


def find_sympy_wheel(*, fetch: bool = True) -> str:
  """Path of the pinned sympy wheel in the cache, checked by sha256.

  Args:
    fetch: if it is not cached, `pip download` it into the cache (the only
      network access of this module); with False, raise instead.

  Returns:
    `cache_dir()/sympy-1.13.3-py3-none-any.whl`.

  Raises:
    ValueError: absent (and `fetch` is False, or pip failed), or its
      sha256 is not `SYMPY_SHA256`.
  """
  path = os.path.join(cache_dir(), SYMPY_WHEEL)
  if not os.path.isfile(path):
    if not fetch:
      raise ValueError(f"{path!r} is missing: pip download --no-deps"
                       f" sympy=={SYMPY_VERSION} -d {cache_dir()}")
    os.makedirs(cache_dir(), exist_ok=True)
    _fetch_sympy_wheel(path)
  digest = atomic.file_sha256(path)
  if digest != SYMPY_SHA256:
    raise ValueError(f"{path!r} has sha256 {digest}, expected {SYMPY_SHA256}"
                     " (another sympy gives other text); delete it")
  return path


def is_code_file(name: str) -> bool:
  """Whether a wheel member is a `code-sympy` source (before the size cut)."""
  return (name.startswith("sympy/") and name.endswith(".py")
          and "/tests/" not in name and "/benchmarks/" not in name)


def code_files_from_wheel(path: str) -> list[str]:
  """The `code-sympy` documents of a wheel, in member-name order.

  Args:
    path: a wheel (zip) file.

  Returns:
    The text of every `is_code_file` member of >= MIN_CHARS characters.
  """
  with zipfile.ZipFile(path) as z:
    names = sorted(n for n in z.namelist() if is_code_file(n))
    texts = [z.read(n).decode("utf-8") for n in names]
  return [t for t in texts if len(t) >= MIN_CHARS]


@functools.lru_cache(maxsize=1)
def _code_files() -> tuple[str, ...]:
  return tuple(code_files_from_wheel(find_sympy_wheel()))


def code_sympy_files() -> list[str]:
  """All `code-sympy` files, in member-name order (708 of them)."""
  return list(_code_files())


def code_sympy_split() -> tuple[list[str], list[str]]:
  """(calibration files, test files): k % 4 == 3 is calibration."""
  return calibration_split(_code_files())


def text_split(text: str) -> tuple[list[str], list[str]]:
  """(calibration, test) documents of a text named in `TEXTS`.

  Raises:
    ValueError: an unknown name.
  """
  if text == EVAL_TEXT_NAME:
    return enwiki_gensim_split()
  if text == CODE_TEXT_NAME:
    return code_sympy_split()
  raise ValueError(f"{text=} is not one of {TEXTS}")


def _token_stream(tokenizer: Any, articles: list[str]) -> np.ndarray:
  ids = tokenizer("\n\n".join(articles), add_special_tokens=False)[
      "input_ids"]
  return np.asarray(ids, np.int32)


def eval_windows(tokenizer: Any, *, seqlen: int = 2048,
                 max_windows: int | None = None,
                 text: str = EVAL_TEXT_NAME) -> np.ndarray:
  """Non-overlapping evaluation windows of the test text.

  Args:
    tokenizer: an HF tokenizer.
    seqlen: tokens per window.
    max_windows: keep only the first N windows (None: all).
    text: which text, one of `TEXTS`.

  Returns:
    int32[n, seqlen] (the remainder after the last full window is dropped).

  Raises:
    ValueError: seqlen is not positive or longer than the text, or an
      unknown text.
  """
  if seqlen <= 1:
    raise ValueError(f"{seqlen=} must be at least 2")
  stream = _token_stream(tokenizer, text_split(text)[1])
  n = len(stream) // seqlen
  if n == 0:
    raise ValueError(f"{seqlen=} is longer than the test text"
                     f" ({len(stream)} tokens)")
  if max_windows is not None:
    n = min(n, max_windows)
  return stream[:n * seqlen].reshape(n, seqlen)


def calibration_windows(tokenizer: Any, *, nsamples: int, seqlen: int,
                        seed: int = 0,
                        text: str = EVAL_TEXT_NAME) -> np.ndarray:
  """Random windows of the calibration text (GPTQ Hessians, clip search).

  Args:
    tokenizer: an HF tokenizer.
    nsamples: windows to draw.
    seqlen: tokens per window.
    seed: seeds the numpy Generator that draws the starts.
    text: which text's calibration documents, one of `TEXTS`.

  Returns:
    int32[nsamples, seqlen], starts drawn with a fixed-seed numpy Generator.

  Raises:
    ValueError: non-positive sizes, seqlen longer than the text, or an
      unknown text.
  """
  if nsamples <= 0 or seqlen <= 1:
    raise ValueError(f"{nsamples=} and {seqlen=} must be positive")
  stream = _token_stream(tokenizer, text_split(text)[0])
  if len(stream) <= seqlen:
    raise ValueError(f"{seqlen=} is longer than the calibration text"
                     f" ({len(stream)} tokens)")
  starts = np.random.default_rng(seed).integers(0, len(stream) - seqlen,
                                                size=nsamples)
  return np.stack([stream[s:s + seqlen] for s in starts])


def mixed_calibration_windows(tokenizer: Any, texts: Sequence[str], *,
                              nsamples: int, seqlen: int,
                              seed: int = 0) -> np.ndarray:
  """Calibration windows drawn evenly from several texts.

  One text gives exactly `calibration_windows` of it (so a rotation saved
  under those windows keeps its key); k texts give nsamples / k windows of
  each, drawn as `calibration_windows` draws them with the same seed.

  Args:
    tokenizer: an HF tokenizer.
    texts: names in `TEXTS`, each at most once.
    nsamples: windows in all; a multiple of len(texts).
    seqlen: tokens per window.
    seed: seeds each text's draw.

  Returns:
    int32[nsamples, seqlen], text-major in the order of `texts`.

  Raises:
    ValueError: no text, a repeated text, nsamples not a multiple of the
      number of texts, or what `calibration_windows` raises.
  """
  texts = list(texts)
  if not texts:
    raise ValueError("no calibration text given")
  for text in texts:
    if texts.count(text) > 1:
      raise ValueError(f"calibration texts {texts} name {text!r} more than"
                       " once")
  if nsamples % len(texts):
    raise ValueError(f"{nsamples=} is not a multiple of {len(texts)}, the"
                     f" number of calibration texts {texts}")
  return np.concatenate([
      calibration_windows(tokenizer, nsamples=nsamples // len(texts),
                          seqlen=seqlen, seed=seed, text=text)
      for text in texts])
