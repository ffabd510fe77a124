"""Generation: greedy parity with transformers, buckets, sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from quarot_jax import generation
from quarot_jax import hf
from quarot_jax import kernels
from quarot_jax import kv_cache
from quarot_jax import model
from quarot_jax import quant
from quarot_jax import quarot
from quarot_jax import run_layout
from tests import hf_models


def _word_tokenizer(vocab_size):
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
  vocab.update({f"w{i}": i for i in range(3, vocab_size)})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
      eos_token="</s>")


@pytest.mark.parametrize("family", ["llama2", "smollm"])
def test_greedy_matches_transformers(family):
  path, torch_model = hf_models.tiny_hf_model(family)
  params, config = hf.load_hf(path)
  prompts = [hf_models.random_tokens(config.vocab_size, 1, n, seed=n)[0]
             for n in (5, 9)]
  got = generation.generate_tokens(params, config, [p.tolist() for p in prompts],
                                 max_new_tokens=10, eos_ids=[])
  for prompt, ours in zip(prompts, got):
    with torch.no_grad():
      want = torch_model.generate(
          torch.from_numpy(prompt[None]).long(), do_sample=False,
          max_new_tokens=10, min_new_tokens=10, eos_token_id=None,
          pad_token_id=0)
    assert ours == want[0, len(prompt):].tolist()


def test_same_bucket_does_not_recompile():
  path, _ = hf_models.tiny_hf_model("llama2")
  params, config = hf.load_hf(path)
  params = jax.tree.map(jnp.asarray, params)
  run = lambda prompts, **kw: generation.generate_tokens(
      params, config, prompts, max_new_tokens=4, eos_ids=[], **kw)
  run([[5, 6, 7]])
  traces = generation.TRACE_COUNT
  run([[8, 9, 10, 11, 12]], temperature=0.7, top_k=5, top_p=0.9, seed=3)
  assert generation.TRACE_COUNT == traces  # same bucket: 8 tokens, batch 1
  run([[5] * 9])
  assert generation.TRACE_COUNT == traces + 1  # 16-token bucket


def test_unrolled_layer_loop_generates_the_scans_tokens(monkeypatch):
  """GPUs decode over per-layer weights and caches (`layer_loop='unrolled'`),
  q/k/v and gate/up fused; the tokens are those of the stacked scan, with
  left padding."""
  path, _ = hf_models.tiny_hf_model("llama3")
  params, config = hf.load_hf(path)
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
  got, fused = {}, []
  fuse = run_layout.fuse_projections
  monkeypatch.setattr(run_layout, "fuse_projections",
                      lambda layer: fused.append(1) or fuse(layer))
  for loop in ("scan", "unrolled"):
    got[loop] = generation.generate_tokens(
        params, config, prompts, max_new_tokens=5, eos_ids=[],
        kernels=dataclasses.replace(kernels.XLA, layer_loop=loop))
  # The unrolled run fused q/k/v and gate/up (`run_layout.fuse_projections`).
  assert len(fused) == config.num_hidden_layers
  assert got["unrolled"] == got["scan"]
  assert all(len(row) == 5 for row in got["scan"])


def test_stops_at_eos_and_text_api():
  path, _ = hf_models.tiny_hf_model("llama2")
  params, config = hf.load_hf(path)
  tokenizer = _word_tokenizer(config.vocab_size)
  first = generation.generate_tokens(params, config, [[5, 6, 7]],
                                   max_new_tokens=6, eos_ids=[])[0]
  # Declare the 3rd greedy token an EOS: generation must stop right there.
  stopped = generation.generate_tokens(params, config, [[5, 6, 7]],
                                     max_new_tokens=6, eos_ids=[first[2]])[0]
  assert stopped == first[:first.index(first[2]) + 1]
  texts = generation.generate(params, config, tokenizer, ["w5 w6 w7", "w9"],
                            max_new_tokens=3)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_sampling_respects_top_k():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)),
                       jnp.float32)
  top2 = np.argsort(-np.asarray(logits), axis=-1)[:, :2]
  for seed in range(20):
    tok = generation.sample_next(logits, jax.random.key(seed), jnp.float32(1.0),
                               jnp.int32(2), jnp.float32(1.0))
    assert all(t in row for t, row in zip(np.asarray(tok), top2))
  greedy = generation.sample_next(logits, jax.random.key(0), jnp.float32(0.0),
                                jnp.int32(0), jnp.float32(1.0))
  np.testing.assert_array_equal(greedy, top2[:, 0])


def test_sampling_top_p_keeps_the_nucleus():
  # probs ~ [0.6, 0.3, 0.1]: top_p=0.5 keeps only token 0.
  logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.1]], jnp.float32))
  for seed in range(10):
    tok = generation.sample_next(logits, jax.random.key(seed), jnp.float32(1.0),
                               jnp.int32(0), jnp.float32(0.5))
    assert int(tok[0]) == 0


def test_bad_input_errors():
  path, _ = hf_models.tiny_hf_model("llama2")
  params, config = hf.load_hf(path)
  with pytest.raises(ValueError, match="at least one token"):
    generation.generate_tokens(params, config, [[]])
  with pytest.raises(ValueError, match="top_p"):
    generation.generate_tokens(params, config, [[4]], top_p=0.0)


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([[4] * 257], {}, r"prompt 0 has 257 tokens.*max_position_embeddings=256"),
    ([[4] * 250], dict(max_new_tokens=7), r"257 positions"),
    ([[4], [5, 97]], {}, r"prompt 1 has token id 97 outside \[0, vocab=97\)"),
    ([[-1]], {}, r"token id -1 outside"),
    ([[4.0]], {}, r"float64 values; token ids are ints"),
    ([[4]], dict(temperature=float("nan")), r"temperature=nan must be a"
     r" finite number >= 0"),
    ([[4]], dict(temperature=-0.5), r"temperature=-0.5"),
    ([[4]], dict(top_p=float("nan")), r"top_p=nan must be in \(0, 1\]"),
    ([[4]], dict(top_k=-1), r"top_k=-1"),
    ([[4]], dict(max_new_tokens=0), r"max_new_tokens=0 must be a positive"),
    ([[4]], dict(pad_id=200), r"pad_id=200 must be a token id"),
])
def test_rejects_bad_arguments_naming_the_value(prompts, kwargs, match):
  # The tiny config: vocab 97, max_position_embeddings 256. Checked before
  # anything is traced, so no params are needed.
  path, _ = hf_models.tiny_hf_model("llama2")
  _, config = hf.load_hf(path)
  with pytest.raises(ValueError, match=match):
    generation.generate_tokens(None, config, prompts, **kwargs)


def test_unrolled_generate_fuses_packed_projections(monkeypatch):
  """On a GPU generate decodes through `run_layout.unstack_layers(...,
  fuse=True)`: one q/k/v and one gate/up matmul a layer. Packed int4
  linears (random codes, kernels interpreted) give the scan's tokens."""
  # Its own config (a static argument), so this test traces generate.
  config = hf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16,
                          attention_bias=True, max_position_embeddings=64)
  params = model.init_params(config, jax.random.key(0), scale=0.1)
  layers = dict(params["layers"])
  for i, (block, name) in enumerate(quarot.LINEARS):
    node = dict(layers[block][name])
    n_layers, d_in, d_out = node.pop("kernel").shape
    node["qweight"] = jax.random.randint(  # uint8[L, out, in // 2]
        jax.random.key(i), (n_layers, d_out, d_in // 2), 0, 256,
        jnp.int32).astype(jnp.uint8)
    node["wscale"] = jnp.full((n_layers, d_out), 0.05, jnp.float32)
    layers[block] = {**layers[block], name: node}
  params = {**params, "layers": layers}
  fused = []
  fuse = run_layout.fuse_projections
  monkeypatch.setattr(run_layout, "fuse_projections",
                      lambda layer: fused.append(1) or fuse(layer))
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
  got = {}
  for loop in ("scan", "unrolled"):
    got[loop] = generation.generate_tokens(
        params, config, prompts, max_new_tokens=4, eos_ids=[],
        options=model.RunOptions(a_spec=quant.QuantSpec(bits=4)),
        kernels=dataclasses.replace(kernels.resolve("interpret"),
                                    layer_loop=loop))
  assert len(fused) == config.num_hidden_layers  # the unrolled run only
  assert got["unrolled"] == got["scan"]
  assert len(set(map(tuple, got["scan"]))) == 2  # rows that can differ
  # pylint: disable-next=protected-access
  assert not generation._split_over_devices(params)


@pytest.mark.parametrize("family", ["llama2", "llama3"])  # MHA, GQA
def test_flash_decoding_kernel_generates_the_einsum_tokens(monkeypatch,
                                                           family):
  """`kernels.decode_attention='pallas'` (interpreted) reads the float cache
  with the flash-decoding kernel at every decode step, left padding
  included, and greedy decoding gives the einsum attention's tokens."""
  from pallas_kernels import decode_attention  # pylint: disable=g-import-not-at-top
  path, _ = hf_models.tiny_hf_model(family)
  params, config = hf.load_hf(path)
  calls = []
  real = decode_attention.decode_attention
  monkeypatch.setattr(decode_attention, "decode_attention",
                      lambda *a, **kw: calls.append(1) or real(*a, **kw))
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
  flash = dataclasses.replace(kernels.XLA, decode_attention="pallas",
                              interpret=True)
  got = {k: generation.generate_tokens(params, config, prompts,
                                       max_new_tokens=6, eos_ids=[],
                                       kernels=k)
         for k in (kernels.XLA, flash)}
  assert calls  # traced into the decode step
  assert got[flash] == got[kernels.XLA]
  assert len(set(map(tuple, got[flash]))) == 2


def test_prefill_projects_only_the_last_position_to_the_vocabulary():
  """Sampling reads the last position's logits only: the prefill must not
  form f32[B, T, V] (at B = 16, T = 2048 and a 128K vocabulary, 16 GB and
  a GEMM as large as a layer's)."""
  path, _ = hf_models.tiny_hf_model("llama2")
  params, config = hf.load_hf(path)
  tokens = jnp.full((2, 24), 5, jnp.int32)
  lowered = generation._generate_core.lower(
      params, tokens, jnp.zeros((2,), jnp.int32), jax.random.key(0),
      jnp.float32(0), jnp.int32(0), jnp.float32(1),
      jnp.zeros((1,), jnp.int32), jnp.int32(0), config=config,
      max_new_tokens=3, options=model.FLOAT, kernels=kernels.XLA,
      cache_dtype=jnp.float32)
  text = lowered.as_text()
  assert f"2x24x{config.vocab_size}xf32" not in text
  assert f"2x1x{config.vocab_size}xf32" in text


def test_forward_last_only_is_the_last_row_of_all_logits():
  path, _ = hf_models.tiny_hf_model("llama2")
  params, config = hf.load_hf(path)
  tokens = jnp.asarray(hf_models.random_tokens(config.vocab_size, 2, 7))
  cache = kv_cache.cache_for(config, 2, 10)
  full, full_cache = model.forward(params, tokens, config, cache=cache)
  last, last_cache = model.forward(params, tokens, config, cache=cache,
                                   last_only=True)
  assert last.shape == (2, 1, config.vocab_size)
  np.testing.assert_array_equal(np.asarray(last), np.asarray(full[:, -1:]))
  jax.tree.map(np.testing.assert_array_equal, last_cache, full_cache)
