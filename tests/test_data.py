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


def test_mixed_calibration_windows_draw_evenly_from_each_text(monkeypatch):
  docs = {"enwiki-gensim": (["a" * 3000], ["t"]),
          "code-sympy": (["b" * 3000], ["u"])}
  monkeypatch.setattr(data, "text_split", lambda text: docs[text])
  tok = _ByteTokenizer()
  mixed = data.mixed_calibration_windows(
      tok, ["enwiki-gensim", "code-sympy"], nsamples=6, seqlen=64, seed=1)
  assert mixed.shape == (6, 64) and mixed.dtype == np.int32
  assert (mixed[:3] == ord("a")).all() and (mixed[3:] == ord("b")).all()
  # One text is exactly calibration_windows (saved rotations keep their key).
  np.testing.assert_array_equal(
      data.mixed_calibration_windows(tok, ["code-sympy"], nsamples=4,
                                     seqlen=64, seed=1),
      data.calibration_windows(tok, nsamples=4, seqlen=64, seed=1,
                               text="code-sympy"))
  with pytest.raises(ValueError, match="nsamples=5 is not a multiple of 2"):
    data.mixed_calibration_windows(tok, ["enwiki-gensim", "code-sympy"],
                                   nsamples=5, seqlen=64)
  with pytest.raises(ValueError, match="no calibration text"):
    data.mixed_calibration_windows(tok, [], nsamples=4, seqlen=64)
  with pytest.raises(ValueError, match="'code-sympy' more than once"):
    data.mixed_calibration_windows(tok, ["code-sympy", "code-sympy"],
                                   nsamples=4, seqlen=64)


def test_errors():
  tok = _ByteTokenizer()
  with pytest.raises(ValueError, match="longer than the test text"):
    data.eval_windows(tok, seqlen=10 ** 8)
  with pytest.raises(ValueError, match="nsamples=0"):
    data.calibration_windows(tok, nsamples=0, seqlen=8)


# ----- code-sympy


def _zip(path, members):
  import zipfile  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(path, "w") as z:
    for name, text in members:
      z.writestr(name, text)
  return str(path)


def test_code_files_filter_and_order(tmp_path):
  long = lambda tag: f"# {tag}\n" + "x = 1\n" * 200  # > 1000 characters
  wheel = _zip(tmp_path / "tiny.whl", [  # written out of name order
      ("sympy/core/z.py", long("z")),
      ("sympy/a.py", long("a")),
      ("sympy/core/tests/test_a.py", long("test")),
      ("sympy/benchmarks/bench_a.py", long("bench")),
      ("sympy/utilities/tests_helper.py", long("helper")),  # not /tests/
      ("sympy/short.py", "x = 1\n"),
      ("sympy/notes.txt", long("txt")),
      ("other/b.py", long("other")),
      ("sympy-1.13.3.dist-info/RECORD", long("record")),
  ])
  files = data.code_files_from_wheel(wheel)
  assert [f.split("\n")[0] for f in files] == ["# a", "# z", "# helper"]


def test_calibration_split_takes_every_fourth_from_the_fourth():
  calib, test = data.calibration_split(f"doc{k}" for k in range(10))
  assert calib == ["doc3", "doc7"]
  assert test == ["doc0", "doc1", "doc2", "doc4", "doc5", "doc6", "doc8",
                  "doc9"]


def test_sympy_wheel_is_checked(tmp_path, monkeypatch):
  monkeypatch.setenv("QUAROT_JAX_CACHE", str(tmp_path))
  with pytest.raises(ValueError, match="is missing: pip download"):
    data.find_sympy_wheel(fetch=False)
  (tmp_path / data.SYMPY_WHEEL).write_bytes(b"not the wheel")
  with pytest.raises(ValueError, match="has sha256 .*, expected 54612cf5"):
    data.find_sympy_wheel(fetch=False)


def test_unknown_text():
  with pytest.raises(ValueError, match="text='wikitext2' is not one of"):
    data.eval_windows(_ByteTokenizer(), text="wikitext2")


class _ArrayByteTokenizer:
  """`_ByteTokenizer` as a numpy array (11.6 M characters in ~0.1 s)."""

  def __call__(self, text, add_special_tokens=True):
    del add_special_tokens
    return {"input_ids": np.frombuffer(text.encode("utf-8"), np.uint8)}


def _cached_sympy():
  try:
    return data.find_sympy_wheel(fetch=False)
  except ValueError:
    return None


@pytest.mark.skipif(_cached_sympy() is None,
                    reason="the sympy wheel is not in the cache")
def test_code_sympy_counts_and_windows():
  files = data.code_sympy_files()
  assert len(files) == 708 and 15.7e6 < sum(map(len, files)) < 15.9e6
  calib, test = data.code_sympy_split()
  assert (len(calib), len(test)) == (177, 531)
  assert calib[0] == files[3] and test[3] == files[4]
  windows = data.eval_windows(_ArrayByteTokenizer(), seqlen=500,
                              max_windows=2, text="code-sympy")
  stream = "\n\n".join(test).encode("utf-8")
  assert bytes(windows.reshape(-1).astype(np.uint8)) == stream[:1000]
